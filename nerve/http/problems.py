"""RFC 9457 problem details: every error the HTTP edge returns.

A :class:`Problem` is raised anywhere inside a request and turned into an
``application/problem+json`` response by the server. ``type`` is a URN naming the
kind of problem (stable, matchable by clients); ``detail`` says what was wrong with
THIS request and how to fix it; ``errors`` (422) lists the validation errors.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROBLEM_CONTENT_TYPE", "Problem"]

PROBLEM_CONTENT_TYPE = "application/problem+json"

_TITLES = {
    400: "Malformed request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Event does not match its schema",
    429: "Rate limited",
    500: "Internal error",
    501: "Not offered by this broker",
    503: "Broker unavailable",
    504: "No reply in time",
}


class Problem(Exception):
    """An HTTP error response, raised inside a request handler."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra or {}

    def to_json(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": f"urn:nerve:problem:{self.slug}",
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        if self.errors is not None:
            doc["errors"] = self.errors
        doc.update(self.extra)
        return doc
