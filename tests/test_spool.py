"""The spool on real LMDB: round trips, group commit, crash survival, failing commits, cheap envelope listing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spool import LIST_CHUNK, Spool, SpoolError


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest):
    """Run a coroutine to completion (bounded) on uvloop and on stock asyncio."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 20))

    return runner


def key(n: int) -> bytes:
    return n.to_bytes(8, "big")


def test_store_update_remove_round_trip(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        assert spool.envelope(key(1)) is None and spool.body(key(1)) is None
        await spool.store(key(1), b"env-1", b"body-1")
        await spool.store(key(2), b"env-2", b"body-2")
        assert (spool.envelope(key(1)), spool.body(key(1))) == (b"env-1", b"body-1")
        await spool.update(key(1), b"env-1-retry")
        assert (spool.envelope(key(1)), spool.body(key(1))) == (b"env-1-retry", b"body-1")
        await spool.remove(key(1))
        assert spool.envelope(key(1)) is None and spool.body(key(1)) is None
        await spool.update(key(1), b"too late")
        await spool.remove(key(1))
        assert spool.envelope(key(1)) is None
        assert list(spool.envelopes()) == [(key(2), b"env-2")]
        assert spool.stats()["messages"] == 1
        await spool.close()
        await spool.close()
        with pytest.raises(SpoolError):
            await spool.store(key(3), b"env", b"body")

    run(main())


def test_discard_joins_the_next_commit_without_a_waiter(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        await spool.store(key(1), b"env-1", b"body-1")
        await spool.store(key(2), b"env-2", b"body-2")
        spool.discard(key(1))
        assert spool.envelope(key(1)) == b"env-1"  # not yet committed: nothing waited for it
        await spool.update(key(2), b"env-2-retry")  # a later operation's commit covers it too
        assert spool.envelope(key(1)) is None and spool.body(key(1)) is None
        spool.discard(key(2))
        await spool.close()
        with pytest.raises(SpoolError):
            spool.discard(key(2))
        reopened = Spool(tmp_path / "spool")
        assert list(reopened.envelopes()) == []
        await reopened.close()

    run(main())


def test_operations_on_one_key_in_one_batch_apply_in_order(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        await asyncio.gather(
            spool.store(key(1), b"first", b"body"),
            spool.update(key(1), b"second"),
            spool.store(key(2), b"gone", b"body"),
            spool.remove(key(2)),
        )
        assert spool.stats()["last_batch"] == 4
        assert list(spool.envelopes()) == [(key(1), b"second")]
        await spool.close()

    run(main())


def test_rejects_keys_lmdb_cannot_hold_without_failing_the_batch(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        good = asyncio.ensure_future(spool.store(key(1), b"env", b"body"))
        with pytest.raises(ValueError):
            await spool.store(b"", b"env", b"body")
        with pytest.raises(ValueError):
            await spool.store(b"k" * 4096, b"env", b"body")
        await good
        assert spool.body(key(1)) == b"body"
        await spool.close()

    run(main())


def test_concurrent_stores_share_commits_and_survive_reopen(run, tmp_path: Path) -> None:
    count = 500

    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        await asyncio.gather(*(spool.store(key(n), b"env-%d" % n, os.urandom(2048)) for n in range(count)))
        stats = spool.stats()
        assert stats["ops_committed"] == count
        assert stats["commits"] <= count // 10, stats
        await spool.close()
        reopened = Spool(tmp_path / "spool")
        listed = list(reopened.envelopes())
        assert listed == [(key(n), b"env-%d" % n) for n in range(count)]
        assert all(len(reopened.body(key(n)) or b"") == 2048 for n in range(count))
        assert reopened.stats()["messages"] == count
        await reopened.close()

    run(main())


def test_batches_grow_while_a_commit_is_in_flight(run, tmp_path: Path) -> None:
    async def writer(spool: Spool, first: int) -> None:
        for n in range(first, first + 20):
            await spool.store(key(n), b"env", b"body")

    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        await asyncio.gather(*(writer(spool, 1000 * w) for w in range(50)))
        stats = spool.stats()
        assert stats["ops_committed"] == 1000
        assert stats["commits"] < 1000 // 5, stats
        await spool.close()

    run(main())


def test_close_waits_for_operations_already_accepted(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        stores = [asyncio.ensure_future(spool.store(key(n), b"env", b"body")) for n in range(50)]
        await asyncio.sleep(0)
        await spool.close()
        assert all(store.done() and store.exception() is None for store in stores)
        reopened = Spool(tmp_path / "spool")
        assert reopened.stats()["messages"] == 50
        await reopened.close()

    run(main())


def test_a_cancelled_caller_does_not_disturb_its_batch(run, tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        cancelled = asyncio.ensure_future(spool.store(key(1), b"env", b"body"))
        kept = asyncio.ensure_future(spool.store(key(2), b"env", b"body"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await kept
        await spool.close()
        assert cancelled.cancelled()

    run(main())


def test_listing_spans_several_read_chunks(run, tmp_path: Path) -> None:
    count = LIST_CHUNK * 2 + 7

    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        await asyncio.gather(*(spool.store(key(n), key(n), b"") for n in range(count)))
        assert [k for k, _ in spool.envelopes()] == [key(n) for n in range(count)]
        await spool.close()

    run(main())


operations = st.lists(
    st.tuples(st.sampled_from(["store", "update", "remove"]), st.integers(0, 5), st.binary(max_size=8)),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(rounds=st.lists(operations, min_size=1, max_size=4))
def test_batches_match_a_dict_applying_the_same_operations_in_order(tmp_path_factory, rounds) -> None:
    """Each round is submitted at once (one or two batches); the spool must end as a dict would."""
    path = tmp_path_factory.mktemp("spool")
    model: dict[bytes, tuple[bytes, bytes]] = {}

    async def main() -> None:
        spool = Spool(path)
        for ops in rounds:
            calls = []
            for kind, n, value in ops:
                if kind == "store":
                    model[key(n)] = (b"env" + value, b"body" + value)
                    calls.append(spool.store(key(n), b"env" + value, b"body" + value))
                elif kind == "update":
                    if key(n) in model:
                        model[key(n)] = (value, model[key(n)][1])
                    calls.append(spool.update(key(n), value))
                else:
                    model.pop(key(n), None)
                    calls.append(spool.remove(key(n)))
            await asyncio.gather(*calls)
            assert list(spool.envelopes()) == [(k, model[k][0]) for k in sorted(model)]
            assert all(spool.body(k) == model[k][1] for k in model)
        await spool.close()

    asyncio.run(main())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from engine.spool import Spool

    async def writer(spool, first):
        for n in range(first, first + 100_000):
            key = n.to_bytes(8, "big")
            await spool.store(key, b"env", key * 256)
            print("stored", n, flush=True)

    async def main():
        spool = Spool(Path(sys.argv[1]))
        await asyncio.gather(*(writer(spool, 1_000_000 * w) for w in range(8)))

    asyncio.run(main())
    """
)


def test_every_reported_store_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    reported: list[int] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            reported.append(int(line.split()[1]))
            if len(reported) >= 300:
                break
        process.kill()
        reported.extend(int(line.split()[1]) for line in process.stdout)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert len(reported) >= 300

    async def check() -> None:
        spool = Spool(path)
        for n in reported:
            assert spool.body(key(n)) == key(n) * 256, n
        await spool.close()

    asyncio.run(check())


def test_map_full_grows_the_map_and_then_fails_at_the_cap(run, tmp_path: Path) -> None:
    body = os.urandom(256 << 10)

    async def main() -> None:
        spool = Spool(tmp_path / "spool", map_size=1 << 20, map_size_cap=4 << 20)
        for n in range(6):
            await spool.store(key(n), b"env", body)
        assert spool.stats()["map_size"] > 1 << 20
        stored = 6
        with pytest.raises(SpoolError):
            for n in range(6, 32):
                await spool.store(key(n), b"env", body)
                stored += 1
        stats = spool.stats()
        assert stats["map_size"] == 4 << 20 and stats["failed_commits"] == 1
        assert stats["messages"] == stored < 32
        for n in range(4):  # LMDB reuses pages only of transactions older than the previous one
            await spool.remove(key(n))
        await spool.store(key(100), b"env", body)
        assert spool.body(key(100)) == body
        await spool.close()

    run(main())


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only): a disk that fills up for real and can be given more room."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_fails_the_batch_and_the_spool_recovers(run, tiny_disk: Path) -> None:
    body = os.urandom(2048)

    async def main() -> None:
        spool = Spool(tiny_disk / "spool", map_size=64 << 20)
        stored = 0
        with pytest.raises(SpoolError):
            for n in range(2000):
                await spool.store(key(n), b"env", body)
                stored += 1
        assert 0 < stored < 2000
        batch = [spool.store(key(10_000 + n), b"env", body) for n in range(5)]
        outcomes = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(outcome, SpoolError) for outcome in outcomes), outcomes
        subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
        await spool.store(key(20_000), b"env", body)
        await spool.close()
        reopened = Spool(tiny_disk / "spool", map_size=64 << 20)
        assert reopened.stats()["messages"] == stored + 1
        assert reopened.body(key(20_000)) == body and reopened.envelope(key(10_000)) is None
        await reopened.close()

    run(main())


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_listing_envelopes_never_reads_bodies(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    count, body = 40, os.urandom(1 << 20)

    async def fill() -> None:
        spool = Spool(path)
        for n in range(count):
            await spool.store(key(n), b"env-%d" % n, body)
        await spool.close()

    async def bytes_read(action: str) -> int:
        drop_from_page_cache(path / "data.mdb")
        spool = Spool(path)
        before = read_bytes()
        if action == "list":
            assert len(list(spool.envelopes())) == count
        else:
            assert all(spool.body(key(n)) == body for n in range(count))
        read = read_bytes() - before
        await spool.close()
        return read

    asyncio.run(fill())
    bodies = asyncio.run(bytes_read("bodies"))
    if bodies < count * len(body) // 2:
        pytest.skip(f"this filesystem does not report page-cache misses in /proc/self/io (bodies: {bodies} B)")
    listed = asyncio.run(bytes_read("list"))
    assert listed < count * len(body) // 20, (listed, bodies)


GROWER = textwrap.dedent(
    """
    import lmdb, sys
    env = lmdb.open(sys.argv[1], map_size=16 << 20, max_dbs=2)
    bodies = env.open_db(b"body")
    with env.begin(write=True) as txn:
        for n in range(12):
            txn.put(b"other-%d" % n, bytes(256 << 10), db=bodies)
    env.close()
    """
)


def test_adopts_a_map_another_process_grew(run, tmp_path: Path) -> None:
    path = tmp_path / "spool"

    async def main() -> None:
        spool = Spool(path, map_size=1 << 20, map_size_cap=1 << 20)
        await spool.store(key(1), b"env", b"body")
        subprocess.run([sys.executable, "-c", GROWER, str(path)], check=True, timeout=30)
        await spool.store(key(2), b"env", b"body")
        assert spool.stats()["map_size"] == 16 << 20
        assert spool.body(b"other-11") == bytes(256 << 10)
        await spool.close()

    run(main())


READER = textwrap.dedent(
    """
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=2)
    txn = env.begin() if sys.argv[2] == "read" else None
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_clears_reader_slots_of_a_killed_process(run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reader table outlives a killed reader while any other process keeps the environment open."""
    path = tmp_path / "spool"
    run(Spool(path).close())
    holder, reader = (
        subprocess.Popen([sys.executable, "-c", READER, str(path), role], stdout=subprocess.PIPE, text=True)
        for role in ("hold", "read")
    )
    try:
        for process in (holder, reader):
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        reader.kill()
        reader.wait(10)
        with caplog.at_level("INFO", logger="engine.spool"):
            spool = Spool(path)
        assert "cleared 1 stale reader slots" in caplog.text
        run(spool.close())
    finally:
        for process in (holder, reader):
            process.kill()
            process.wait(10)
