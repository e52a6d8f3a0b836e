"""Run the shop's services: ``python -m examples.shop.worker --broker URL --store URL``.

Start as many workers as you like against the same broker and store: the instances of
each function share its events. SIGINT or SIGTERM stops a worker gracefully (events
in flight finish; the rest go back to the broker).

``--fail-rate 0.1`` makes handlers fail 10% of their first attempts on purpose (see
:mod:`examples.shop.chaos`), for chaos tests; ``--seed`` picks which ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from examples.shop.app import app
from examples.shop.chaos import with_failures
from nerve import Runtime
from nerve.transport import DEFAULT_BROKER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.worker", description=__doc__)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="broker URL")
    parser.add_argument("--store", default=None, help="store URL (default: beside the broker)")
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="fail this fraction of first attempts"
    )
    parser.add_argument("--seed", type=int, default=0, help="which events --fail-rate fails")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process exits")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    shop = with_failures(app, args.fail_rate, args.seed) if args.fail_rate else app
    runtime = Runtime(shop, broker=args.broker, store=args.store)
    orphan_watch = None
    if args.parent_pid is not None:
        orphan_watch = asyncio.create_task(_stop_when_orphaned(runtime, args.parent_pid))
    try:
        await runtime.serve()
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await orphan_watch


async def _stop_when_orphaned(runtime: Runtime, parent_pid: int) -> None:
    """A worker started by the demo stops with it, even if the demo was killed."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            runtime.request_stop()
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
