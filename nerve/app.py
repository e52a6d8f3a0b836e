"""The App: what a system is made of, declared as data. No I/O happens here.

An App holds event types (Pydantic models bound to a type name) and functions (async
handlers with their subscriptions, emits, retry policy, timeout, ordering and
concurrency). The runtime, the CLI, the HTTP edge and the docs generators all read the
same App. Mistakes are refused when they are declared, with a message naming them.

Type patterns use dot-separated tokens: ``*`` matches exactly one token and ``>``
matches one or more trailing tokens (``order.*`` matches ``order.created`` but not
``order.line.added``; ``order.>`` matches both).
"""

from __future__ import annotations

import difflib
import inspect
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel

from nerve.errors import DefinitionError, EmitError
from nerve.event import Event
from nerve.schema.upcast import EventReader, Upcaster, Upcasters, dataschema_uri

__all__ = [
    "App",
    "EventType",
    "Function",
    "RetryPolicy",
    "Subscription",
    "matches_pattern",
]

Handler = Callable[[Any, Any], Awaitable[None]]
KeyFunc = Callable[[Any], str | None]
M = TypeVar("M", bound=type[BaseModel])
H = TypeVar("H", bound=Handler)
U = TypeVar("U", bound=Upcaster)

_TYPE_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_PATTERN = re.compile(r"^([A-Za-z0-9_\-]+|\*)(\.([A-Za-z0-9_\-]+|\*))*(\.>)?$|^>$")
_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,99}$")


# ---------------------------------------------------------------------------------------
# Patterns and subscriptions


def _is_pattern(name: str) -> bool:
    return "*" in name or ">" in name


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern == ">":
        return re.compile(r"^.+$")
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(token))
    return re.compile("^" + r"\.".join(parts) + "$")


def matches_pattern(pattern: str, type_name: str) -> bool:
    """Does ``type_name`` match ``pattern`` (``*`` = one token, ``>`` = the rest)?"""
    if not _is_pattern(pattern):
        return pattern == type_name
    return _pattern_regex(pattern).match(type_name) is not None


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one consumer group receives: types matching ``patterns`` and ``filters``.

    ``filters`` maps an attribute name (core or extension) to the value it must have;
    a value ending in ``*`` matches by prefix. ``ordered`` asks the transport to hand
    out events with the same ``partitionkey`` one at a time, in publish order.
    """

    group: str
    patterns: tuple[str, ...]
    filters: tuple[tuple[str, str], ...] = ()
    ordered: bool = True

    def matches(self, event: Event) -> bool:
        if not any(matches_pattern(p, event.type) for p in self.patterns):
            return False
        for name, expected in self.filters:
            actual = _attribute(event, name)
            if actual is None:
                return False
            if expected.endswith("*"):
                if not actual.startswith(expected[:-1]):
                    return False
            elif actual != expected:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "patterns": list(self.patterns),
            "filters": [list(f) for f in self.filters],
            "ordered": self.ordered,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Subscription:
        return cls(
            group=str(doc["group"]),
            patterns=tuple(doc["patterns"]),
            filters=tuple((str(a), str(b)) for a, b in doc.get("filters", ())),
            ordered=bool(doc.get("ordered", True)),
        )


def _attribute(event: Event, name: str) -> str | None:
    if name in ("id", "source", "type", "subject", "datacontenttype", "dataschema"):
        value = getattr(event, name)
    else:
        value = event.extensions.get(name)
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed attempts are retried.

    Attempt ``n`` (1-based) that fails waits ``min(cap, base * 2**(n-1))`` seconds
    before the next one; with ``jitter`` the wait is drawn uniformly from the upper
    half of that ("equal jitter"), which spreads retries out while keeping the
    exponential growth. After ``max_attempts`` failed attempts the event is
    dead-lettered.
    """

    max_attempts: int = 5
    base: float = 0.2
    cap: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.base < 0 or self.cap < 0:
            raise DefinitionError("RetryPolicy.base and RetryPolicy.cap must be >= 0 seconds")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``."""
        exponent = min(max(0, attempt - 1), 64)  # past 2**64 every policy is at its cap
        ceiling = float(min(self.cap, self.base * (2.0**exponent)))
        if not self.jitter:
            return ceiling
        return float(random.uniform(ceiling / 2, ceiling))


@dataclass(frozen=True, slots=True)
class EventType:
    """An event type: a name bound to a Pydantic model, and how to key it for ordering."""

    name: str
    model: type[BaseModel]
    version: int = 1
    key: str | KeyFunc | None = None
    description: str = ""

    @property
    def dataschema(self) -> str:
        """The ``dataschema`` its events carry: ``nerve:schema/<name>/<version>``."""
        return dataschema_uri(self.name, self.version)

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of its data, generated from the model (computed once)."""
        return _json_schema(self.model)

    def key_of(self, payload: BaseModel) -> str | None:
        """The partition key of a payload of this type, by the declared ``key``."""
        if self.key is None:
            return None
        value = getattr(payload, self.key) if isinstance(self.key, str) else self.key(payload)
        return None if value is None else str(value)


