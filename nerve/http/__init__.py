"""nerve's HTTP edge: CloudEvents ingress, request/reply, webhooks, API keys.

Importing this package needs no web framework; :mod:`nerve.http.server` (Starlette
and uvicorn, the ``http`` extra) is imported when something is served. See
docs/http.md.
"""

from nerve.http.endpoints import Endpoints, ReplyEndpoint

__all__ = ["Endpoints", "ReplyEndpoint"]
