"""nerve's optional C speedups (``nerve/_speedups.c``), loaded once.

The module is built when nerve is installed, where a C compiler is at hand
(``hatch_build.py``); the code that uses it (event decoding, the tracing pipeline)
falls back to its own pure-Python twin when :data:`speedups` is None: the module was
not built, it was built for another version of this code (its ``ABI`` differs), or
``NERVE_SPEEDUPS=0`` switched it off. Both give the same results (the tests compare
them).
"""

from __future__ import annotations

import os
from typing import Any

ABI = 14
"""The version of the C module's interface this code expects."""


def _load() -> Any:
    if os.environ.get("NERVE_SPEEDUPS", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from nerve import _speedups
    except ImportError:
        return None
    return _speedups if getattr(_speedups, "ABI", None) == ABI else None


speedups: Any = _load()
""":mod:`nerve._speedups`, or None (then the pure-Python code does its work)."""
