"""Next-hop resolution against a real authoritative DNS server on loopback, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
import uvloop

from engine.resolver import DnsPermanentError, DnsTransientError, NextHop, Resolver
from tests.dnsserver import DnsServer, dns_server

__all__ = ["dns_server"]

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine to completion on a fresh loop of the parametrised kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    return Resolver([(dns_server.host, dns_server.port)], timeout=1.0)


class Clock:
    """A settable stand-in for the resolver's monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(resolver, "clock", fake)
    return fake


def asked(server: DnsServer, name: str, rtype: str) -> int:
    return server.queries.count((name, rtype))


def test_mx_in_preference_order_ipv4_first(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (20, "mx2.example.test"))
    dns_server.add("example.test", "MX", (10, "mx1.example.test"))
    dns_server.add("mx1.example.test", "AAAA", "::1")
    dns_server.add("mx1.example.test", "A", "127.0.0.11")
    dns_server.add("mx2.example.test", "A", "127.0.0.12")
    hops = run(resolver.next_hops("example.test"))
    assert hops == [
        NextHop("mx1.example.test", "127.0.0.11", 10),
        NextHop("mx1.example.test", "::1", 10),
        NextHop("mx2.example.test", "127.0.0.12", 20),
    ]


def test_equal_preferences_are_shuffled(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    for i in (1, 2):
        dns_server.add("example.test", "MX", (10, f"mx{i}.example.test"))
        dns_server.add(f"mx{i}.example.test", "A", f"127.0.0.{i}")

    async def orders() -> set[tuple[str, ...]]:
        seen = set()
        for _ in range(64):
            seen.add(tuple(hop.host for hop in await resolver.next_hops("example.test")))
        return seen

    assert run(orders()) == {
        ("mx1.example.test", "mx2.example.test"),
        ("mx2.example.test", "mx1.example.test"),
    }
    assert asked(dns_server, "example.test", "MX") == 1


@pytest.mark.parametrize("preference", [0, 10])
def test_null_mx_bounces_without_address_lookups(
    dns_server: DnsServer, resolver: Resolver, run: Run, preference: int
) -> None:
    dns_server.add("nomail.test", "MX", (preference, "."))
    dns_server.add("nomail.test", "A", "127.0.0.1")
    with pytest.raises(DnsPermanentError) as info:
        run(resolver.next_hops("nomail.test"))
    assert (info.value.code, info.value.enhanced) == (556, "5.1.10")
    assert dns_server.queries == [("nomail.test", "MX")]


def test_root_exchange_next_to_real_ones_is_ignored(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (0, "."))
    dns_server.add("example.test", "MX", (10, "mx.example.test"))
    dns_server.add("mx.example.test", "A", "127.0.0.3")
    assert run(resolver.next_hops("example.test")) == [NextHop("mx.example.test", "127.0.0.3", 10)]


def test_nxdomain_bounces(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    with pytest.raises(DnsPermanentError) as info:
        run(resolver.next_hops("missing.test"))
    assert (info.value.code, info.value.enhanced) == (550, "5.1.2")
    assert "missing.test" in info.value.text


def test_no_mx_means_implicit_mx(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("plain.test", "AAAA", "::1")
    dns_server.add("plain.test", "A", "127.0.0.7")
    hops = run(resolver.next_hops("plain.test"))
    assert hops == [NextHop("plain.test", "127.0.0.7", 0), NextHop("plain.test", "::1", 0)]


def test_no_mx_and_no_address_bounces(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("txtonly.test", "TXT", "v=spf1 -all")
    with pytest.raises(DnsPermanentError) as info:
        run(resolver.next_hops("txtonly.test"))
    assert info.value.code == 550


def test_unresolvable_exchanges_are_skipped(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (5, "gone.example.test"))
    dns_server.add("example.test", "MX", (10, "broken.example.test"))
    dns_server.add("example.test", "MX", (20, "mx.example.test"))
    dns_server.fail("broken.example.test", "SERVFAIL")
    dns_server.add("mx.example.test", "A", "127.0.0.20")
    assert run(resolver.next_hops("example.test")) == [NextHop("mx.example.test", "127.0.0.20", 20)]


def test_address_shared_by_exchanges_is_tried_once(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (10, "mx1.example.test"))
    dns_server.add("example.test", "MX", (20, "mx2.example.test"))
    dns_server.add("mx1.example.test", "A", "127.0.0.1")
    dns_server.add("mx2.example.test", "A", "127.0.0.1")
    dns_server.add("mx2.example.test", "A", "127.0.0.2")
    assert run(resolver.next_hops("example.test")) == [
        NextHop("mx1.example.test", "127.0.0.1", 10),
        NextHop("mx2.example.test", "127.0.0.2", 20),
    ]


def test_no_exchange_resolves_is_transient(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (10, "gone.example.test"))
    dns_server.add("example.test", "MX", (20, "gone2.example.test"))
    with pytest.raises(DnsTransientError) as info:
        run(resolver.next_hops("example.test"))
    assert (info.value.code, info.value.enhanced) == (451, "4.4.3")


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED"])
def test_server_failures_are_transient(dns_server: DnsServer, resolver: Resolver, run: Run, rcode: str) -> None:
    dns_server.fail("flaky.test", rcode)
    with pytest.raises(DnsTransientError) as info:
        run(resolver.next_hops("flaky.test"))
    assert (info.value.code, info.value.enhanced) == (451, "4.4.3")
    assert resolver.stats["errors"] == 1


def test_timeout_is_transient_within_the_configured_timeout(dns_server: DnsServer, run: Run) -> None:
    resolver = Resolver([(dns_server.host, dns_server.port)], timeout=0.4)
    dns_server.fail("slow.test", "TIMEOUT")
    started = time.monotonic()
    with pytest.raises(DnsTransientError) as info:
        run(resolver.next_hops("slow.test"))
    elapsed = time.monotonic() - started
    assert info.value.code == 451
    assert 0.3 <= elapsed < 0.4 + 0.2


def test_silent_first_nameserver_fails_over_within_the_timeout(dns_server: DnsServer, run: Run) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = Resolver([silent.getsockname(), (dns_server.host, dns_server.port)], timeout=1.0)
        started = time.monotonic()
        with pytest.raises(DnsPermanentError):
            run(resolver.next_hops("missing.test"))
        assert time.monotonic() - started < 0.9


def test_nameserver_given_by_name(dns_server: DnsServer, run: Run) -> None:
    dns_server.add("example.test", "A", "127.0.0.5")
    resolver = Resolver([("localhost", dns_server.port)], timeout=1.0)
    assert run(resolver.next_hops("example.test")) == [NextHop("example.test", "127.0.0.5", 0)]


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[127.0.0.1]", "127.0.0.1"), ("[IPv6:::1]", "::1"), ("[ipv6:0:0::1]", "::1")],
)
def test_address_literals_skip_dns(
    dns_server: DnsServer, resolver: Resolver, run: Run, literal: str, address: str
) -> None:
    assert run(resolver.next_hops(literal)) == [NextHop(address, address, 0)]
    assert dns_server.queries == []


@pytest.mark.parametrize("literal", ["[IPv6:127.0.0.1]", "[::1]", "[mx.example.test]", "[]"])
def test_bad_address_literals_bounce(dns_server: DnsServer, resolver: Resolver, run: Run, literal: str) -> None:
    with pytest.raises(DnsPermanentError):
        run(resolver.next_hops(literal))
    assert dns_server.queries == []


@pytest.mark.parametrize("domain", ["", ".", "a..test", "x" * 64 + ".test"])
def test_invalid_domains_bounce(dns_server: DnsServer, resolver: Resolver, run: Run, domain: str) -> None:
    with pytest.raises(DnsPermanentError) as info:
        run(resolver.next_hops(domain))
    assert info.value.enhanced == "5.1.2"
    assert dns_server.queries == []


def test_names_are_case_insensitive(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (10, "mx.example.test"))
    dns_server.add("mx.example.test", "A", "127.0.0.3")

    async def both() -> tuple[list[NextHop], list[NextHop]]:
        return await resolver.next_hops("Example.TEST"), await resolver.next_hops("example.test.")

    first, second = run(both())
    assert first == second == [NextHop("mx.example.test", "127.0.0.3", 10)]
    assert dns_server.queries.count(("example.test", "MX")) == 1


def test_idn_is_looked_up_as_a_label(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("xn--bcher-kva.test", "A", "127.0.0.4")
    assert run(resolver.next_hops("Bücher.test")) == [NextHop("xn--bcher-kva.test", "127.0.0.4", 0)]
    assert ("xn--bcher-kva.test", "MX") in dns_server.queries


def test_mx_behind_cname(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("alias.test", "CNAME", "example.test")
    dns_server.add("example.test", "MX", (10, "mx.example.test"))
    dns_server.add("mx.example.test", "CNAME", "host.example.test")
    dns_server.add("host.example.test", "A", "127.0.0.9")
    assert run(resolver.next_hops("alias.test")) == [NextHop("mx.example.test", "127.0.0.9", 10)]


def test_positive_answers_cached_for_their_ttl(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run
) -> None:
    dns_server.add("example.test", "MX", (10, "mx.example.test"), ttl=30)
    dns_server.add("mx.example.test", "A", "127.0.0.5", ttl=20)
    run(resolver.next_hops("example.test"))
    clock.now += 19
    run(resolver.next_hops("example.test"))
    assert asked(dns_server, "example.test", "MX") == 1
    assert asked(dns_server, "mx.example.test", "A") == 1
    clock.now += 2
    run(resolver.next_hops("example.test"))
    assert asked(dns_server, "example.test", "MX") == 2
    assert resolver.stats["hits"] == 1
    assert resolver.stats["misses"] == 2


@pytest.mark.parametrize(("ttl", "cached_for"), [(1, 5), (7200, 3600)])
def test_ttl_is_clamped(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run, ttl: int, cached_for: int
) -> None:
    dns_server.add("example.test", "MX", (10, "mx.example.test"), ttl=ttl)
    dns_server.add("mx.example.test", "A", "127.0.0.5", ttl=ttl)
    run(resolver.next_hops("example.test"))
    clock.now += cached_for - 0.5
    run(resolver.next_hops("example.test"))
    assert asked(dns_server, "example.test", "MX") == 1
    clock.now += 1
    run(resolver.next_hops("example.test"))
    assert asked(dns_server, "example.test", "MX") == 2


@pytest.mark.parametrize(("soa_minimum", "cached_for"), [(30, 30), (None, 60)])
def test_nxdomain_cached_for_soa_minimum_or_default(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run, soa_minimum: int | None, cached_for: int
) -> None:
    if soa_minimum is not None:
        dns_server.add("test", "SOA", ("ns.test", "hostmaster.test", soa_minimum), ttl=300)
    for step in (0, cached_for - 1, 2):
        clock.now += step
        with pytest.raises(DnsPermanentError):
            run(resolver.next_hops("missing.test"))
    assert asked(dns_server, "missing.test", "MX") == 2


def test_implicit_mx_cached_for_the_shorter_of_negative_and_address_ttl(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run
) -> None:
    dns_server.add("test", "SOA", ("ns.test", "hostmaster.test", 40), ttl=300)
    dns_server.add("plain.test", "A", "127.0.0.5", ttl=3000)
    for step in (0, 39, 2):
        clock.now += step
        run(resolver.next_hops("plain.test"))
    assert asked(dns_server, "plain.test", "MX") == 2


def test_transient_errors_are_cached_only_briefly(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run
) -> None:
    dns_server.fail("flaky.test", "SERVFAIL")
    with pytest.raises(DnsTransientError):
        run(resolver.next_hops("flaky.test"))
    dns_server.clear()
    dns_server.add("flaky.test", "A", "127.0.0.6")
    clock.now += 5
    assert run(resolver.next_hops("flaky.test")) == [NextHop("flaky.test", "127.0.0.6", 0)]


def test_answer_with_a_failed_exchange_is_cached_only_briefly(
    dns_server: DnsServer, resolver: Resolver, clock: Clock, run: Run
) -> None:
    dns_server.add("example.test", "MX", (10, "mx1.example.test"), ttl=600)
    dns_server.add("example.test", "MX", (20, "mx2.example.test"), ttl=600)
    dns_server.fail("mx1.example.test", "SERVFAIL")
    dns_server.add("mx2.example.test", "A", "127.0.0.2", ttl=600)
    assert [hop.host for hop in run(resolver.next_hops("example.test"))] == ["mx2.example.test"]
    dns_server.clear()
    dns_server.add("example.test", "MX", (10, "mx1.example.test"), ttl=600)
    dns_server.add("mx1.example.test", "A", "127.0.0.1", ttl=600)
    clock.now += 5
    assert [hop.host for hop in run(resolver.next_hops("example.test"))] == ["mx1.example.test"]


def test_concurrent_lookups_share_one_query(dns_server: DnsServer, resolver: Resolver, run: Run) -> None:
    dns_server.add("example.test", "MX", (10, "mx.example.test"))
    dns_server.add("mx.example.test", "A", "127.0.0.8")

    async def many() -> list[list[NextHop]]:
        return await asyncio.gather(*(resolver.next_hops("example.test") for _ in range(20)))

    results = run(many())
    assert all(hops == [NextHop("mx.example.test", "127.0.0.8", 10)] for hops in results)
    assert asked(dns_server, "example.test", "MX") == 1
    assert resolver.stats["coalesced"] == 19
    assert resolver.stats["inflight"] == 0


def test_cancelled_waiter_does_not_cancel_the_shared_lookup(
    dns_server: DnsServer, resolver: Resolver, run: Run
) -> None:
    dns_server.add("example.test", "A", "127.0.0.8")

    async def scenario() -> list[NextHop]:
        first = asyncio.ensure_future(resolver.next_hops("example.test"))
        second = asyncio.ensure_future(resolver.next_hops("example.test"))
        await asyncio.sleep(0)
        first.cancel()
        return await second

    assert run(scenario()) == [NextHop("example.test", "127.0.0.8", 0)]
    assert asked(dns_server, "example.test", "MX") == 1


def test_cache_is_bounded(dns_server: DnsServer, run: Run) -> None:
    resolver = Resolver([(dns_server.host, dns_server.port)], max_entries=2)

    async def lookups() -> None:
        for name in ("a.test", "b.test", "c.test", "a.test"):
            with pytest.raises(DnsPermanentError):
                await resolver.next_hops(name)

    run(lookups())
    assert asked(dns_server, "a.test", "MX") == 2
    assert asked(dns_server, "c.test", "MX") == 1


def test_server_splits_long_txt_and_answers_over_tcp(dns_server: DnsServer) -> None:
    key = "v=DKIM1; k=rsa; p=" + "A" * 600
    dns_server.add("sel._domainkey.example.test", "TXT", key)
    query = dns.message.make_query("sel._domainkey.example.test", "TXT")
    udp = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=2)
    assert udp.flags & dns.flags.TC
    tcp = dns.query.tcp(query, dns_server.host, port=dns_server.port, timeout=2)
    strings = tcp.answer[0][0].strings
    assert [len(s) for s in strings] == [255, 255, len(key) - 510]
    assert b"".join(strings).decode() == key


def test_server_nodata_for_empty_non_terminal(dns_server: DnsServer) -> None:
    dns_server.add("sel._domainkey.example.test", "TXT", "v=DKIM1")
    for name, rcode in [("_domainkey.example.test", dns.rcode.NOERROR), ("other.example.test", dns.rcode.NXDOMAIN)]:
        reply = dns.query.udp(dns.message.make_query(name, "TXT"), dns_server.host, port=dns_server.port, timeout=2)
        assert (reply.rcode(), reply.answer) == (rcode, [])


def test_server_runs_from_the_command_line_with_a_zone_file(tmp_path: Any) -> None:
    zone = tmp_path / "zone.txt"
    zone.write_text(
        "# test zone\nexample.test 120 MX 10 mx.example.test\nmx.example.test A 127.0.0.9\nbad.test FAIL SERVFAIL\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.dnsserver", "--zone", str(zone)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 10)[0], "server did not start"
        port = int(proc.stdout.readline().split()[3].rsplit(":", 1)[1])
        resolver = Resolver([("127.0.0.1", port)], timeout=2)
        assert asyncio.run(resolver.next_hops("example.test")) == [NextHop("mx.example.test", "127.0.0.9", 10)]
        with pytest.raises(DnsTransientError):
            asyncio.run(resolver.next_hops("bad.test"))
    finally:
        proc.terminate()
        proc.wait(timeout=5)