@lru_cache(maxsize=1024)
def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(mode="validation")


@dataclass(frozen=True, slots=True)
class Function:
    """A declared function: its handler and everything the runtime needs to run it."""

    name: str
    handler: Handler
    subscription: Subscription
    emits: frozenset[str]
    retry: RetryPolicy
    timeout: float | None
    concurrency: int
    key: KeyFunc | None
    description: str = ""
    versions: Mapping[str, int] = field(default_factory=dict)
    """The version read of each type consumed by model class (others: the latest)."""

    def check_emit(self, type_name: str) -> None:
        if type_name not in self.emits:
            declared = ", ".join(sorted(self.emits)) or "nothing"
            raise EmitError(
                f"function {self.name!r} emitted {type_name!r}, but declares emits={declared}; "
                f"add {type_name!r} to its emits=[...]"
            )


TypeRef = str | type[BaseModel]


@dataclass
class App:
    """A nerve application: event types and the functions that react to them.

    ``source`` is the CloudEvents ``source`` of the events this App's functions emit.
    """

    name: str
    source: str = ""
    events: dict[str, EventType] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)
    store_schema: list[str] = field(default_factory=list)
    versions: dict[str, dict[int, EventType]] = field(default_factory=dict)
    """Every declared version of each type (``events`` holds the latest of each)."""
    upcasters: Upcasters = field(default_factory=Upcasters)
    _by_model: dict[type[BaseModel], EventType] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.source:
            self.source = f"/{self.name}"

    # -- event types -----------------------------------------------------------------

    def event(
        self,
        name: str,
        *,
        key: str | KeyFunc | None = None,
        version: int = 1,
        description: str = "",
    ) -> Callable[[M], M]:
        """Class decorator: bind a Pydantic model to the event type ``name``.

        ``key`` is a field name (or a function of the payload) giving the partition key
        that producers set on events of this type, so that consumers handle the events
        of one key in order. ``version`` (from 1) numbers the type's schema: several
        versions of one type can be declared, each with its own model; events carry
        ``dataschema: nerve:schema/<name>/<version>``.
        """
        if not isinstance(name, str) or not _TYPE_NAME.match(name):
            raise DefinitionError(
                f"event type name {name!r} is not valid: use dot-separated words of "
                "letters, digits, '_' or '-', like 'order.created'"
            )

        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DefinitionError(
                f"event type {name!r}: version must be an integer >= 1, got {version!r}"
            )

        def register(model: M) -> M:
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise DefinitionError(f"@app.event({name!r}) must decorate a pydantic BaseModel")
            if version in self.versions.get(name, {}):
                again = "" if version == 1 else f" at version {version}"
                raise DefinitionError(
                    f"event type {name!r} is declared twice{again}; "
                    "give a new schema a new version=..."
                )
            if model in self._by_model:
                raise DefinitionError(
                    f"model {model.__name__} is already bound to {self._by_model[model].name!r}"
                )
            declared_fields = list(model.model_fields)  # type: ignore[call-overload]
            if isinstance(key, str) and key not in declared_fields:
                raise DefinitionError(
                    f"event type {name!r}: key={key!r} is not a field of {model.__name__} "
                    f"(fields: {', '.join(declared_fields)})"
                )
            declared = EventType(name, model, version, key, description or (model.__doc__ or ""))
            self.versions.setdefault(name, {})[version] = declared
            if name not in self.events or self.events[name].version < version:
                self.events[name] = declared
            self._by_model[model] = declared
            return model

        return register

    def event_type(self, ref: TypeRef) -> EventType:
        """Look up a declared event type by name or by model class."""
        if isinstance(ref, str):
            found = self.events.get(ref)
            if found is None:
                raise DefinitionError(self._unknown_type(ref))
            return found
        by_model = self._by_model.get(ref)
        if by_model is None:
            raise DefinitionError(
                f"model {getattr(ref, '__name__', ref)!r} is not declared with @app.event"
            )
        return by_model

    def event_version(self, name: str, version: int) -> EventType:
        """A declared event type at one version."""
        found = self.versions.get(name, {}).get(version)
        if found is None:
            known = ", ".join(map(str, sorted(self.versions.get(name, {})))) or "none"
            raise DefinitionError(
                f"event type {name!r} has no version {version} (declared versions: {known})"
            )
        return found

    def upcaster(self, name: str, from_version: int, to_version: int) -> Callable[[U], U]:
        """Decorator: ``def up(data: dict) -> dict`` turns the data of ``name`` at
        ``from_version`` into its data at ``to_version``, so a function reading the
        later version receives events written at the earlier one (chains compose:
        v1 -> v2 -> v3). The earlier version need not be declared any more."""
        if name not in self.versions:
            raise DefinitionError(f"upcaster: {self._unknown_type(name)}")

        def register(fn: U) -> U:
            if not callable(fn) or inspect.iscoroutinefunction(fn):
                raise DefinitionError(
                    f"upcaster {name!r} {from_version} -> {to_version}: use a plain "
                    "'def up(data: dict) -> dict' (no I/O, not async)"
                )
            try:
                self.upcasters.add(name, from_version, to_version, fn)
            except ValueError as exc:
                raise DefinitionError(f"upcaster for {name!r}: {exc}") from None
            return fn

        return register

    def _unknown_type(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.events), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"event type {name!r} is not declared (declare it with @app.event({name!r})){hint}"

    # -- functions -------------------------------------------------------------------

    def function(
        self,
        consumes: TypeRef | Sequence[TypeRef],
        *,
        emits: Iterable[TypeRef] = (),
        name: str | None = None,
        where: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = 30.0,
        concurrency: int = 16,
        key: KeyFunc | None = None,
        ordered: bool = True,
        description: str = "",
    ) -> Callable[[H], H]:
        """Decorator: declare ``async def handler(payload, ctx)`` as a function.

        - ``consumes``: event type names, patterns (``order.*``) or model classes.
        - ``emits``: every event type the handler may emit (anything else is refused).
        - ``where``: attribute filters, ``{"subject": "eu-*"}``.
        - ``retry``: a :class:`RetryPolicy`; ``timeout``: seconds per attempt.
        - ``concurrency``: at most this many events in flight for this function.
        - ``key``: the ordering key as a function of the payload; by default the
          event's ``partitionkey``. ``ordered=False`` gives up ordering for throughput.
        """
        refs: Sequence[TypeRef] = [consumes] if isinstance(consumes, str | type) else list(consumes)

        def register(handler: H) -> H:
            fname = name or handler.__name__
            where_ = f"function {fname!r}"
            if not _FUNCTION_NAME.match(fname):
                raise DefinitionError(
                    f"{where_}: names are letters, digits, '_' or '-', starting with a letter"
                )
            if fname in self.functions:
                raise DefinitionError(f"{where_} is declared twice; give one a name=...")
            is_async = inspect.iscoroutinefunction(handler)
            if not is_async:
                raise DefinitionError(
                    f"{where_}: the handler must be 'async def {fname}(event, ctx)'"
                )
            if not refs:
                raise DefinitionError(f"{where_} consumes nothing; pass consumes=...")
            patterns: list[str] = []
            for ref in refs:
                if isinstance(ref, str) and _is_pattern(ref):
                    if not _PATTERN.match(ref):
                        raise DefinitionError(
                            f"{where_}: pattern {ref!r} is not valid ('*' stands for one "
                            "token, '>' for the rest and only at the end: 'order.*', 'order.>')"
                        )
                    if not any(matches_pattern(ref, t) for t in self.events):
                        raise DefinitionError(
                            f"{where_}: pattern {ref!r} matches no declared event type"
                        )
                    patterns.append(ref)
                else:
                    try:
                        patterns.append(self.event_type(ref).name)
                    except DefinitionError as exc:
                        raise DefinitionError(f"{where_} consumes {exc}") from None
            pinned = {
                (declared := self.event_type(ref)).name: declared.version
                for ref in refs
                if not isinstance(ref, str)
            }
            emitted: set[str] = set()
            for ref in emits:
                try:
                    emitted.add(self.event_type(ref).name)
                except DefinitionError as exc:
                    raise DefinitionError(f"{where_} emits {exc}") from None
            if retry is not None and not isinstance(retry, RetryPolicy):
                raise DefinitionError(
                    f"{where_}: retry must be a RetryPolicy(max_attempts=..., base=..., cap=...), "
                    f"got {retry!r}"
                )
            if timeout is not None and timeout <= 0:
                raise DefinitionError(f"{where_}: timeout must be > 0 seconds or None")
            if concurrency < 1:
                raise DefinitionError(f"{where_}: concurrency must be >= 1")
            filters = tuple(sorted((str(k), str(v)) for k, v in (where or {}).items()))
            self.functions[fname] = Function(
                name=fname,
                handler=handler,
                subscription=Subscription(fname, tuple(patterns), filters, ordered),
                emits=frozenset(emitted),
                retry=retry or RetryPolicy(),
                timeout=timeout,
                concurrency=concurrency,
                key=key,
                description=description or (handler.__doc__ or "").strip(),
                versions=pinned,
            )
            return handler

        return register

    def store_tables(self, *ddl: str) -> None:
        """Declare SQL run (idempotently: use IF NOT EXISTS) on the store at start-up."""
        self.store_schema.extend(ddl)

    # -- producing events ------------------------------------------------------------

    def make_event(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        type: str | None = None,
        source: str | None = None,
        subject: str | None = None,
        key: str | None = None,
        extensions: Mapping[str, str | int | bool] | None = None,
        version: int | None = None,
    ) -> Event:
        """Build a validated event of a declared type from a payload.

        ``payload`` is an instance of the type's model, or a mapping validated against
        it (a :class:`pydantic.ValidationError` says which field is wrong), at
        ``version`` (default: the model's version, or the latest for a mapping). The
        partition key comes from ``key``, else from the type's declared key.
        """
        if isinstance(payload, BaseModel):
            declared = self._by_model.get(payload.__class__) or self.event_type(
                type or payload.__class__
            )
            if (type is not None and declared.name != type) or not isinstance(
                payload, declared.model
            ):
                declared = self.event_type(type or payload.__class__)
                raise DefinitionError(
                    f"payload is a {payload.__class__.__name__}, but {declared.name!r} "
                    f"carries {declared.model.__name__}"
                )
            model = payload
        else:
            if type is None:
                raise DefinitionError("make_event(mapping) needs type='event.type'")
            declared = (
                self.event_type(type) if version is None else self.event_version(type, version)
            )
            model = declared.model.model_validate(payload)
        exts: dict[str, str | int | bool] = dict(extensions or {})
        partition = key if key is not None else declared.key_of(model)
        if partition is not None:
            exts["partitionkey"] = partition
        return Event(
            type=declared.name,
            source=source or self.source,
            subject=subject,
            dataschema=declared.dataschema,
            data=model.model_dump(mode="json"),
            extensions=exts,
        )

    def readers(self, function: Function) -> dict[str, EventReader]:
        """For each declared type, how ``function`` reads its events: at the version
        it consumes (by model class), else the latest, upcasting older ones."""
        out: dict[str, EventReader] = {}
        for name, latest in self.events.items():
            declared = self.versions[name].get(function.versions.get(name, 0), latest)
            out[name] = EventReader(name, declared.version, declared.model, self.upcasters)
        return out

    def declared_for(self, event: Event) -> EventType | None:
        """The declared type and version an event says it carries (its
        ``dataschema``), else the latest version of its type; None if undeclared."""
        versions = self.versions.get(event.type)
        if not versions:
            return None
        if event.dataschema is not None:
            for declared in versions.values():
                if declared.dataschema == event.dataschema:
                    return declared
        return self.events[event.type]

    def subscriptions(self) -> list[Subscription]:
        return [f.subscription for f in self.functions.values()]
