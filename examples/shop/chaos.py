"""Failure injection for chaos tests: handlers that fail on purpose, reproducibly.

:func:`with_failures` returns a copy of an App whose handlers fail on the first attempt
at a fraction of events. A failing handler does its work first (store writes, emitted
events) and then raises ``RuntimeError``, so a test also proves that the runtime throws
that work away. Which events fail is a pure function of (seed, function, event id):
the same run fails the same events. Later attempts always succeed, so a retry policy
heals every injected failure; anything left in a dead-letter queue is a real bug.

This is a plain handler wrapper in the example, not a feature of nerve: a function
that wraps a handler is all middleware needs to be.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from typing import Any

from nerve import App, Context
from nerve.app import Handler


def fails(seed: int, function: str, event_id: str, rate: float) -> bool:
    """Does ``function``'s first attempt at ``event_id`` fail (for ``rate`` of ids)?"""
    digest = hashlib.blake2b(f"{seed}:{function}:{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def with_failures(app: App, rate: float, seed: int = 0) -> App:
    """A copy of ``app`` whose handlers fail ``rate`` (0..1) of their first attempts."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the failure rate is a fraction from 0 to 1, got {rate}")
    chaotic = copy.copy(app)
    chaotic.functions = {
        name: dataclasses.replace(fn, handler=_failing(fn.handler, name, rate, seed))
        for name, fn in app.functions.items()
    }
    return chaotic


def _failing(handler: Handler, function: str, rate: float, seed: int) -> Handler:
    @functools.wraps(handler)
    async def handle(payload: Any, ctx: Context) -> None:
        await handler(payload, ctx)
        if ctx.attempt == 1 and fails(seed, function, ctx.event.id, rate):
            raise RuntimeError(f"chaos: {function} fails its first attempt at {ctx.event.id}")

    return handle
