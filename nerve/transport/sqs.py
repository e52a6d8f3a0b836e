"""``sqs://``: Amazon SQS queues per consumer group, fanned out by one SNS topic.

Design (docs/brokers/sqs.md): one SNS topic ``<prefix>-events`` per namespace; one
standard SQS queue per group (``<prefix>-<group>``) subscribed to the topic with raw
message delivery, and one dead-letter queue ``<prefix>-<group>-dlq``. The event is the
message body (structured JSON); ``type`` and ``partitionkey`` travel as message
attributes when they fit. Routing (patterns, filters) is done on the consumer side:
a message its group does not match is deleted and never handed out. A lease is the
SQS visibility timeout (whole seconds, rounded up); ack = DeleteMessage, nack(delay)
and extend = ChangeMessageVisibility. SQS does not fence a stale receipt handle
reliably, so ``fenced_settlement`` is declared False; per-key order would need FIFO
queues (future work), so ``key_ordering`` is False.

URL: ``sqs://[host:port]?region=us-east-1&prefix=nerve&visibility_timeout=30
&max_payload=260096&endpoint=https`` (no host: AWS itself, region from the URL or the
environment; ``endpoint=http`` for a local emulator such as moto). Credentials come
from the usual AWS chain (environment, profile, instance role), never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from nerve import event as codec
from nerve._urls import redact as _redact
from nerve.app import Subscription
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    LeaseLost,
    PayloadTooLarge,
    TransportError,
)
from nerve.event import Event
from nerve.transport.base import (
    DeadLetterEntry,
    Delivery,
    Failure,
    Features,
    GroupStats,
    encode_checked,
)

_KNOWN = ("region", "prefix", "visibility_timeout", "max_payload", "endpoint")
_SQS_LIMIT = 262_144
"""SNS and SQS refuse a message (body plus attributes) over 256 KiB."""
_ATTRIBUTE_ROOM = 2048
"""Kept for the message attributes (``type``, ``partitionkey``): the body limit."""
_BODY_LIMIT = _SQS_LIMIT - _ATTRIBUTE_ROOM
_MAX_VISIBILITY = 12 * 3600
_TRACEBACK_MAX = 16_384
_RECEIVES_AT_ONCE = 5
"""ReceiveMessage calls one ``fetch`` makes at the same time for a large ``limit``."""


@dataclass(frozen=True, slots=True)
class SqsConfig:
    host: str | None = None
    """host[:port] of an SQS/SNS-compatible endpoint; None: AWS itself."""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = "nerve"
    visibility_timeout: float = 30.0
    max_payload: int = _BODY_LIMIT

    @classmethod
    def from_url(cls, url: str) -> SqsConfig:
        parts = urlsplit(url)
        if parts.scheme != "sqs":
            raise ConfigError(f"not an sqs URL: {_redact(url)!r}")
        if parts.username or parts.password:
            raise ConfigError(
                f"{_redact(url)!r}: put AWS credentials in the environment or a profile, "
                "not in the broker URL"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(options) - set(_KNOWN)
        if unknown:
            raise ConfigError(
                f"{_redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(_KNOWN)}"
            )
        try:
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        scheme = options.get("endpoint", "https")
        if scheme not in ("http", "https"):
            raise ConfigError(f"{_redact(url)!r}: endpoint must be http or https")
        region = (
            options.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        netloc = None
        if host:
            netloc = f"[{host}]" if ":" in host else host
            if port:
                netloc += f":{port}"
        try:
            config = cls(
                host=netloc,
                endpoint_url=f"{scheme}://{netloc}" if netloc else None,
                region=region,
                prefix=options.get("prefix", "nerve"),
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", _BODY_LIMIT)),
            )
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,30}", config.prefix):
            raise ConfigError(f"{_redact(url)!r}: prefix must be 1-30 letters, digits, '-' or '_'")
        if not 0 < config.visibility_timeout <= _MAX_VISIBILITY:
            raise ConfigError(f"{_redact(url)!r}: visibility_timeout must be > 0 and <= 43200")
        if not 1024 <= config.max_payload <= _BODY_LIMIT:
            raise ConfigError(
                f"{_redact(url)!r}: max_payload must be 1024 .. {_BODY_LIMIT} bytes (SQS "
                f"takes {_SQS_LIMIT} bytes per message; {_ATTRIBUTE_ROOM} are kept for attributes)"
            )
        return config

    @property
    def where(self) -> str:
        return self.endpoint_url or f"AWS ({self.region})"


def _seconds(value: float) -> int:
    """SQS counts visibility in whole seconds: round up, within its limits."""
    return max(0, min(_MAX_VISIBILITY, math.ceil(value - 1e-9)))


def _queue_name(prefix: str, group: str) -> str:
    """``<prefix>-<group>``, made a valid, unambiguous SQS name (a hash is appended
    when the group has other characters, ends like a DLQ, or is too long)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", group)
    name = f"{prefix}-{safe}"
    if safe != group or group.endswith("-dlq") or len(name) > 66:
        digest = hashlib.sha256(group.encode()).hexdigest()[:8]
        name = f"{name[:57]}-{digest}"
    return name


