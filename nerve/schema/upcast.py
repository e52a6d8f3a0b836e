"""Versions on the wire, and upcasting old events to the version a function reads.

Every event nerve publishes names the schema of its data in the CloudEvents
``dataschema`` attribute, as ``nerve:schema/<type>/<version>`` (for example
``nerve:schema/order.created/2``): an absolute URI in nerve's own scheme, so it never
collides with a foreign producer's ``https://`` schema address, and ``nerve schema
show <type> --version <n>`` prints the document it names.

A consumer reads each event type at one version (the one its handler takes). An event
written at an older version is *upcast*: registered upcaster functions turn its data
(a JSON object) step by step into the version read (v1 -> v2 -> v3), then the data is
validated against the model. Steps with no upcaster are left to compatibility: the data
is validated as it is (a BACKWARD-compatible change needs no upcaster). An event of a
newer version than the one read, one with no ``dataschema`` or with a foreign one, is
validated as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from nerve.errors import NerveError

__all__ = [
    "DATASCHEMA_PREFIX",
    "EventReader",
    "UpcastError",
    "Upcaster",
    "Upcasters",
    "dataschema_uri",
    "parse_dataschema",
]

DATASCHEMA_PREFIX = "nerve:schema/"
_DATASCHEMA = re.compile(r"^nerve:schema/(?P<type>[^/]+)/(?P<version>[1-9][0-9]{0,8})$")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""``def up(data: dict) -> dict``: the data of version ``n`` as version ``n + k``."""


def dataschema_uri(type_name: str, version: int) -> str:
    """The ``dataschema`` of events of ``type_name`` at ``version``."""
    return f"{DATASCHEMA_PREFIX}{type_name}/{version}"


def parse_dataschema(uri: str | None) -> tuple[str, int] | None:
    """``(type, version)`` from a nerve ``dataschema``; None for anything else."""
    if uri is None:
        return None
    found = _DATASCHEMA.match(uri)
    if found is None:
        return None
    return found["type"], int(found["version"])


class UpcastError(NerveError):
    """An upcaster failed or returned something that is not a JSON object."""


@dataclass
class Upcasters:
    """Upcaster functions per event type: ``(type, from_version) -> (to_version, fn)``."""

    steps: dict[tuple[str, int], tuple[int, Upcaster]] = field(default_factory=dict)

    def add(self, type_name: str, from_version: int, to_version: int, fn: Upcaster) -> None:
        if from_version < 1 or to_version <= from_version:
            raise ValueError(
                f"an upcaster goes from a version to a later one, got {from_version} -> "
                f"{to_version}"
            )
        if (type_name, from_version) in self.steps:
            to, _ = self.steps[(type_name, from_version)]
            raise ValueError(
                f"{type_name!r} already has an upcaster from version {from_version} (to {to})"
            )
        self.steps[(type_name, from_version)] = (to_version, fn)

    def chain(
        self, type_name: str, from_version: int, to_version: int
    ) -> list[tuple[int, int, Upcaster]]:
        """The upcasters that take data from ``from_version`` towards ``to_version``,
        as far as registered steps go without passing it."""
        out: list[tuple[int, int, Upcaster]] = []
        at = from_version
        while at < to_version:
            step = self.steps.get((type_name, at))
            if step is None or step[0] > to_version:
                break
            out.append((at, step[0], step[1]))
            at = step[0]
        return out

    def for_type(self, type_name: str) -> list[tuple[int, int]]:
        return sorted((f, to) for (t, f), (to, _) in self.steps.items() if t == type_name)


class EventReader:
    """Turns the data of events of one type, at any version, into the model read.

    Built once per (function, type); :meth:`read` is on the hot path: an event at the
    version read costs one string comparison more than plain validation, and the
    upcaster chain of each other ``dataschema`` is worked out once and cached.
    """

    __slots__ = ("_chains", "dataschema", "model", "type_name", "upcasters", "validate", "version")

    def __init__(
        self, type_name: str, version: int, model: type[BaseModel], upcasters: Upcasters
    ) -> None:
        self.type_name = type_name
        self.version = version
        self.model = model
        self.upcasters = upcasters
        self.dataschema = dataschema_uri(type_name, version)
        self._chains: dict[str, list[tuple[int, int, Upcaster]]] = {}
        self.validate = validator_for(model)
        """The model's validator: :meth:`read` of data at the version read (the runner
        calls it itself then, one Python call less an event)."""

    def read(self, data: Any, dataschema: str | None) -> BaseModel:
        """The payload as the model read; raises :class:`pydantic.ValidationError`
        (data does not validate) or :class:`UpcastError` (an upcaster failed)."""
        if dataschema is None or dataschema == self.dataschema:
            return self.validate(data)
        chain = self._chains.get(dataschema)
        if chain is None:
            chain = self._chain(dataschema)
        for from_version, to_version, upcaster in chain:
            if not isinstance(data, dict):
                raise UpcastError(
                    f"{self.type_name!r} version {from_version} data is a "
                    f"{type(data).__name__}, not a JSON object: it cannot be upcast"
                )
            try:
                data = upcaster(dict(data))
            except Exception as exc:
                raise UpcastError(
                    f"upcasting {self.type_name!r} from version {from_version} to "
                    f"{to_version} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(data, dict):
                raise UpcastError(
                    f"the upcaster of {self.type_name!r} {from_version} -> {to_version} "
                    f"returned a {type(data).__name__}; it must return a dict"
                )
        return self.validate(data)

    def _chain(self, dataschema: str) -> list[tuple[int, int, Upcaster]]:
        parsed = parse_dataschema(dataschema)
        chain: list[tuple[int, int, Upcaster]] = []
        if parsed is not None and parsed[0] == self.type_name and parsed[1] < self.version:
            chain = self.upcasters.chain(self.type_name, parsed[1], self.version)
        if len(self._chains) < 256:  # foreign dataschemas must not grow this forever
            self._chains[dataschema] = chain
        return chain


def validator_for(model: type[BaseModel]) -> Callable[[Any], BaseModel]:
    """``model.model_validate`` without its keyword handling, which costs here about
    as much as the validation of a small model itself. A model whose schema is not
    built yet (forward references), or that overrides ``model_validate``, keeps it."""
    if (
        getattr(model, "__pydantic_complete__", False)
        and getattr(model.model_validate, "__func__", None) is _MODEL_VALIDATE
    ):
        validate: Callable[[Any], BaseModel] = model.__pydantic_validator__.validate_python
        return validate
    return model.model_validate


_MODEL_VALIDATE = BaseModel.model_validate.__func__  # type: ignore[attr-defined]
