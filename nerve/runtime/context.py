"""``ctx``: what a handler receives beside its payload."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from nerve.app import App, Function
from nerve.errors import EmitError
from nerve.event import Event
from nerve.store.sqlite import SqliteStore, SqliteUnit

if TYPE_CHECKING:
    from nerve.observe.tracing import HandlerTrace

logger = logging.getLogger("nerve.function")


class Context:
    """The handler's view of its invocation.

    - ``event``: the envelope (id, source, subject, time, extensions...).
    - ``attempt``: 1 on the first try, then 2, 3...
    - ``store``: the function's transactional store; its writes commit together with
      the record that this event was processed, or not at all.
    - ``emit(payload, ...)``: queue an event; it is published only if the handler
      succeeds (outbox), carrying causation and correlation ids and the trace context.
    - ``log``: a logger bound to the event id, type, function, attempt, correlation id
      (and trace id when tracing is on).
    - ``trace``: this attempt's ``process`` span when tracing is on, else None.
    """

    __slots__ = (
        "_app",
        "_function",
        "_log",
        "_store",
        "_unit",
        "attempt",
        "emitted",
        "event",
        "trace",
    )

    def __init__(
        self, app: App, function: Function, event: Event, attempt: int, store: SqliteStore
    ) -> None:
        self._app = app
        self._function = function
        self.event = event
        self.attempt = attempt
        self._store = store
        self._unit: SqliteUnit | None = None
        """The unit ``store`` made: most handlers never ask for one."""
        self.emitted: list[Event] = []
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self.trace: HandlerTrace | None = None

    @property
    def store(self) -> SqliteUnit:
        unit = self._unit
        if unit is None:
            unit = self._unit = self._store.unit(self._function.name, self.event.id)
        return unit

    @property
    def function(self) -> str:
        return self._function.name

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        if self._log is None:
            self._log = logging.LoggerAdapter(
                logger,
                {
                    "event_id": self.event.id,
                    "event_type": self.event.type,
                    "function": self._function.name,
                    "attempt": self.attempt,
                    "correlation_id": self.correlation_id,
                    "trace_id": None if self.trace is None else self.trace.trace_id,
                },
            )
        return self._log

    @property
    def correlation_id(self) -> str:
        value = self.event.extensions.get("correlationid")
        return self.event.id if value is None else str(value)

    def emit(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        type: str | None = None,
        subject: str | None = None,
        key: str | None = None,
        extensions: Mapping[str, str | int | bool] | None = None,
    ) -> Event:
        """Queue an event of a type this function declares in ``emits``.

        The partition key defaults to the type's declared key, else to the incoming
        event's key, so one flow (an order) stays on one key. Raises
        :class:`~nerve.errors.EmitError` for an undeclared type.
        """
        if type is not None:
            type_name = type
        elif isinstance(payload, BaseModel):
            type_name = self._app.event_type(payload.__class__).name
        else:
            raise EmitError("ctx.emit(mapping) needs type='event.type'")
        self._function.check_emit(type_name)
        exts: dict[str, str | int | bool] = {
            "causationid": self.event.id,
            "correlationid": self.correlation_id,
        }
        if self.trace is not None:
            exts.update(self.trace.emitting(type_name))
        else:
            for name in ("traceparent", "tracestate"):
                value = self.event.extensions.get(name)
                if value is not None:
                    exts[name] = value
        exts.update(extensions or {})
        declared = (
            self._app.event_type(payload.__class__)
            if isinstance(payload, BaseModel)
            else self._app.events[type_name]
        )
        if key is None and declared.key is None:
            key = self.event.partitionkey
        event = self._app.make_event(
            payload, type=type_name, subject=subject, key=key, extensions=exts
        )
        self.emitted.append(event)
        return event