def _filter_policy(sub: Subscription) -> str | None:
    """An SNS filter policy on the ``type`` attribute that lets through at least what
    ``sub`` matches (exact names, and the literal prefix before a wildcard); None when
    a pattern starts with a wildcard. The consumer still checks every message exactly
    (wildcards, attribute filters)."""
    rules: list[Any] = []
    for pattern in sub.patterns:
        cut = min((i for i in (pattern.find("*"), pattern.find(">")) if i >= 0), default=-1)
        if cut < 0:
            rules.append(pattern)
        elif cut == 0:
            return None
        else:
            rules.append({"prefix": pattern[:cut]})
    if not rules or len(rules) > 100:
        return None
    return orjson.dumps({"type": rules}).decode()


def _long_poll_seconds(remaining: float) -> int:
    """``WaitTimeSeconds`` for a fetch with ``remaining`` seconds left: SQS long-polls in
    whole seconds, so a wait of a quarter second or more is rounded to the nearest
    second, and at least one (a fetch may return up to 0.75 s after its timeout). Below
    that, 0: short polls 50 ms apart. Rounding down instead made every fetch with a
    timeout under a second (the runtime's is 0.5 s) poll an empty queue 10-20 times a
    second: a third of moto's CPU for one idle shop worker, and a ReceiveMessage bill
    on AWS."""
    if remaining < 0.25:
        return 0
    return max(1, min(20, int(remaining + 0.5)))


