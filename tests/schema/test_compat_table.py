"""Hand-written compatibility cases, each with its verdict under every mode."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from nerve.schema import (
    Compatibility,
    IncompatibleSchema,
    check_compatibility,
    check_readable,
    render_findings,
)

ALL_MODES = list(Compatibility)


def obj(props: dict[str, Any], required: tuple[str, ...] = (), extra: Any = None) -> dict[str, Any]:
    """An object schema; ``extra=None`` leaves additionalProperties out (a pydantic
    default model), ``False`` closes it, ``True`` opens it explicitly."""
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": list(required)}
    if extra is not None:
        schema["additionalProperties"] = extra
    return schema


INT = {"type": "integer"}
STR = {"type": "string"}

# (name, old, new, backward holds, forward holds, a rule the failing side must name)
CASES: list[tuple[str, Any, Any, bool, bool, str | None]] = [
    ("identical", obj({"a": INT}, ("a",)), obj({"a": INT}, ("a",)), True, True, None),
    (
        "optional added to a closed model",
        obj({"a": INT}, ("a",), extra=False),
        obj({"a": INT, "b": STR}, ("a",), extra=False),
        True,
        False,
        "property-removed-from-closed-model",
    ),
    (
        "optional added to an open model (extra='allow')",
        obj({"a": INT}, ("a",), extra=True),
        obj({"a": INT, "b": STR}, ("a",), extra=True),
        False,
        True,
        "property-added-to-open-model",
    ),
    (
        "optional added to a pydantic default model (nerve reading)",
        obj({"a": INT}, ("a",)),
        obj({"a": INT, "b": STR}, ("a",)),
        True,
        True,
        None,
    ),
    (
        "required added",
        obj({"a": INT}, ("a",)),
        obj({"a": INT, "b": STR}, ("a", "b")),
        False,
        True,
        "required-added",
    ),
    (
        "required removed",
        obj({"a": INT, "b": STR}, ("a", "b")),
        obj({"a": INT}, ("a",)),
        True,
        False,
        "required-added",
    ),
    (
        "type changed",
        obj({"a": INT}, ("a",)),
        obj({"a": STR}, ("a",)),
        False,
        False,
        "type-narrowed",
    ),
    (
        "integer widened to number",
        obj({"a": INT}, ("a",)),
        obj({"a": {"type": "number"}}, ("a",)),
        True,
        False,
        "type-narrowed",
    ),
    (
        "made nullable",
        obj({"a": INT}, ("a",)),
        obj({"a": {"anyOf": [INT, {"type": "null"}]}}, ("a",)),
        True,
        False,
        "type-narrowed",
    ),
    (
        "enum value added",
        obj({"s": {"enum": ["new", "paid"]}}, ("s",)),
        obj({"s": {"enum": ["new", "paid", "shipped"]}}, ("s",)),
        True,
        False,
        "value-removed",
    ),
    (
        "minimum raised",
        obj({"q": {"type": "integer", "minimum": 0}}, ("q",)),
        obj({"q": {"type": "integer", "exclusiveMinimum": 0}}, ("q",)),
        False,
        True,
        "minimum-raised",
    ),
    (
        "maxLength lowered",
        obj({"s": {"type": "string", "maxLength": 10}}, ("s",)),
        obj({"s": {"type": "string", "maxLength": 5}}, ("s",)),
        False,
        True,
        "maxLength-lowered",
    ),
    (
        "pattern added",
        obj({"s": STR}, ("s",)),
        obj({"s": {"type": "string", "pattern": "^[a-z]+$"}}, ("s",)),
        False,
        True,
        "pattern-changed",
    ),
    (
        "array items narrowed",
        obj({"l": {"type": "array", "items": {"type": "number"}}}, ("l",)),
        obj({"l": {"type": "array", "items": INT}}, ("l",)),
        False,
        True,
        "type-narrowed",
    ),
    (
        # found by the property tests: the new schema accepts no string at all, so an
        # old reader has nothing to read (FORWARD holds, vacuously), while old data
        # ("" included) cannot be read by the new schema
        "string bounds crossed: the new schema accepts nothing",
        obj({"s": {"type": "string", "maxLength": 0}}, ("s",)),
        obj({"s": {"type": "string", "minLength": 1, "maxLength": 0}}, ("s",)),
        False,
        True,
        "minLength-raised",
    ),
    (
        "model closed",
        obj({"a": INT}, ("a",), extra=True),
        obj({"a": INT}, ("a",), extra=False),
        False,
        True,
        "content-model-closed",
    ),
]


@pytest.mark.parametrize(
    ("name", "old", "new", "backward", "forward", "rule"), CASES, ids=[c[0] for c in CASES]
)
def test_each_mode_gives_the_expected_verdict(
    name: str, old: Any, new: Any, backward: bool, forward: bool, rule: str | None
) -> None:
    expected = {
        Compatibility.BACKWARD: backward,
        Compatibility.BACKWARD_TRANSITIVE: backward,
        Compatibility.FORWARD: forward,
        Compatibility.FORWARD_TRANSITIVE: forward,
        Compatibility.FULL: backward and forward,
        Compatibility.FULL_TRANSITIVE: backward and forward,
        Compatibility.NONE: True,
    }
    for mode in ALL_MODES:
        findings = check_compatibility(new, [(1, old)], mode)
        assert (not findings) == expected[mode], (name, mode, render_findings(findings))
        for finding in findings:
            assert finding.version == 1
            assert finding.direction in ("backward", "forward")
            assert finding.path.startswith("/")
        if findings and rule is not None:
            assert rule in {f.rule for f in findings}, (name, mode, render_findings(findings))


def test_strict_reading_of_an_open_model_refuses_an_added_optional_property() -> None:
    old = obj({"a": INT}, ("a",))
    new = obj({"a": INT, "b": STR}, ("a",))
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    strict = check_compatibility(new, [(1, old)], "BACKWARD", content="strict")
    assert [(f.path, f.rule) for f in strict] == [("/b", "property-added-to-open-model")]


def test_transitive_modes_catch_what_the_latest_version_hides() -> None:
    """v1 -> v2 -> v3 where each step is BACKWARD compatible, but v3 cannot read v1."""
    v1 = obj({"a": INT}, ("a",))
    v2 = obj({})  # 'a' removed: a new reader ignores it
    v3 = obj({"a": STR})  # 'a' back, as a string: v2 never wrote it, v1 wrote an int
    assert check_compatibility(v2, [(1, v1)], "BACKWARD") == []
    assert check_compatibility(v3, [(1, v1), (2, v2)], "BACKWARD") == []
    findings = check_compatibility(v3, [(1, v1), (2, v2)], "BACKWARD_TRANSITIVE")
    assert [(f.path, f.rule, f.version) for f in findings] == [("/a", "type-narrowed", 1)]
    assert check_compatibility(v3, [(1, v1), (2, v2)], "FULL") == []  # v2 ignores 'a'
    full_t = check_compatibility(v3, [(1, v1), (2, v2)], "FULL_TRANSITIVE")
    assert {(f.version, f.direction) for f in full_t} == {(1, "backward"), (1, "forward")}


class Line(BaseModel):
    sku: str
    qty: int = Field(gt=0)


class OrderV1(BaseModel):
    order_id: str
    lines: list[Line]


class OrderV2(BaseModel):
    order_id: str
    lines: list[Line]
    coupon: str | None = None


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str


class ClosedV2(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str
    coupon: str | None = None


class Kind(BaseModel):
    kind: Literal["a", "b"]


def test_pydantic_models_through_refs() -> None:
    assert check_readable(OrderV1.model_json_schema(), OrderV2.model_json_schema()) == []
    assert check_readable(OrderV2.model_json_schema(), OrderV1.model_json_schema()) == []

    class LineV2(BaseModel):
        sku: str
        qty: int = Field(gt=1)

    class OrderV3(BaseModel):
        order_id: str
        lines: list[LineV2]

    findings = check_readable(OrderV1.model_json_schema(), OrderV3.model_json_schema())
    assert [(f.path, f.rule) for f in findings] == [("/lines/items/qty", "minimum-raised")]
    assert findings[0].old == {"minimum": 1} and findings[0].new == {"minimum": 2}


def test_closed_pydantic_models() -> None:
    old, new = Closed.model_json_schema(), ClosedV2.model_json_schema()
    assert check_readable(old, new) == []  # old data never has a coupon
    forward = check_readable(new, old)
    assert [(f.path, f.rule) for f in forward] == [
        ("/coupon", "property-removed-from-closed-model")
    ]


def test_literal_narrowing_names_the_value() -> None:
    class KindV2(BaseModel):
        kind: Literal["a"]

    findings = check_readable(Kind.model_json_schema(), KindV2.model_json_schema())
    assert [(f.path, f.rule, f.old) for f in findings] == [("/kind", "value-removed", "b")]


def test_discriminated_unions() -> None:
    a = obj({"kind": {"const": "a"}, "x": INT}, ("kind", "x"))
    b = obj({"kind": {"const": "b"}, "y": STR}, ("kind", "y"))
    union = {"oneOf": [a, b]}
    assert check_readable(a, union) == []
    assert check_readable(union, union) == []
    untagged = {"oneOf": [obj({"x": INT}), obj({"y": STR})]}
    assert {f.rule for f in check_readable(obj({"x": INT}), untagged)} == {"ambiguous-oneOf"}


def test_nullable_spelled_two_ways() -> None:
    as_list = {"type": ["integer", "null"]}
    as_union = {"anyOf": [INT, {"type": "null"}]}
    assert check_readable(as_list, as_union) == []
    assert check_readable(as_union, as_list) == []


def test_recursive_models_terminate() -> None:
    class Node(BaseModel):
        name: str
        children: list[Node] = []

    schema = Node.model_json_schema()
    assert check_readable(schema, schema) == []


def test_unknown_reader_keywords_are_not_guessed() -> None:
    old = obj({"a": INT})
    new = {**obj({"a": INT}), "dependentRequired": {"a": ["b"]}}
    assert [f.rule for f in check_readable(old, new)] == ["unsupported-keyword"]


def test_incompatible_schema_error_renders_a_diff() -> None:
    findings = check_compatibility(obj({"a": STR}, ("a",)), [(3, obj({"a": INT}, ("a",)))], "FULL")
    error = IncompatibleSchema("order.created", 4, "FULL", findings)
    text = str(error)
    assert "version 4 of 'order.created' breaks FULL" in text
    assert "/a: type-narrowed" in text and "version 3" in text
    diff = error.diff()
    assert '- ["integer"]' in diff and '+ ["string"]' in diff
    assert "backward" in diff and "forward" in diff


def test_mode_names() -> None:
    assert Compatibility.parse("full-transitive") is Compatibility.FULL_TRANSITIVE
    with pytest.raises(ValueError, match="use one of BACKWARD"):
        Compatibility.parse("sideways")


def test_the_writers_pattern_properties_are_what_it_may_write() -> None:
    """A name matching a writer's pattern escapes its additionalProperties: the
    writer below may write {"x1": "s"}, which the reader refuses."""
    writer = {
        "type": "object",
        "patternProperties": {"^x": STR},
        "additionalProperties": INT,
    }
    reader = {"type": "object", "additionalProperties": INT}
    assert [(f.path, f.rule) for f in check_readable(writer, reader)] == [("/*", "type-narrowed")]
    closed = {"type": "object", "additionalProperties": False}
    assert [f.rule for f in check_readable(writer, closed)] == ["content-model-closed"]
    assert check_readable(writer, writer) == []
    # the reader's own property meets the writer's pattern
    with_x1 = {**writer, "properties": {"x1": INT}}
    assert [(f.path, f.rule) for f in check_readable(writer, with_x1)] == [
        ("/x1", "property-added-to-open-model")
    ]


def test_unevaluated_properties_is_not_proved_by_its_value() -> None:
    """The same unevaluatedProperties is another constraint beside other properties:
    the writer below writes {"a": 1}, the reader refuses it."""
    writer = {"type": "object", "properties": {"a": INT}, "unevaluatedProperties": False}
    reader = {"type": "object", "unevaluatedProperties": False}
    assert [(f.path, f.rule) for f in check_readable(writer, reader)] == [
        ("/", "unsupported-keyword")
    ]
    assert check_readable(writer, {**reader, "unevaluatedProperties": True}) == []


def test_enum_values_are_validated_with_refs_resolved_against_the_readers_root() -> None:
    """``#`` inside a part of the reader is the whole reader, not that part."""
    writer = obj({"a": {"enum": [{"x": {"zzz": 1}}]}}, extra=False)
    reader = obj({"a": obj({"x": {"$ref": "#"}})}, extra=False)
    findings = check_readable(writer, reader)
    assert [(f.path, f.rule, f.old) for f in findings] == [
        ("/a", "value-removed", {"x": {"zzz": 1}})
    ]
    assert check_readable(writer, obj({"a": obj({"x": obj({"zzz": INT})})}, extra=False)) == []
