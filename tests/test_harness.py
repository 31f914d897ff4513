"""The harness's TOML writer: whatever it writes, tomllib (what the engine reads with) reads back the same."""

from __future__ import annotations

import tomllib

from hypothesis import given
from hypothesis import strategies as st

from engine.config import load_config
from tests.harness import engine_toml, in_table, listener, merge, toml_text

keys = st.text(max_size=8)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=12
)


@given(st.dictionaries(keys, values, max_size=5))
def test_tomllib_reads_back_what_toml_text_wrote(document: dict) -> None:
    assert tomllib.loads(toml_text(document)) == document


def test_tables_arrays_of_tables_and_quoted_keys() -> None:
    text = toml_text({"lanes": {"bulk": {}, "tx": {"x": 1}}, "listeners": [{"a": 1}, {"a": 2}], "r": {"*": "h:1"}})
    assert "[lanes.bulk]" in text and text.count("[[listeners]]") == 2 and '"*" = "h:1"' in text


def test_merge_lays_tables_over_tables() -> None:
    base = {"lanes": {"bulk": {"workers": 1, "nice": 10}}, "routes": {"*": "a:1"}}
    assert merge(base, {"lanes": {"bulk": {"workers": 2}}, "alerts": {"window": "30s"}}) == {
        "lanes": {"bulk": {"workers": 2, "nice": 10}},
        "routes": {"*": "a:1"},
        "alerts": {"window": "30s"},
    }


def test_in_table_reads_text_written_under_a_header() -> None:
    assert in_table("lanes.bulk", 'list_unsubscribe = true\n\n[alerts]\nwindow = "30s"\n') == {
        "lanes": {"bulk": {"list_unsubscribe": True}},
        "alerts": {"window": "30s"},
    }


def test_engine_toml_is_a_valid_engine_configuration(tmp_path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(
        engine_toml(
            admin=8026,
            routes={"*": "127.0.0.1:2526"},
            listeners=[listener("tx", 2525, "transactional", max_recipients=5)],
            lanes={"transactional": {"retry_intervals": ["1s"]}},
            egress={"tx-1": {"source_address": "127.0.0.3"}},
            shaping={"connection_limit": 2},
            token="t",
            extra={"lanes": {"transactional": {"egress_pool": ["tx-1"]}}},
        )
    )
    config = load_config(path)
    assert config.engine.secret == "test-secret" and config.engine.spool_dir == tmp_path / "spool"
    assert str(config.admin.listen) == "127.0.0.1:8026" and config.admin.token == "t"
    assert [(item.name, str(item.listen), item.max_recipients) for item in config.listeners] == [
        ("tx", "127.0.0.1:2525", 5)
    ]
    lane = config.lanes["transactional"]
    assert list(config.lanes) == ["transactional"] and lane.retry_intervals == (1.0,)
    assert lane.egress_pool == ("tx-1",) and config.egress["tx-1"].source_address == "127.0.0.3"
    assert config.shaping["default"].connection_limit == 2
