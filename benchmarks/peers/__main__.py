"""``python -m benchmarks.peers SYSTEM produce|consume --broker B --name NAME ...``: one
producer or consumer process of ``python -m benchmarks compare`` (see ``common.py``)."""

from __future__ import annotations

import asyncio
import importlib
import sys

from benchmarks.peers import MODULES
from benchmarks.peers.common import parse, print_result, use_uvloop


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in MODULES:
        raise SystemExit(f"usage: python -m benchmarks.peers {{{','.join(MODULES)}}} ...")
    system, rest = argv[0], argv[1:]
    module = importlib.import_module(MODULES[system])
    cfg = parse(rest, f"python -m benchmarks.peers {system}")
    if getattr(module, "SYNC", False):  # Dramatiq and Celery: blocking clients and workers
        if cfg.role == "produce":
            print_result(module.produce_sync(cfg))
        else:
            module.consume_sync(cfg)
        return
    use_uvloop()
    if cfg.role == "produce":
        print_result(asyncio.run(module.produce(cfg)))
    else:
        asyncio.run(module.consume(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
