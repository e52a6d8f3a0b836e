"""Schema compatibility: can a reader of one JSON Schema read what a writer of another wrote?

The modes are Confluent Schema Registry's, with its meaning of each:

==================== =================================================================
``BACKWARD``         the new schema reads data written with the latest older one
``BACKWARD_TRANSITIVE`` ... with every older one
``FORWARD``          the latest older schema reads data written with the new one
``FORWARD_TRANSITIVE`` every older schema reads data written with the new one
``FULL``             BACKWARD and FORWARD against the latest older one
``FULL_TRANSITIVE``  BACKWARD and FORWARD against every older one
``NONE``             no check
==================== =================================================================

"Reads" means inclusion of languages: every instance valid under the writer's schema
is valid under the reader's. :func:`check_readable` proves that structurally and is
*sound*: when it reports nothing, inclusion holds (a property test checks this with
generated instances); when it cannot prove inclusion (a keyword it does not reason
about, a ``pattern`` that changed) it reports a finding rather than guessing.

Open and closed content models
------------------------------
A JSON object schema without ``additionalProperties`` is *open*: an instance may carry
any other property, with any value. Read literally (``content="strict"``, what
Confluent does), adding even an optional property to an open model is not backward
compatible, since old data may already hold that name with another type; only a
closed model (``additionalProperties: false``, Pydantic's ``extra="forbid"``) may
gain optional properties freely.

nerve's default (``content="nerve"``) reads the schemas as what they are in nerve:
generated from Pydantic models. A model with Pydantic's default ``extra="ignore"``
has no ``additionalProperties`` in its schema; as a *writer* it never writes a
property it does not declare (nerve serialises payloads through the model), so on the
writer side it is treated as closed; as a *reader* it ignores unknown properties, so
on the reader side it stays open. ``extra="allow"`` (``additionalProperties: true``)
is open on both sides and ``extra="forbid"`` closed on both. Only object schemas that
declare ``properties`` (models) get this reading; a ``dict`` field always states its
``additionalProperties``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import jsonschema
import orjson

from nerve.errors import NerveError

__all__ = [
    "Compatibility",
    "Finding",
    "IncompatibleSchema",
    "check_compatibility",
    "check_readable",
    "close_for_writing",
    "render_findings",
]

Schema = Mapping[str, Any] | bool
ContentModel = Literal["nerve", "strict"]


class Compatibility(StrEnum):
    """A subject's compatibility mode, as Confluent Schema Registry defines them."""

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def backward(self) -> bool:
        """New readers must read old data."""
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def forward(self) -> bool:
        """Old readers must read new data."""
        return self.value.startswith(("FORWARD", "FULL"))

    @classmethod
    def parse(cls, value: str) -> Compatibility:
        try:
            return cls(value.strip().upper().replace("-", "_"))
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown compatibility mode {value!r}; use one of {names}") from None


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason a reader cannot read what a writer wrote.

    ``path`` locates the field (``/lines/items/qty``; ``/`` is the payload itself),
    ``rule`` names the broken rule (``required-added``, ``type-narrowed`` ...),
    ``old``/``new`` are the writer's and reader's side of it. ``direction`` is
    ``backward`` (the new schema cannot read old data) or ``forward`` (old readers
    cannot read new data) and ``version`` the version it conflicts with, once known.
    """

    path: str
    rule: str
    message: str
    old: Any = None
    new: Any = None
    direction: str = "backward"
    version: int | None = None

    def describe(self) -> str:
        against = f" (conflicts with version {self.version})" if self.version is not None else ""
        return f"{self.path}: {self.rule}: {self.message}{against}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rule": self.rule,
            "message": self.message,
            "old": self.old,
            "new": self.new,
            "direction": self.direction,
            "version": self.version,
        }


class IncompatibleSchema(NerveError):
    """A schema breaks its subject's compatibility mode; ``findings`` say where and how."""

    def __init__(
        self,
        subject: str,
        version: int,
        mode: str,
        findings: Sequence[Finding],
        hint: str = "",
    ) -> None:
        self.subject = subject
        self.version = version
        self.mode = mode
        self.findings = list(findings)
        first = self.findings[0].describe() if self.findings else "no details"
        more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        tail = f"; {hint}" if hint else ""
        super().__init__(
            f"version {version} of {subject!r} breaks {mode} compatibility: {first}{more}{tail}"
        )

    def diff(self) -> str:
        return render_findings(self.findings)