def _detail(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


@contextlib.asynccontextmanager
async def _translated(config: SqsConfig) -> AsyncIterator[None]:
    """botocore errors -> nerve's tree (endpoint only, never credentials)."""
    try:
        yield
    except (EndpointConnectionError, BotoConnectionError, OSError) as exc:
        raise BrokerUnavailable(
            f"cannot reach SQS/SNS at {config.where} ({type(exc).__name__}); check the "
            "endpoint and region in the broker URL"
        ) from None
    except NoCredentialsError:
        raise BrokerUnavailable(
            f"no AWS credentials for SQS/SNS at {config.where}; set them in the environment "
            "or an AWS profile"
        ) from None
    except ClientError as exc:
        raise TransportError(
            f"SQS/SNS at {config.where} refused an operation: {_detail(exc)}"
        ) from None
    except BotoCoreError as exc:
        raise TransportError(f"SQS/SNS at {config.where} failed: {_detail(exc)}") from None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# -- deliveries and consumers -------------------------------------------------------------


class SqsDelivery:
    __slots__ = (
        "_consumer",
        "_event",
        "_settled",
        "attempt",
        "first_at",
        "group",
        "handle",
        "message_id",
        "raw",
        "received_at",
    )

    def __init__(
        self,
        consumer: SqsConsumer,
        raw: bytes,
        handle: str,
        message_id: str,
        attempt: int,
        first_at: float,
        event: Event | None,
    ) -> None:
        self._consumer = consumer
        self._event = event
        self._settled = False
        self.group = consumer.group
        self.raw = raw
        self.handle = handle
        self.message_id = message_id
        self.attempt = attempt
        self.received_at = time.time()
        self.first_at = first_at

    def __repr__(self) -> str:
        return f"<SqsDelivery {self.group}/{self.message_id} attempt={self.attempt}>"

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = codec.decode(self.raw)
        return self._event

    def _once(self, action: str) -> None:
        if self._settled:
            raise LeaseLost(f"{self!r} was already settled; this {action} was refused")

    async def ack(self) -> None:
        self._once("ack")
        await self._consumer.transport._sqs_call(
            "delete_message", QueueUrl=self._consumer.queue_url, ReceiptHandle=self.handle
        )
        self._settled = True
        self._consumer.transport._count(self.group, "processed")

    async def nack(self, delay: float = 0.0) -> None:
        self._once("nack")
        await self._visibility(delay)
        self._settled = True
        transport = self._consumer.transport
        transport._count(self.group, "retried")
        if delay > 0:
            transport._delayed.setdefault(self.group, {})[self.message_id] = time.time() + delay

    async def extend(self, seconds: float) -> None:
        self._once("extend")
        await self._visibility(seconds)

    async def _visibility(self, seconds: float) -> None:
        try:
            await self._consumer.transport._sqs_call(
                "change_message_visibility",
                QueueUrl=self._consumer.queue_url,
                ReceiptHandle=self.handle,
                VisibilityTimeout=_seconds(seconds),
                _raw=True,
            )
        except ClientError as exc:
            if "Inflight" in _code(exc) or "ReceiptHandle" in _code(exc):
                raise LeaseLost(
                    f"{self!r}: the lease expired; this settlement was refused"
                ) from None
            raise TransportError(
                f"SQS at {self._consumer.transport.config.where} refused an operation: "
                f"{_detail(exc)}"
            ) from None

    async def dead_letter(self, failure: Failure) -> None:
        self._once("dead_letter")
        transport = self._consumer.transport
        await transport._send_dead_letter(self.group, self.raw, failure, self.message_id)
        await transport._sqs_call(
            "delete_message", QueueUrl=self._consumer.queue_url, ReceiptHandle=self.handle
        )
        self._settled = True
        transport._count(self.group, "dead_lettered")


class SqsConsumer:
    def __init__(self, transport: SqsTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        self._queue_url: str | None = None

    @property
    def queue_url(self) -> str:
        assert self._queue_url is not None
        return self._queue_url

    async def fetch(self, limit: int, timeout: float) -> Sequence[Delivery]:
        if limit <= 0:
            return []
        if self._queue_url is None:
            self._queue_url = await self.transport._queue_url(self.group)
        deadline = time.monotonic() + max(0.0, timeout)
        long_poll = False
        while True:
            remaining = deadline - time.monotonic()
            # a short poll takes what is there; a long poll (only when that was nothing)
            # asks for one message, so it returns as soon as one arrives (some emulators
            # keep a long poll open until MaxNumberOfMessages are there), then short
            # polls take the rest; a full short poll is followed by more, at once
            wait = _long_poll_seconds(remaining) if long_poll else 0
            reply = await self._receive(1 if wait else min(10, limit), wait)
            messages = list(reply.get("Messages", []))
            if messages and len(messages) < limit and (wait or len(messages) == 10):
                messages += await self._receive_more(limit - len(messages))
            out: list[Delivery] = []
            unwanted: list[str] = []
            for message in messages:
                delivery = self._delivery(message)
                if delivery is None:
                    unwanted.append(message["ReceiptHandle"])
                else:
                    out.append(delivery)
            if unwanted:
                await self.transport._delete_batch(self.queue_url, unwanted)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if not messages:
                if long_poll and wait == 0:
                    await asyncio.sleep(min(0.05, remaining))
                long_poll = True

    async def _receive_more(self, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` more messages after a receive found some: short polls of 10,
        at most :data:`_RECEIVES_AT_ONCE` at the same time (SQS returns 10 per call)."""
        calls = min(_RECEIVES_AT_ONCE, math.ceil(count / 10))
        sizes = [min(10, count - 10 * i) for i in range(calls)]
        replies = await asyncio.gather(*(self._receive(size, 0) for size in sizes))
        return [m for reply in replies for m in reply.get("Messages", [])]

    async def _receive(self, count: int, wait: int) -> Any:
        return await self.transport._sqs_call(
            "receive_message",
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=wait,
            VisibilityTimeout=_seconds(self.transport.config.visibility_timeout),
            AttributeNames=["ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp"],
            MessageAttributeNames=["All"],
        )

    def _delivery(self, message: dict[str, Any]) -> SqsDelivery | None:
        raw = str(message.get("Body", "")).encode()
        attributes = message.get("Attributes", {})
        targeted = "nerveto" in message.get("MessageAttributes", {})
        event: Event | None = None
        try:
            event = codec.decode(raw)
        except Exception:
            event = None  # handed out: the runtime dead-letters undecodable events
        if event is not None and not targeted and not self.subscription.matches(event):
            return None
        self.transport._delayed.get(self.group, {}).pop(message["MessageId"], None)
        first_ms = attributes.get("ApproximateFirstReceiveTimestamp")
        return SqsDelivery(
            self,
            raw,
            message["ReceiptHandle"],
            message["MessageId"],
            int(attributes.get("ApproximateReceiveCount", 1)),
            int(first_ms) / 1000 if first_ms else time.time(),
            event,
        )

    async def ack_many(self, deliveries: Sequence[Delivery]) -> Sequence[Delivery]:
        mine = [d for d in deliveries if isinstance(d, SqsDelivery)]
        refused: list[Delivery] = [d for d in deliveries if not isinstance(d, SqsDelivery)]
        chunks = [mine[start : start + 10] for start in range(0, len(mine), 10)]
        replies = await asyncio.gather(
            *(
                self.transport._sqs_call(
                    "delete_message_batch",
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": d.handle} for i, d in enumerate(chunk)
                    ],
                )
                for chunk in chunks
            ),
            return_exceptions=True,
        )
        error: BaseException | None = None
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                error = error or reply
                continue
            failed = {f["Id"] for f in reply.get("Failed", [])}
            for i, delivery in enumerate(chunk):
                if str(i) in failed:
                    refused.append(delivery)
                else:
                    delivery._settled = True
                    self.transport._count(self.group, "processed")
        if error is not None:
            raise error  # the chunks that succeeded are settled
        return refused

    async def close(self) -> None:
        return None


# -- the transport --------------------------------------------------------------------------


@dataclass(slots=True)
class _Dead:
    entry: DeadLetterEntry
    queue_url: str
    handle: str
    seq: int
    source: str
    """The id of the group's SQS message that was dead-lettered: copies of one
    dead-lettering share it."""


class SqsTransport:
    def __init__(self, url: str) -> None:
        self.url = url
        self.config = SqsConfig.from_url(url)
        self.features = Features(
            durable=True,
            shared_across_processes=True,
            key_ordering=False,
            dead_letter_queue=True,
            max_payload=self.config.max_payload,
            lease_expiry=True,
            fenced_settlement=False,
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._sqs: Any = None
        self._sns: Any = None
        self._topic_arn: str | None = None
        self._queues: dict[str, str] = {}
        self._subscribed: set[str] = set()
        self._groups: set[str] = set()
        self._counters: dict[str, dict[str, int]] = {}
        self._delayed: dict[str, dict[str, float]] = {}
        """group -> message id -> when a nack by this process makes it visible again"""

    def __repr__(self) -> str:
        return f"<SqsTransport {self.config.where} prefix={self.config.prefix}>"

    async def start(self) -> None:
        if self._sqs is not None:
            return
        stack = contextlib.AsyncExitStack()
        session = get_session()
        boto_config = Config(
            connect_timeout=3,
            read_timeout=40,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=50,
        )
        options: dict[str, Any] = {"region_name": self.config.region, "config": boto_config}
        if self.config.endpoint_url:
            options["endpoint_url"] = self.config.endpoint_url
        try:
            async with _translated(self.config):
                self._sqs = await stack.enter_async_context(session.create_client("sqs", **options))
                self._sns = await stack.enter_async_context(session.create_client("sns", **options))
                reply = await self._sns.create_topic(Name=f"{self.config.prefix}-events")
                self._topic_arn = reply["TopicArn"]
        except BaseException:
            await stack.aclose()
            self._sqs = self._sns = None
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._sqs = self._sns = None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    def _client(self, which: str) -> Any:
        client = self._sqs if which == "sqs" else self._sns
        if client is None:
            raise TransportError("the SQS transport is not started (await start() first)")
        return client

    async def _sqs_call(self, operation: str, _raw: bool = False, **kwargs: Any) -> Any:
        client = self._client("sqs")
        if _raw:
            try:
                return await getattr(client, operation)(**kwargs)
            except ClientError:
                raise
            except Exception:
                async with _translated(self.config):
                    raise
        async with _translated(self.config):
            return await getattr(client, operation)(**kwargs)

    async def _sns_call(self, operation: str, **kwargs: Any) -> Any:
        client = self._client("sns")
        async with _translated(self.config):
            return await getattr(client, operation)(**kwargs)

    # -- groups --------------------------------------------------------------------------

    async def _queue_url(self, group: str, *, dlq: bool = False) -> str:
        name = _queue_name(self.config.prefix, group) + ("-dlq" if dlq else "")
        if name in self._queues:
            return self._queues[name]
        try:
            reply = await self._sqs_call("get_queue_url", QueueName=name, _raw=True)
        except ClientError as exc:
            if "NonExistent" in _code(exc) or "QueueDoesNotExist" in _code(exc):
                raise TransportError(f"no consumer group named {group!r} is declared") from None
            raise TransportError(
                f"SQS at {self.config.where} refused an operation: {_detail(exc)}"
            ) from None
        self._queues[name] = reply["QueueUrl"]
        return str(reply["QueueUrl"])

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        await asyncio.gather(*(self._declare_one(sub) for sub in subscriptions))

    async def _declare_one(self, sub: Subscription) -> None:
        self._groups.add(sub.group)
        name = _queue_name(self.config.prefix, sub.group)
        dlq = await self._sqs_call("create_queue", QueueName=name + "-dlq")
        self._queues[name + "-dlq"] = dlq["QueueUrl"]
        reply = await self._sqs_call(
            "create_queue",
            QueueName=name,
            Attributes={"VisibilityTimeout": str(_seconds(self.config.visibility_timeout))},
        )
        queue_url = reply["QueueUrl"]
        self._queues[name] = queue_url
        if name in self._subscribed:
            return
        attrs = await self._sqs_call(
            "get_queue_attributes", QueueUrl=queue_url, AttributeNames=["QueueArn"]
        )
        queue_arn = attrs["Attributes"]["QueueArn"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": self._topic_arn}},
                }
            ],
        }
        await self._sqs_call(
            "set_queue_attributes",
            QueueUrl=queue_url,
            Attributes={"Policy": orjson.dumps(policy).decode()},
        )
        policy_text = _filter_policy(sub)
        subscription_arn = await self._subscription_of(queue_arn)
        if subscription_arn is None:
            attributes = {"RawMessageDelivery": "true"}
            if policy_text is not None:
                attributes["FilterPolicy"] = policy_text
            await self._sns_call(
                "subscribe",
                TopicArn=self._topic_arn,
                Protocol="sqs",
                Endpoint=queue_arn,
                Attributes=attributes,
                ReturnSubscriptionArn=True,
            )
        elif policy_text is not None:
            await self._sns_call(
                "set_subscription_attributes",
                SubscriptionArn=subscription_arn,
                AttributeName="FilterPolicy",
                AttributeValue=policy_text,
            )
        self._subscribed.add(name)

    async def _subscription_of(self, queue_arn: str) -> str | None:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"TopicArn": self._topic_arn}
            if token:
                kwargs["NextToken"] = token
            reply = await self._sns_call("list_subscriptions_by_topic", **kwargs)
            for subscription in reply.get("Subscriptions", []):
                if subscription.get("Endpoint") == queue_arn:
                    return str(subscription["SubscriptionArn"])
            token = reply.get("NextToken")
            if not token:
                return None

    def consumer(self, subscription: Subscription) -> SqsConsumer:
        return SqsConsumer(self, subscription)

    # -- publishing ------------------------------------------------------------------------

    @staticmethod
    def _attributes(event: Event, body: bytes, to_group: str | None) -> dict[str, Any]:
        """``type`` / ``partitionkey`` (and the target group) as message attributes, when
        they fit beside the body in SQS's 256 KiB (routing never depends on them)."""
        attributes: dict[str, Any] = {}
        if to_group is not None:
            attributes["nerveto"] = {"DataType": "String", "StringValue": "1"}
        # ``type`` always: the SNS filter policies select on it
        attributes["type"] = {"DataType": "String", "StringValue": event.type}
        size = len(body) + len(event.type.encode()) + 10
        key = event.partitionkey
        if key is not None and size + len(str(key).encode()) + 18 <= _SQS_LIMIT:
            attributes["partitionkey"] = {"DataType": "String", "StringValue": str(key)}
        if size > _SQS_LIMIT:
            raise PayloadTooLarge(size, _SQS_LIMIT, event.id)
        return attributes

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        encoded = encode_checked(events, self.config.max_payload)
        chunks = [encoded[i : i + 10] for i in range(0, len(encoded), 10)]
        if to_group is not None:
            queue_url = await self._queue_url(to_group)
            await self._bounded(self._send_chunk(queue_url, chunk, to_group) for chunk in chunks)
        else:
            await self._bounded(self._publish_chunk(chunk) for chunk in chunks)

    @staticmethod
    async def _bounded(jobs: Any, limit: int = 16) -> None:
        semaphore = asyncio.Semaphore(limit)

        async def run(job: Any) -> None:
            async with semaphore:
                await job

        await asyncio.gather(*(run(job) for job in jobs))

    async def _publish_chunk(self, chunk: list[tuple[Event, bytes]]) -> None:
        entries = [
            {
                "Id": str(i),
                "Message": body.decode(),
                "MessageAttributes": self._attributes(event, body, None),
            }
            for i, (event, body) in enumerate(chunk)
        ]
        reply = await self._sns_call(
            "publish_batch", TopicArn=self._topic_arn, PublishBatchRequestEntries=entries
        )
        if reply.get("Failed"):
            failed = reply["Failed"][0]
            raise TransportError(
                f"SNS at {self.config.where} refused {len(reply['Failed'])} event(s): "
                f"{failed.get('Code')}: {failed.get('Message')}"
            )

    async def _send_chunk(
        self, queue_url: str, chunk: list[tuple[Event, bytes]], to_group: str
    ) -> None:
        entries = [
            {
                "Id": str(i),
                "MessageBody": body.decode(),
                "MessageAttributes": self._attributes(event, body, to_group),
            }
            for i, (event, body) in enumerate(chunk)
        ]
        reply = await self._sqs_call("send_message_batch", QueueUrl=queue_url, Entries=entries)
        if reply.get("Failed"):
            failed = reply["Failed"][0]
            raise TransportError(
                f"SQS at {self.config.where} refused {len(reply['Failed'])} event(s): "
                f"{failed.get('Code')}: {failed.get('Message')}"
            )

    async def _delete_batch(self, queue_url: str, handles: Sequence[str]) -> None:
        for start in range(0, len(handles), 10):
            chunk = handles[start : start + 10]
            await self._sqs_call(
                "delete_message_batch",
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)],
            )

    # -- dead letters ----------------------------------------------------------------------

    async def _send_dead_letter(
        self, group: str, raw: bytes, failure: Failure, source: str
    ) -> None:
        record = failure.to_json()
        if len(record["traceback"]) > _TRACEBACK_MAX:
            record["traceback"] = record["traceback"][-_TRACEBACK_MAX:]
        queue_url = await self._queue_url(group, dlq=True)
        await self._sqs_call(
            "send_message",
            QueueUrl=queue_url,
            MessageBody=raw.decode(errors="replace") or " ",
            MessageAttributes={
                "group": {"DataType": "String", "StringValue": group},
                "failure": {"DataType": "String", "StringValue": orjson.dumps(record).decode()},
                "seq": {"DataType": "Number", "StringValue": str(time.time_ns())},
                "source": {"DataType": "String", "StringValue": source},
            },
        )

    async def _dead_queue_urls(self, group: str | None) -> list[str]:
        if group is not None:
            try:
                return [await self._queue_url(group, dlq=True)]
            except TransportError:
                return []
        urls: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"QueueNamePrefix": f"{self.config.prefix}-"}
            if token:
                kwargs["NextToken"] = token
            reply = await self._sqs_call("list_queues", **kwargs)
            urls += [u for u in reply.get("QueueUrls", []) if u.endswith("-dlq")]
            token = reply.get("NextToken")
            if not token:
                return urls

    async def _browse(self, group: str | None) -> list[_Dead]:
        """Every dead letter (of ``group``), in dead-letter order. Receives each DLQ
        whole with a short visibility, then makes everything visible again.

        One message can be dead-lettered twice: SQS does not fence a settlement, so a
        consumer whose lease ran out while it was dead-lettering (or that died between
        the DLQ send and the delete) leaves a copy while the next receiver dead-letters
        the message again. Copies share their ``source`` message id: the first is the
        entry, the others are deleted here."""
        found: list[_Dead] = []
        for queue_url in await self._dead_queue_urls(group):
            handles: list[str] = []
            first: dict[tuple[str, str], _Dead] = {}
            copies: list[_Dead] = []
            empty = 0
            while empty < 2:
                reply = await self._sqs_call(
                    "receive_message",
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=0,
                    VisibilityTimeout=30,
                    MessageAttributeNames=["All"],
                )
                messages = reply.get("Messages", [])
                if not messages:
                    empty += 1
                    continue
                for message in messages:
                    dead = self._dead_from(queue_url, message)
                    if dead is None or (group is not None and dead.entry.group != group):
                        handles.append(message["ReceiptHandle"])
                        continue
                    key = (dead.entry.group, dead.source)
                    kept = first.get(key)
                    if kept is None or dead.seq < kept.seq:
                        first[key] = dead
                        if kept is not None:
                            copies.append(kept)
                    else:
                        copies.append(dead)
            await self._delete_batch(queue_url, [d.handle for d in copies])
            await self._release(queue_url, handles + [d.handle for d in first.values()])
            found += first.values()
        found.sort(key=lambda d: d.seq)
        return found

    async def _release(self, queue_url: str, handles: Sequence[str]) -> None:
        for start in range(0, len(handles), 10):
            chunk = handles[start : start + 10]
            with contextlib.suppress(TransportError):
                await self._sqs_call(
                    "change_message_visibility_batch",
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                        for i, h in enumerate(chunk)
                    ],
                )

    @staticmethod
    def _dead_from(queue_url: str, message: dict[str, Any]) -> _Dead | None:
        attributes = message.get("MessageAttributes", {})
        try:
            group = attributes["group"]["StringValue"]
            failure = Failure(**orjson.loads(attributes["failure"]["StringValue"]))
            seq = int(attributes["seq"]["StringValue"])
        except (KeyError, TypeError, ValueError):
            return None
        source = attributes.get("source", {}).get("StringValue") or message["MessageId"]
        raw = str(message.get("Body", "")).encode()
        try:
            event: Event | None = codec.decode(raw)
        except Exception:
            event = None
        entry = DeadLetterEntry(
            id=f"{message['MessageId']}:{group}",
            group=group,
            raw=raw,
            failure=failure,
            event=event,
        )
        return _Dead(entry, queue_url, message["ReceiptHandle"], seq, str(source))

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        if limit <= 0:
            return []
        return [d.entry for d in await self._browse(group)][:limit]

    async def _select(self, entry_ids: Sequence[str] | None, group: str | None) -> list[_Dead]:
        if entry_ids is not None:
            wanted = {str(i) for i in entry_ids if ":" in str(i)}
            groups = {i.partition(":")[2] for i in wanted}
            if group is not None:
                groups &= {group}
            found: list[_Dead] = []
            for g in sorted(groups):
                found += [d for d in await self._browse(g) if d.entry.id in wanted]
            return found
        return await self._browse(group)

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        found = await self._select([entry_id], None)
        return found[0].entry if found else None

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        count = 0
        for dead in await self._select(entry_ids, group):
            try:
                queue_url = await self._queue_url(dead.entry.group)
            except TransportError:
                continue  # its group is gone: keep the dead letter
            await self._sqs_call(
                "send_message",
                QueueUrl=queue_url,
                MessageBody=dead.entry.raw.decode(),
                MessageAttributes={"nerveto": {"DataType": "String", "StringValue": "1"}},
            )
            await self._sqs_call(
                "delete_message", QueueUrl=dead.queue_url, ReceiptHandle=dead.handle
            )
            count += 1
        return count

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        selected = await self._select(entry_ids, group)
        for dead in selected:
            await self._sqs_call(
                "delete_message", QueueUrl=dead.queue_url, ReceiptHandle=dead.handle
            )
        return len(selected)

    # -- stats ---------------------------------------------------------------------------

    def _count(self, group: str, counter: str) -> None:
        counters = self._counters.setdefault(group, {})
        counters[counter] = counters.get(counter, 0) + 1

    async def _depth(self, queue_url: str) -> tuple[int, int, int]:
        reply = await self._sqs_call(
            "get_queue_attributes",
            QueueUrl=queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        attributes = reply.get("Attributes", {})
        return (
            int(attributes.get("ApproximateNumberOfMessages", 0)),
            int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
            int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
        )

    async def stats(self) -> list[GroupStats]:
        """The groups declared through this transport. Depths are SQS's approximate
        counts; SQS cannot tell a nacked (delayed) message from one in flight, so the
        nacks of this process are counted as delayed, other processes' as in flight.
        The counters are this process's."""
        out = []
        now = time.time()
        for group in sorted(self._groups):
            ready, invisible, delayed = await self._depth(await self._queue_url(group))
            dl_ready, dl_invisible, _ = await self._depth(await self._queue_url(group, dlq=True))
            waiting = self._delayed.get(group, {})
            for message_id in [m for m, at in waiting.items() if at <= now]:
                del waiting[message_id]
            nacked = min(len(waiting), invisible)
            counters = self._counters.get(group, {})
            out.append(
                GroupStats(
                    group=group,
                    ready=ready,
                    delayed=delayed + nacked,
                    in_flight=invisible - nacked,
                    dead_letters=dl_ready + dl_invisible,
                    processed=counters.get("processed", 0),
                    retried=counters.get("retried", 0),
                    dead_lettered=counters.get("dead_lettered", 0),
                    # the counters (and the nacks told apart as delayed) are this process's
                    extra={"counted_by": "this process"},
                )
            )
        return out
