"""Recovery's lean path: waiting_destinations() reads from a packed envelope exactly what scheduling would
take from a full Envelope, and listing a spool's envelopes leaves its file (bodies included) unmapped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from engine.envelope import Envelope, Recipient, RecipientState, waiting_destinations
from engine.spool import Spool

DOMAINS = st.sampled_from(["a.test", "B.test", "b.test", "[127.0.0.1]", "c.example"])
RECIPIENTS = st.builds(
    Recipient,
    address=st.builds(lambda local, domain: f"{local}@{domain}", st.sampled_from(["x", "y.z", "q@r"]), DOMAINS),
    state=st.sampled_from(list(RecipientState)),
    attempts=st.integers(0, 9),
    next_attempt=st.floats(0, 2e9),
)
ENVELOPES = st.builds(
    Envelope,
    sender=st.just("s@sender.test"),
    recipients=st.lists(RECIPIENTS, min_size=1, max_size=8),
    lane=st.just("bulk"),
    created=st.floats(0, 2e9),
    size=st.integers(0, 10**6),
    priority=st.integers(0, 9),
    campaign=st.none() | st.text(max_size=5),
    tenant=st.none() | st.text(max_size=5),
)


@given(ENVELOPES)
def test_waiting_destinations_agrees_with_the_full_envelope(envelope: Envelope) -> None:
    full = Envelope.unpack(envelope.pack())
    expected = {domain: max(r.next_attempt for r in group) for domain, group in full.pending_by_domain().items()}
    assert waiting_destinations(envelope.pack()) == (
        full.created,
        full.priority,
        full.campaign,
        full.tenant,
        expected,
    )


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (from /proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip("\n").endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_listing_envelopes_leaves_bodies_and_envelopes_unmapped(tmp_path: Path) -> None:
    count = 20_000

    async def main() -> None:
        spool = Spool(tmp_path / "spool")
        try:
            for start in range(0, count, 2000):
                keys = [n.to_bytes(12, "big") for n in range(start, start + 2000)]
                await asyncio.gather(*(spool.store(key, b"e" * 60, os.urandom(600)) for key in keys))
            file_kb = (tmp_path / "spool" / "data.mdb").stat().st_blocks // 2
            listed = sum(1 for _ in spool.envelopes())
            assert listed == count
            assert file_kb > 10_000
            assert mapped_kb(tmp_path / "spool" / "data.mdb") < file_kb // 20
            assert spool.envelope((7).to_bytes(12, "big")) == b"e" * 60
        finally:
            await spool.close()

    asyncio.run(main())
