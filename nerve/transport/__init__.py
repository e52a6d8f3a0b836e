"""Transports: one module per broker, chosen by the scheme of a broker URL.

``from_url("sqlite:///.nerve/nerve.db")`` returns an unstarted transport. Adapters are
imported only when their scheme is used, so a missing client library is reported as
the extra to install (``pip install 'nerve[nats]'``), never as an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
from urllib.parse import urlsplit

from nerve.errors import ConfigError
from nerve.transport.base import (
    Consumer,
    DeadLetterEntry,
    DeadLetterQueue,
    Delivery,
    EventLog,
    Failure,
    Features,
    GroupStats,
    Inspectable,
    Transport,
)

__all__ = [
    "DEFAULT_BROKER",
    "Consumer",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "Delivery",
    "EventLog",
    "Failure",
    "Features",
    "GroupStats",
    "Inspectable",
    "Transport",
    "from_url",
]

DEFAULT_BROKER = "sqlite:///.nerve/nerve.db"

#: scheme -> (module, class, extra that installs its client library or None)
ADAPTERS: dict[str, tuple[str, str, str | None]] = {
    "memory": ("nerve.transport.memory", "MemoryTransport", None),
    "sqlite": ("nerve.transport.sqlite", "SqliteTransport", None),
    "nats": ("nerve.transport.nats", "NatsTransport", "nats"),
    "amqp": ("nerve.transport.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "redis": ("nerve.transport.redis", "RedisTransport", "redis"),
    "postgresql": ("nerve.transport.postgres", "PostgresTransport", "postgres"),
    "kafka": ("nerve.transport.kafka", "KafkaTransport", "kafka"),
    "sqs": ("nerve.transport.sqs", "SqsTransport", "aws"),
}
#: adapters whose module is not in this installation yet (being built) are left out
ADAPTERS = {
    scheme: entry
    for scheme, entry in ADAPTERS.items()
    if importlib.util.find_spec(entry[0]) is not None
}


def from_url(url: str) -> Transport:
    """An unstarted transport for ``url``; raises ConfigError saying how to fix a bad one."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigError(
            f"broker URL {url!r} has no scheme; use one of "
            + ", ".join(f"{s}://" for s in ADAPTERS)
            + f" (default {DEFAULT_BROKER})"
        )
    if scheme not in ADAPTERS:
        raise ConfigError(
            f"no transport for {scheme}:// (in {url!r}); available: "
            + ", ".join(f"{s}://" for s in ADAPTERS)
        )
    module_name, class_name, extra = ADAPTERS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"pip install 'nerve[{extra}]'" if extra else "reinstall nerve"
        raise ConfigError(
            f"{scheme}:// needs a client library that is missing ({exc.name}): {hint}"
        ) from None
    transport: Transport = getattr(module, class_name)(url)
    return transport
