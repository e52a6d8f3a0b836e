"""A consumer process that claims events and then hangs without settling them.

Used by the conformance suite to SIGKILL a consumer that holds leases::

    python claim_and_hang.py BROKER_URL GROUP PATTERN COUNT

It opens the broker, claims COUNT deliveries of GROUP (waiting at most 20 s), prints
``CLAIMED <id> <id> ...`` on one line, then sleeps (at most 60 s) until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from nerve.app import Subscription
from nerve.transport import from_url


async def main(url: str, group: str, pattern: str, count: int) -> int:
    transport = from_url(url)
    await transport.start()
    consumer = transport.consumer(Subscription(group, (pattern,)))
    claimed: list[str] = []
    deadline = time.monotonic() + 20
    while len(claimed) < count and time.monotonic() < deadline:
        deliveries = await consumer.fetch(count - len(claimed), 0.5)
        claimed.extend(d.event.id for d in deliveries)
    if len(claimed) < count:
        print(f"ONLY {len(claimed)} of {count}", flush=True)
        return 1
    print("CLAIMED " + " ".join(claimed), flush=True)
    await asyncio.sleep(60)  # hang, holding the leases, until SIGKILL
    return 2


if __name__ == "__main__":
    url, group, pattern, count = sys.argv[1:5]
    sys.exit(asyncio.run(main(url, group, pattern, int(count))))
