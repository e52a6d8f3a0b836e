"""Observability: OpenTelemetry traces, Prometheus metrics, structured logs, the
dashboard and ``nerve trace``.

Importing this package costs nothing: each part imports its library (opentelemetry,
prometheus-client, starlette) only when used. See docs/observability.md.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from nerve.observe.tracing import Tracing
    from nerve.runtime import Runtime

__all__ = ["default_tracing", "http_routes", "tracing_configured"]

_OFF = ("", "none")


def tracing_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Do the ``OTEL_*`` variables ask for traces to be exported?"""
    import os

    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def default_tracing(service_name: str) -> Tracing | None:
    """Tracing as this process is configured: a tracer provider it installed already,
    or the ``OTEL_*`` variables; None (no spans, no cost) when neither asks for it.
    Decided once, when a runtime is built."""
    if "opentelemetry.trace" not in sys.modules and not tracing_configured():
        return None
    from nerve.observe.tracing import tracing_from_env

    return tracing_from_env(service_name)


def http_routes(runtime: Runtime) -> list[BaseRoute]:
    """``/metrics`` and the dashboard, for the HTTP edge of ``nerve run`` (which
    mounts what this returns through its ``extra_routes`` hook)."""
    from nerve.observe.web import routes

    return routes(runtime)
