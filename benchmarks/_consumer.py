"""Fallback consumer process, used only when ``python -m nerve run`` is unavailable.

``python -m benchmarks._consumer module:attr BROKER_URL`` runs the App's functions
with ``Runtime(app, broker).serve()`` (on uvloop when installed) until SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib
import sys

from nerve import App, Runtime


def main(argv: list[str]) -> None:
    target, broker = argv
    module_name, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module_name), attr or "app")
    assert isinstance(app, App)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(Runtime(app, broker).serve())


if __name__ == "__main__":
    main(sys.argv[1:])
