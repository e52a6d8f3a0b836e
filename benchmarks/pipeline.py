"""The pipeline workload of ``python -m benchmarks compare``: the shop example
(``examples/shop``, what ``nerve demo --orders N`` runs) on a fresh embedded broker.

``python -m benchmarks.pipeline --orders N --processes P --broker URL --out FILE`` runs
the demo with its live view sent to /dev/null and writes
``{"events_per_s": orders/s, "orders_per_s": ..., "seconds": ...}`` to FILE: orders that
reached a terminal state (shipped, cancelled, ...) per second, from the first order
placed to the moment the demo saw the last one end (it looks every 0.25 s), before its
invariant check. The demo exits non-zero when an invariant does not hold; so does this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import orjson
from rich.console import Console


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.orders < 1 or args.processes < 1:
        parser.error("--orders and --processes must be positive")

    from examples.shop import demo as shop
    from nerve.store.sqlite import default_store_url

    marks: dict[str, float] = {}

    class TimedDemo(shop.Demo):
        def _placed(self, order: Any) -> None:
            marks.setdefault("first", time.time())
            super()._placed(order)

        async def _verdict(self, transport: Any, store: Any, last: Any) -> int:
            marks["last"] = time.time()
            marks["ended"] = float(last.ended)
            return await super()._verdict(transport, store, last)

    with open(os.devnull, "w") as devnull:
        demo = TimedDemo(
            args.orders,
            None,
            args.processes,
            args.broker,
            default_store_url(args.broker),
            console=Console(file=devnull),
        )
        code = asyncio.run(demo.main())
    if code != 0 or "last" not in marks:
        sys.stderr.write(f"the shop failed (exit code {code}): see its logs\n")
        return code or 1
    seconds = marks["last"] - marks["first"]
    result = {
        "events_per_s": marks["ended"] / seconds,
        "orders_per_s": marks["ended"] / seconds,
        "orders": marks["ended"],
        "seconds": seconds,
    }
    with open(args.out, "wb") as out:
        out.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
