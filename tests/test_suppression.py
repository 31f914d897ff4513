"""The suppression list: durable, per tenant or global, shared live between processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.suppression import SuppressionList, suppression_path


@pytest.fixture
def suppressed(tmp_path: Path):
    store = SuppressionList(suppression_path(tmp_path))
    yield store
    store.close()


def test_tenant_entry_applies_to_that_tenant_only(suppressed: SuppressionList) -> None:
    assert suppressed.add("Bob@Example.org", tenant="acme", reason="one-click")
    assert suppressed.contains("bob@example.org", "acme")
    assert suppressed.contains("BOB@EXAMPLE.ORG", "acme")
    assert not suppressed.contains("bob@example.org", "other")
    assert not suppressed.contains("bob@example.org", None)


def test_global_entry_applies_to_every_tenant(suppressed: SuppressionList) -> None:
    assert suppressed.add("carol@example.org", reason="hard bounce")
    for tenant in (None, "acme", "other"):
        assert suppressed.contains("carol@example.org", tenant)


def test_add_twice_and_remove(suppressed: SuppressionList) -> None:
    assert suppressed.add("dave@example.org", "acme")
    assert not suppressed.add("dave@example.org", "acme")
    assert not suppressed.remove("dave@example.org", None)
    assert suppressed.contains("dave@example.org", "acme")
    assert suppressed.remove("dave@example.org", "acme")
    assert not suppressed.remove("dave@example.org", "acme")
    assert not suppressed.contains("dave@example.org", "acme")


def test_entries_keep_reason_and_time(suppressed: SuppressionList) -> None:
    suppressed.add("erin@example.org", "acme", reason="complaint")
    entry = suppressed.get("erin@example.org", "acme")
    assert entry is not None and entry.reason == "complaint" and entry.tenant == "acme" and entry.created > 0
    assert entry.as_dict()["address"] == "erin@example.org"
    assert suppressed.get("erin@example.org") is None


def test_list_pages_and_filters_by_tenant(suppressed: SuppressionList) -> None:
    assert suppressed.add_many([f"u{i:02d}@example.org" for i in range(10)], "acme", "import") == 10
    suppressed.add("g@example.org")
    suppressed.add("x@example.org", "acmeco")
    assert suppressed.count() == 12
    assert suppressed.count("acme") == 10
    page = suppressed.list("acme", limit=4, offset=8)
    assert [e.address for e in page] == ["u08@example.org", "u09@example.org"]
    assert {e.tenant for e in suppressed.list(limit=100)} == {None, "acme", "acmeco"}
    assert [e.address for e in suppressed.list("acmeco")] == ["x@example.org"]


def test_bad_keys_are_refused(suppressed: SuppressionList) -> None:
    with pytest.raises(ValueError):
        suppressed.add("a" * 600 + "@example.org")
    with pytest.raises(ValueError):
        suppressed.add("a@example.org", tenant="bad\x00tenant")


def test_survives_reopen(tmp_path: Path) -> None:
    first = SuppressionList(tmp_path / "s")
    first.add("f@example.org", "acme")
    first.close()
    second = SuppressionList(tmp_path / "s")
    assert second.contains("f@example.org", "acme")
    second.close()


def test_another_process_sees_updates_live(suppressed: SuppressionList) -> None:
    """A second process (like a bulk worker next to the admin API) opened before the change sees it at once."""
    script = (
        "import sys\n"
        "from engine.suppression import SuppressionList\n"
        "s = SuppressionList(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(s.contains(line.strip(), 'acme'), flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(suppressed.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("g@example.org\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "False"
        suppressed.add("g@example.org", "acme")
        child.stdin.write("g@example.org\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "True"
        suppressed.remove("g@example.org", "acme")
        child.stdin.write("g@example.org\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "False"
    finally:
        child.stdin.close()
        child.wait(10)


def test_map_grows_when_full(tmp_path: Path) -> None:
    store = SuppressionList(tmp_path / "small", map_size=64 << 10, map_size_cap=16 << 20)
    store.add_many([f"user{i}@example.org" for i in range(5000)], "acme")
    assert store.count("acme") == 5000
    store.close()