def render_findings(findings: Sequence[Finding]) -> str:
    """A readable diff: one ``- old`` / ``+ new`` block per finding."""
    lines: list[str] = []
    for f in findings:
        against = f", conflicts with version {f.version}" if f.version is not None else ""
        lines.append(f"{f.path}  [{f.rule}, {f.direction}{against}]")
        lines.append(f"    {f.message}")
        if f.old is not None:
            lines.append(f"  - {_short(f.old)}")
        if f.new is not None:
            lines.append(f"  + {_short(f.new)}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 160) -> str:
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Modes


def check_compatibility(
    candidate: Schema,
    previous: Sequence[tuple[int, Schema]],
    mode: Compatibility | str,
    *,
    content: ContentModel = "nerve",
) -> list[Finding]:
    """Check ``candidate`` against ``previous`` (``(version, schema)``, oldest first)
    under ``mode``; non-transitive modes look at the last one only. Returns findings
    (empty: compatible), each naming the version it conflicts with."""
    mode = Compatibility.parse(mode) if isinstance(mode, str) else mode
    if mode is Compatibility.NONE or not previous:
        return []
    against = previous if mode.transitive else previous[-1:]
    findings: list[Finding] = []
    for version, old in against:
        if mode.backward:
            for f in check_readable(old, candidate, content=content):
                findings.append(_tag(f, "backward", version))
        if mode.forward:
            for f in check_readable(candidate, old, content=content):
                findings.append(_tag(f, "forward", version))
    return findings


def _tag(f: Finding, direction: str, version: int) -> Finding:
    if direction == "forward":  # the writer is the new schema: swap sides for the reader
        return Finding(f.path, f.rule, f.message, f.new, f.old, direction, version)
    return Finding(f.path, f.rule, f.message, f.old, f.new, direction, version)


# ---------------------------------------------------------------------------------------
# The inclusion check

_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "$defs",
        "definitions",
        "discriminator",
        "contentMediaType",
        "contentEncoding",
    }
)
_HANDLED = frozenset(
    {
        "type",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
    }
)
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
_ALL_TYPES = frozenset(_TYPES)


