"""Shared helpers of the observability tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable

import pytest

IN_CI = bool(os.environ.get("CI"))


def require_tool(name: str, package: str) -> str:
    """The path of a system tool (installed by scripts/ci-deps): skip without it,
    FAIL under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package!r}; run scripts/ci-deps)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_speedups() -> None:
    """Skips a test of the C speedups where they were not built; under CI, which builds
    them, that fails (unless ``NERVE_SPEEDUPS=0`` switched them off on purpose)."""
    from nerve._native import speedups

    if speedups is None:
        if IN_CI and os.environ.get("NERVE_SPEEDUPS") != "0":
            pytest.fail("nerve._speedups was not built (see hatch_build.py)")
        pytest.skip("nerve._speedups was not built or is switched off")


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
