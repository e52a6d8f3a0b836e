"""Coalescing: many concurrent callers, one batched call.

``await coalescer.submit(item)`` queues ``item``; one flush at a time takes everything
queued so far and hands it to ``flush(items)`` in a single call, which returns one
result per item (an exception instance fails just that caller). While a flush runs,
new items queue up for the next one, so batches grow with load and latency stays at
one round trip when idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - the conventional name for an item type
R = TypeVar("R")


class Coalescer(Generic[I, R]):
    def __init__(self, flush: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]]) -> None:
        self._flush = flush
        self._items: list[I] = []
        self._futures: list[asyncio.Future[R]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._futures.append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._items:
                items, self._items = self._items, []
                futures, self._futures = self._futures, []
                try:
                    results = await self._flush(items)
                except BaseException as exc:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for future, result in zip(futures, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None

    async def drain(self) -> None:
        """Wait until everything submitted so far has been flushed."""
        while self._task is not None:
            await asyncio.shield(self._task)