@dataclass
class _Walk:
    writer_root: Schema
    reader_root: Schema
    content: ContentModel
    assumed: set[tuple[int, int]] = field(default_factory=set)
    _reader_root_validator: jsonschema.protocols.Validator | None = None

    def reader_validator(self, schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
        """A validator for ``schema``, a part of the reader, whose ``$ref``s resolve
        against the reader's root (``#`` is the whole reader, not ``schema``)."""
        if self._reader_root_validator is None:
            self._reader_root_validator = jsonschema.Draft202012Validator(self.reader_root)
        return self._reader_root_validator.evolve(schema=schema)

    def resolve(self, schema: Schema, root: Schema) -> Schema:
        seen = 0
        while isinstance(schema, Mapping) and "$ref" in schema:
            ref = schema["$ref"]
            target = _resolve_ref(root, ref)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            seen += 1
            if seen > 64:
                raise ValueError(f"$ref chain too long at {ref!r}")
            if any(k not in _ANNOTATIONS for k in rest):
                # $ref beside constraints: both apply (JSON Schema 2020-12)
                return {"allOf": [target, rest]}
            schema = target
        return schema


def _resolve_ref(root: Schema, ref: str) -> Schema:
    if not ref.startswith("#"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    node: Any = root
    for token in ref[1:].split("/")[1:] if ref != "#" else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or token not in node:
            raise ValueError(f"$ref {ref!r} points at nothing")
        node = node[token]
    if not isinstance(node, Mapping | bool):
        raise ValueError(f"$ref {ref!r} is not a schema")
    return node


def check_readable(
    writer: Schema, reader: Schema, *, content: ContentModel = "nerve"
) -> list[Finding]:
    """Why data valid under ``writer`` may be invalid under ``reader`` (empty: never).

    ``content`` picks how an object schema without ``additionalProperties`` is read on
    the writer side (see the module docs): ``"nerve"`` closed, ``"strict"`` open.
    """
    walk = _Walk(writer, reader, content)
    return list(_readable(walk, writer, reader, "/"))


def _join(path: str, *parts: str) -> str:
    tail = "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)
    return path + tail if path.endswith("/") else path + "/" + tail


def _is_universal(schema: Schema) -> bool:
    if schema is True:
        return True
    return isinstance(schema, Mapping) and all(k in _ANNOTATIONS for k in schema)


def _types(schema: Mapping[str, Any]) -> frozenset[str]:
    declared = schema.get("type")
    if declared is None:
        return _ALL_TYPES
    names = {declared} if isinstance(declared, str) else set(declared)
    if "number" in names:
        names.add("integer")
    return frozenset(names)


def _readable(walk: _Walk, w: Schema, r: Schema, path: str) -> Iterator[Finding]:
    w = walk.resolve(w, walk.writer_root)
    r = walk.resolve(r, walk.reader_root)
    if w is False or _is_universal(r):
        return
    if r is False:
        yield Finding(path, "forbidden", "the reader accepts nothing here", w, r)
        return
    if w is True:
        w = {}
    assert isinstance(w, Mapping) and isinstance(r, Mapping)
    key = (id(w), id(r))
    if key in walk.assumed:  # recursive models: assume what we are proving (coinduction)
        return
    walk.assumed.add(key)
    try:
        yield from _readable_mapping(walk, w, r, path)
    finally:
        walk.assumed.discard(key)


def _readable_mapping(
    walk: _Walk, w: Mapping[str, Any], r: Mapping[str, Any], path: str
) -> Iterator[Finding]:
    # The writer's alternatives: each one must be readable.
    for keyword in ("anyOf", "oneOf"):
        if keyword in w:
            for branch in w[keyword]:
                yield from _readable(walk, branch, r, path)
            return
    if "allOf" in w:
        parts = list(w["allOf"])
        base = _without(w, ("allOf",))
        if not _is_universal(base):
            parts.append(base)
        # data valid under the writer is valid under every part; one part that the
        # reader reads is enough.
        tried = [list(_readable(walk, p, r, path)) for p in parts]
        if not any(not found for found in tried):
            yield from min(tried, key=len)
        return
    # The reader's combinators.
    if "allOf" in r:
        for part in r["allOf"]:
            yield from _readable(walk, w, part, path)
        rest = _without(r, ("allOf",))
        if not _is_universal(rest):
            yield from _readable(walk, w, rest, path)
        return
    for keyword in ("anyOf", "oneOf"):
        if keyword in r:
            yield from _readable_alternatives(walk, w, r, keyword, path)
            return
    if "enum" in w or "const" in w:
        values = list(w["enum"]) if "enum" in w else [w["const"]]
        validator = walk.reader_validator(r)
        for value in values:
            if not validator.is_valid(value):
                yield Finding(path, "value-removed", f"{_short(value)} is no longer valid", value)
        return
    if "enum" in r or "const" in r:
        allowed = list(r["enum"]) if "enum" in r else [r["const"]]
        yield Finding(path, "enum-added", "the reader accepts only listed values", None, allowed)
        return
    for keyword in r:
        if keyword not in _HANDLED and keyword not in _ANNOTATIONS:
            if keyword in _CONTEXTUAL:
                if not _is_universal(r[keyword]):
                    yield Finding(
                        path,
                        "unsupported-keyword",
                        f"cannot prove {keyword!r} is satisfied; what it constrains depends "
                        "on the keywords around it, which nerve does not reason about",
                        w.get(keyword),
                        r[keyword],
                    )
                continue
            if not _same_constraint(w.get(keyword), r[keyword]):
                yield Finding(
                    path,
                    "unsupported-keyword",
                    f"cannot prove {keyword!r} is satisfied; nerve does not reason about it",
                    w.get(keyword),
                    r[keyword],
                )
    wtypes, rtypes = _types(w), _types(r)
    lost = sorted(wtypes - rtypes, key=_TYPES.index)
    if lost:
        yield Finding(
            path,
            "type-narrowed",
            f"type {', '.join(lost)} is no longer accepted",
            sorted(wtypes, key=_TYPES.index),
            sorted(rtypes, key=_TYPES.index),
        )
    shared = wtypes & rtypes
    if shared & {"integer", "number"}:
        yield from _numbers(w, r, path, integer_only="number" not in shared)
    if "string" in shared:
        yield from _strings(w, r, path)
    if "array" in shared:
        yield from _arrays(walk, w, r, path)
    if "object" in shared:
        yield from _objects(walk, w, r, path)


# Keywords whose constraint depends on their siblings (which properties or items the
# others evaluated): the same value in writer and reader is not the same constraint.
_CONTEXTUAL = frozenset({"unevaluatedProperties", "unevaluatedItems", "additionalItems"})
_REFS = (b'"$ref"', b'"$dynamicRef"', b'"$recursiveRef"')


def _same_constraint(w_value: Any, r_value: Any) -> bool:
    """A keyword nerve does not reason about holds for the writer's data when the
    writer states it with the same value, unless it refers elsewhere (a ``$ref`` means
    something else in each schema)."""
    if w_value != r_value:
        return False
    text = orjson.dumps(r_value)
    return not any(ref in text for ref in _REFS)


def _readable_alternatives(
    walk: _Walk, w: Mapping[str, Any], r: Mapping[str, Any], keyword: str, path: str
) -> Iterator[Finding]:
    rest = _without(r, (keyword,))
    if not _is_universal(rest):
        yield from _readable(walk, w, rest, path)
    branches = list(r[keyword])
    best: list[Finding] | None = None
    fits: list[int] = []
    for index, branch in enumerate(branches):
        found = list(_readable(walk, w, branch, path))
        if not found:
            fits.append(index)
        elif best is None or len(found) < len(best):
            best = found
    if not fits and "type" in w and len(_types(w)) > 1:
        # {"type": ["integer", "null"]} against anyOf [integer, null]: split by type
        split = [
            [list(_readable(walk, {**w, "type": t}, b, path)) for b in branches]
            for t in sorted(_types(w) - ({"integer"} if "number" in _types(w) else set()))
        ]
        if all(any(not found for found in per_type) for per_type in split):
            fits = [-1]
    if not fits:
        yield Finding(
            path,
            "no-matching-alternative",
            f"no alternative of the reader's {keyword} accepts everything the writer writes",
            _strip(w),
            [_strip(b) if isinstance(b, Mapping) else b for b in branches],
        )
        return
    # oneOf also needs the others to reject the data: only provable for a tagged union
    # (each branch pins a required property to different values).
    resolved = [walk.resolve(b, walk.reader_root) for b in branches]
    if keyword == "oneOf" and len(branches) > 1 and not _disjoint(walk, resolved):
        yield Finding(
            path,
            "ambiguous-oneOf",
            "the reader's oneOf has branches nerve cannot prove disjoint",
            None,
            [_strip(b) if isinstance(b, Mapping) else b for b in branches],
        )


def _disjoint(walk: _Walk, branches: Sequence[Schema]) -> bool:
    tags: list[dict[str, frozenset[str]]] = []
    for branch in branches:
        if not isinstance(branch, Mapping):
            return False
        pinned: dict[str, frozenset[str]] = {}
        required = set(branch.get("required", ()))
        for name, prop in (branch.get("properties") or {}).items():
            prop = walk.resolve(prop, walk.reader_root)
            if name in required and isinstance(prop, Mapping):
                if "const" in prop:
                    pinned[name] = frozenset([orjson.dumps(prop["const"]).decode()])
                elif "enum" in prop:
                    pinned[name] = frozenset(orjson.dumps(v).decode() for v in prop["enum"])
        tags.append(pinned)
    for i, a in enumerate(tags):
        for b in tags[i + 1 :]:
            if not any(name in b and not (a[name] & b[name]) for name in a):
                return False
    return True


def _without(schema: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    drop = set(keys)
    return {k: v for k, v in schema.items() if k not in drop}


def _strip(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in _ANNOTATIONS}


# -- numbers -----------------------------------------------------------------------------


def _bound(schema: Mapping[str, Any], side: str) -> tuple[float, bool]:
    """The lower (``side='min'``) or upper bound and whether it is exclusive."""
    inclusive = schema.get("minimum" if side == "min" else "maximum")
    exclusive = schema.get("exclusiveMinimum" if side == "min" else "exclusiveMaximum")
    none = -math.inf if side == "min" else math.inf
    best: tuple[float, bool] = (none, False)
    if isinstance(inclusive, int | float) and not isinstance(inclusive, bool):
        best = (float(inclusive), False)
    if isinstance(exclusive, int | float) and not isinstance(exclusive, bool):
        value = float(exclusive)
        tighter = value >= best[0] if side == "min" else value <= best[0]
        if tighter:
            best = (value, True)
    return best


def _numbers(
    w: Mapping[str, Any], r: Mapping[str, Any], path: str, *, integer_only: bool
) -> Iterator[Finding]:
    for side, name in (("min", "lower bound"), ("max", "upper bound")):
        wv, wx = _bound(w, side)
        rv, rx = _bound(r, side)
        if integer_only:  # for integers, > n is >= n + 1
            wv, wx = _integer_bound(wv, wx, side)
            rv, rx = _integer_bound(rv, rx, side)
        if side == "min":
            ok = wv > rv or (wv == rv and (wx or not rx))
        else:
            ok = wv < rv or (wv == rv and (wx or not rx))
        if not ok:
            yield Finding(
                path,
                "minimum-raised" if side == "min" else "maximum-lowered",
                f"the {name} got tighter",
                _bound_doc(wv, wx, side),
                _bound_doc(rv, rx, side),
            )
    rm = r.get("multipleOf")
    if rm is not None:
        wm = w.get("multipleOf")
        divides = wm is not None and _multiple(wm, rm)
        if not divides and not (integer_only and _multiple(1, rm)):
            yield Finding(path, "multiple-of-changed", f"values must be a multiple of {rm}", wm, rm)


def _integer_bound(value: float, exclusive: bool, side: str) -> tuple[float, bool]:
    if math.isinf(value):
        return value, False
    if side == "min":
        moved = exclusive or value != math.floor(value)
        return (math.floor(value) + 1.0 if moved else value), False
    moved = exclusive or value != math.ceil(value)
    return (math.ceil(value) - 1.0 if moved else value), False


def _bound_doc(value: float, exclusive: bool, side: str) -> dict[str, float] | None:
    if math.isinf(value):
        return None
    key = (
        ("exclusiveMinimum" if exclusive else "minimum")
        if side == "min"
        else ("exclusiveMaximum" if exclusive else "maximum")
    )
    return {key: int(value) if value.is_integer() else value}


def _multiple(value: float, of: float) -> bool:
    """Is every multiple of ``value`` a multiple of ``of``? Exact for integers; for
    floats only when equal (float division would make anything else a guess)."""
    if value == of:
        return True
    if isinstance(value, int) and isinstance(of, int) and of > 0:
        return value % of == 0
    return False


# -- strings -----------------------------------------------------------------------------


def _strings(w: Mapping[str, Any], r: Mapping[str, Any], path: str) -> Iterator[Finding]:
    yield from _length(w, r, path, "minLength", "maxLength", "length")
    for keyword in ("pattern", "format"):
        if keyword in r and w.get(keyword) != r[keyword]:
            yield Finding(
                path,
                f"{keyword}-changed",
                f"the reader requires {keyword} {r[keyword]!r}",
                w.get(keyword),
                r[keyword],
            )


def _length(
    w: Mapping[str, Any], r: Mapping[str, Any], path: str, low: str, high: str, what: str
) -> Iterator[Finding]:
    if low in r and w.get(low, 0) < r[low]:
        yield Finding(path, f"{low}-raised", f"the minimum {what} went up", w.get(low), r[low])
    if high in r and w.get(high, math.inf) > r[high]:
        yield Finding(
            path, f"{high}-lowered", f"the maximum {what} went down", w.get(high), r[high]
        )


# -- arrays ------------------------------------------------------------------------------


def _arrays(
    walk: _Walk, w: Mapping[str, Any], r: Mapping[str, Any], path: str
) -> Iterator[Finding]:
    yield from _length(w, r, path, "minItems", "maxItems", "number of items")
    if r.get("uniqueItems") is True and w.get("uniqueItems") is not True:
        yield Finding(path, "unique-items-added", "the reader requires unique items", None, True)
    wp, rp = list(w.get("prefixItems", ())), list(r.get("prefixItems", ()))
    w_items: Schema = w.get("items", True)
    r_items: Schema = r.get("items", True)
    for index in range(max(len(wp), len(rp))):
        ws = wp[index] if index < len(wp) else w_items
        rs = rp[index] if index < len(rp) else r_items
        yield from _readable(walk, ws, rs, _join(path, str(index)))
    yield from _readable(walk, w_items, r_items, _join(path, "items"))


# -- objects -----------------------------------------------------------------------------


def _writer_additional(walk: _Walk, w: Mapping[str, Any], *, patterns: bool = True) -> Schema:
    """What the writer may write under a name its ``properties`` do not declare
    (``patterns=False``: nor its ``patternProperties`` match)."""
    extra: Schema
    if "additionalProperties" in w:
        extra = w["additionalProperties"]
    else:  # a model: nerve writes only the properties it declares
        extra = not (walk.content == "nerve" and _is_model(w))
    matched: Mapping[str, Schema] = (w.get("patternProperties") or {}) if patterns else {}
    if not matched or _is_universal(extra):
        return extra
    # A name matching a pattern takes that pattern's schema and escapes
    # additionalProperties: the value is valid under one of them (nerve does not
    # reason about which names match which pattern).
    branches = [s for s in (*matched.values(), extra) if s is not False]
    if not branches:
        return False
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _writer_named(walk: _Walk, w: Mapping[str, Any], name: str, w_extra: Schema) -> Schema:
    """What the writer may write under ``name``, which its ``properties`` do not
    declare: the schemas of the patterns it matches (Python's ``re.search``, as the
    ``jsonschema`` library matches them), else additionalProperties. ``w_extra`` (any
    undeclared name) when a pattern does not compile."""
    matching: list[Schema] = []
    for pattern, schema in (w.get("patternProperties") or {}).items():
        try:
            if re.search(pattern, name):
                matching.append(schema)
        except re.error:
            return w_extra
    if not matching:
        return _writer_additional(walk, w, patterns=False)
    return matching[0] if len(matching) == 1 else {"allOf": matching}


def _writer_extra_doc(w: Mapping[str, Any]) -> Any:
    """The writer's side of a finding about its undeclared properties."""
    extra = w.get("additionalProperties", True)
    if not w.get("patternProperties"):
        return extra
    return {"patternProperties": w["patternProperties"], "additionalProperties": extra}


def _is_model(schema: Mapping[str, Any]) -> bool:
    """An object schema generated from a model: declares properties, no patterns."""
    return (
        "properties" in schema
        and "additionalProperties" not in schema
        and "patternProperties" not in schema
    )


def close_for_writing(schema: Schema) -> Schema:
    """``schema`` as nerve reads it on the writer side: every model (an object schema
    with ``properties`` and no ``additionalProperties``) closed. What a nerve producer
    can write is valid under the result."""
    if isinstance(schema, bool):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {k: close_for_writing(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [close_for_writing(v) for v in value]
        elif key in _SCHEMA_ONE and isinstance(value, Mapping | bool):
            out[key] = close_for_writing(value)
        else:
            out[key] = value
    if _is_model(schema):
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_ONE = frozenset({"items", "additionalProperties", "not", "contains", "propertyNames"})


def _objects(
    walk: _Walk, w: Mapping[str, Any], r: Mapping[str, Any], path: str
) -> Iterator[Finding]:
    yield from _length(w, r, path, "minProperties", "maxProperties", "number of properties")
    w_props: Mapping[str, Any] = w.get("properties") or {}
    r_props: Mapping[str, Any] = r.get("properties") or {}
    w_required = set(w.get("required", ()))
    w_extra = _writer_additional(walk, w)
    r_extra: Schema = r.get("additionalProperties", True)
    # The reader's additionalProperties does not apply to names its patternProperties
    # match; when those are the writer's (the unsupported-keyword rule proved them),
    # only the names neither matches meet it.
    w_unmatched = w_extra
    if w.get("patternProperties") and _same_constraint(
        w["patternProperties"], r.get("patternProperties")
    ):
        w_unmatched = _writer_additional(walk, w, patterns=False)
    for name in r.get("required", ()):
        if name not in w_required:
            yield Finding(
                _join(path, name),
                "required-added",
                f"{name!r} is required by the reader but the writer may leave it out",
                None,
                "required",
            )
    for name, r_schema in r_props.items():
        if name in w_props:
            yield from _readable(walk, w_props[name], r_schema, _join(path, name))
            continue
        w_named = _writer_named(walk, w, name, w_extra)
        if w_named is False or _is_universal(r_schema):
            continue  # the writer never writes it, or the reader takes any value
        found = list(_readable(walk, w_named, r_schema, _join(path, name)))
        if found:
            yield Finding(
                _join(path, name),
                "property-added-to-open-model",
                f"{name!r} is new, and the writer's open content model may already "
                "carry it with another value; close the model (extra='forbid') or "
                "accept any value",
                None,
                _strip(r_schema) if isinstance(r_schema, Mapping) else r_schema,
            )
    for name, w_schema in w_props.items():
        if name in r_props:
            continue
        if r_extra is False:
            yield Finding(
                _join(path, name),
                "property-removed-from-closed-model",
                f"the writer writes {name!r}, which the reader's closed model refuses",
                _strip(w_schema) if isinstance(w_schema, Mapping) else w_schema,
                None,
            )
        elif not _is_universal(r_extra):
            yield from _readable(walk, w_schema, r_extra, _join(path, name))
    if w_unmatched is not False and not _is_universal(r_extra):
        if r_extra is False:
            yield Finding(
                path,
                "content-model-closed",
                "the writer may write properties it does not declare, the reader refuses them",
                _writer_extra_doc(w),
                False,
            )
        else:
            yield from _readable(walk, w_unmatched, r_extra, _join(path, "*"))
