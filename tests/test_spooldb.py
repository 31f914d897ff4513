"""The compiled spool environment (liblmdb) against its py-lmdb twin: same results, same files, same errors."""

from __future__ import annotations

import importlib
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine._spooldb_py import REMOVE, STORE, UPDATE, MapFull, StoreError

IMPLEMENTATIONS = {"compiled": "engine._spooldb", "python": "engine._spooldb_py"}


def spooldb(name: str):
    return importlib.import_module(IMPLEMENTATIONS[name]).SpoolDB


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def db_class(request: pytest.FixtureRequest):
    return spooldb(request.param)


def contents(db) -> list[tuple[bytes, bytes, bytes | None]]:
    return [(key, envelope, db.body(key)) for key, envelope in db.envelopes_after(None, 1 << 20)]


keys = st.binary(min_size=1, max_size=24)
ops = st.lists(
    st.one_of(
        st.tuples(st.just(STORE), keys, st.binary(max_size=64), st.binary(max_size=9000)),
        st.tuples(st.just(UPDATE), keys, st.binary(max_size=64), st.none()),
        st.tuples(st.just(REMOVE), keys, st.none(), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(ops, max_size=5))
def test_batches_leave_the_same_contents_as_the_twin(tmp_path_factory: pytest.TempPathFactory, batches) -> None:
    compiled = spooldb("compiled")(str(tmp_path_factory.mktemp("compiled")), 64 << 20)
    python = spooldb("python")(str(tmp_path_factory.mktemp("python")), 64 << 20)
    try:
        for batch in batches:
            compiled.write(batch)
            python.write(batch)
        assert contents(compiled) == contents(python)
        assert compiled.entries() == python.entries() == len(contents(python))
    finally:
        compiled.close()
        python.close()


@pytest.mark.parametrize(("writer", "reader"), [("compiled", "python"), ("python", "compiled")])
def test_each_reads_what_the_other_wrote(tmp_path: Path, writer: str, reader: str) -> None:
    db = spooldb(writer)(str(tmp_path), 64 << 20)
    db.write([(STORE, b"k%03d" % n, b"env %d" % n, os.urandom(n * 100)) for n in range(50)])
    expected = contents(db)
    db.close()
    db = spooldb(reader)(str(tmp_path), 64 << 20)
    assert contents(db) == expected and db.entries() == 50
    db.close()


def test_listing_resumes_past_a_key(db_class, tmp_path: Path) -> None:
    db = db_class(str(tmp_path), 64 << 20)
    db.write([(STORE, b"%02d" % n, b"e", b"b") for n in range(10)])
    assert [k for k, _ in db.envelopes_after(None, 3)] == [b"00", b"01", b"02"]
    assert [k for k, _ in db.envelopes_after(b"02", 3)] == [b"03", b"04", b"05"]
    assert [k for k, _ in db.envelopes_after(b"045", 2)] == [b"05", b"06"]
    assert db.envelopes_after(b"09", 5) == []
    db.close()


def test_a_failing_batch_writes_nothing(db_class, tmp_path: Path) -> None:
    db = db_class(str(tmp_path), 1 << 20)
    db.write([(STORE, b"kept", b"e", b"b")])
    with pytest.raises(MapFull):
        db.write([(STORE, b"a%d" % n, b"e", bytes(200_000)) for n in range(8)])
    assert contents(db) == [(b"kept", b"e", b"b")]
    db.set_map_size(16 << 20)
    assert db.map_size() == 16 << 20
    db.write([(STORE, b"a%d" % n, b"e", bytes(200_000)) for n in range(8)])
    assert db.entries() == 9
    db.close()


def test_files_are_private_to_the_engine_user(db_class, tmp_path: Path) -> None:
    db_class(str(tmp_path), 1 << 20).close()
    assert stat.S_IMODE((tmp_path / "data.mdb").stat().st_mode) & 0o077 == 0


def test_an_unopenable_directory_is_a_store_error(db_class, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"mdb_env_open|No such file"):
        db_class(str(tmp_path / "missing"), 1 << 20)


def test_closed_environment_refuses_calls(tmp_path: Path) -> None:
    db = spooldb("compiled")(str(tmp_path), 1 << 20)
    db.close()
    db.close()
    with pytest.raises(StoreError, match="closed"):
        db.body(b"k")
    with pytest.raises(StoreError, match="closed"):
        db.write([(REMOVE, b"k", None, None)])


def test_the_compiled_write_lets_other_threads_run(tmp_path: Path) -> None:
    """The point of the compiled module: a batch holds the GIL only to start and to end, so Python code on
    another thread goes on while the batch's commit (and its fsync) runs."""
    db = spooldb("compiled")(str(tmp_path), 256 << 20)
    batch = [(STORE, b"k%05d" % n, b"e", bytes(20_000)) for n in range(2000)]
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    other = threading.Thread(target=tick)
    other.start()
    try:
        before = ticks
        db.write(batch)
        during = ticks - before
    finally:
        done.set()
        other.join()
        db.close()
    assert during > 1000
