"""Delete what one run created on a broker, so runs never see each other's data."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from benchmarks.peers.common import URLS


async def delete(
    broker: str,
    *,
    streams: Sequence[str] = (),
    queues: Sequence[str] = (),
    exchanges: Sequence[str] = (),
    key_prefixes: Sequence[str] = (),
) -> None:
    """Best effort: NATS ``streams``; RabbitMQ ``queues`` and ``exchanges``; Redis keys
    equal to or starting with one of ``key_prefixes``."""
    if broker == "nats" and streams:
        import nats

        nc = await nats.connect(URLS["nats"])
        try:
            js = nc.jetstream()
            for stream in streams:
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        finally:
            await nc.close()
    elif broker == "rabbitmq" and (queues or exchanges):
        import aio_pika

        conn = await aio_pika.connect(URLS["rabbitmq"])
        async with conn:
            for queue in queues:
                channel = await conn.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in exchanges:
                channel = await conn.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)
    elif broker == "redis" and key_prefixes:
        import redis.asyncio as aioredis

        client = aioredis.from_url(URLS["redis"])
        try:
            keys: set[bytes] = set()
            for prefix in key_prefixes:
                keys.update([key async for key in client.scan_iter(match=f"{prefix}*", count=1000)])
            found = list(keys)
            for start in range(0, len(found), 500):
                await client.delete(*found[start : start + 500])
        finally:
            await client.aclose()
