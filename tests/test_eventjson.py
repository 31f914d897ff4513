"""The compiled event-record encoder against its oracle, the json module (engine._eventjson_py)."""

from __future__ import annotations

import enum
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _eventjson, _eventjson_py, eventjson

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=("Cs",))),  # lone surrogates cannot be UTF-8, in either
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=20,
)
records = st.dictionaries(st.text(max_size=12), values, max_size=12)


@settings(max_examples=500, deadline=None)
@given(records)
def test_compiled_writes_exactly_what_json_writes(record: dict) -> None:
    assert _eventjson.encode_record(record) == _eventjson_py.encode_record(record)


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-300, 1e300, 0.1, 1795941572.4550812, math.pi, -2.5e-8])
def test_repeated_floats_come_from_the_cache_unchanged(value: float) -> None:
    for other in (value, -value, value, 0.0, -0.0, value):
        assert _eventjson.encode_record({"x": other}) == _eventjson_py.encode_record({"x": other})


def test_every_control_character_is_escaped_as_json_does() -> None:
    text = "".join(chr(c) for c in range(0x20)) + '"\\\x7f é ☃ \U0001f600'
    assert _eventjson.encode_record({"t": text}) == _eventjson_py.encode_record({"t": text})


class Kind(enum.IntEnum):
    A = 1


@pytest.mark.parametrize("record", [{"k": Kind.A}, {1: "int key"}, {"k": [Kind.A]}])
def test_other_types_json_takes_are_written_by_json(record: dict) -> None:
    with pytest.raises(TypeError):
        _eventjson.encode_record(record)
    assert eventjson.encode_record(record) == (json.dumps(record, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize("record", [{"k": b"bytes"}, {"k": {"n": object()}}])
def test_values_json_refuses_still_raise(record: dict) -> None:
    with pytest.raises(TypeError):
        eventjson.encode_record(record)


def test_deep_nesting_is_refused_not_crashed() -> None:
    record: dict = {}
    inner = record
    for _ in range(100):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(TypeError):
        _eventjson.encode_record(record)
    assert json.loads(eventjson.encode_record(record))
