"""Redacting credentials from URLs and messages, for every place that prints one."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact", "redact_text"]

_SECRET_PARAM = re.compile(
    r"(^|[&;])([^=&;]*(?:pass|secret|token|credential|api_?key|auth)[^=&;]*)=([^&;]*)",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"(://[^/@:\s]*:)[^@\s]*@")


def redact(url: str) -> str:
    """``url`` with its password (and secret-looking query parameters) replaced by ``***``.

    ``amqp://guest:guest@host/`` -> ``amqp://guest:***@host/``; URLs without
    credentials come back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(r"\1***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else netloc
    query = _SECRET_PARAM.sub(r"\1\2=***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact`."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
