"""Next-hop resolution for delivery: MX, implicit MX, null MX, TTL cache (RFC 5321 5.1, RFC 7505).

One lookup per destination domain answers "where do I connect, in what order". Answers and
permanent failures are cached for their DNS TTL, concurrent lookups of one domain share a query,
and failures come back as exceptions that carry the SMTP reply to bounce or defer with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

MIN_TTL = 5.0
MAX_TTL = 3600.0
NEGATIVE_TTL_WITHOUT_SOA = 60.0
TRANSIENT_TTL = 2.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class NextHop:
    host: str
    address: str
    preference: int


class _DnsError(Exception):
    """A lookup failure that carries the SMTP reply for the recipients it concerns."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


class DnsPermanentError(_DnsError):
    """The destination can never be reached as addressed: bounce the recipients."""


class DnsTransientError(_DnsError):
    """DNS could not answer now: defer the recipients and retry later."""


# A cached outcome: preference groups, best first, each a list of exchanges (the NextHops of one
# exchange's addresses), or an error.
_Groups = list[list[tuple[NextHop, ...]]]
_Error = tuple[type[_DnsError], int, str, str]


@dataclass(frozen=True)
class _Outcome:
    groups: _Groups | None
    error: _Error | None
    ttl: float


class _NoAddress(Exception):
    """An exchange has no address records (NXDOMAIN or NODATA)."""


def _clamp(ttl: float) -> float:
    return min(max(ttl, MIN_TTL), MAX_TTL)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """Negative-caching TTL from the SOA in the authority section (RFC 2308), else a short default."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_WITHOUT_SOA


def _literal(domain: str) -> NextHop:
    """An address literal "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3): no DNS involved."""
    inner = domain[1:-1]
    tagged = inner[:5].lower() == "ipv6:"
    try:
        address = ipaddress.ip_address(inner[5:] if tagged else inner)
    except ValueError:
        address = None
    if address is None or (address.version == 6) != tagged:
        raise DnsPermanentError(550, "5.1.3", f"invalid address literal {domain}")
    return NextHop(str(address), str(address), 0)


def _addresses_of(host: str, port: int) -> list[str]:
    """A nameserver given by name is looked up once, at configuration time, by the system resolver."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _qname(domain: str) -> dns.name.Name:
    """The absolute query name; IDNs become A-labels, case does not matter."""
    if not domain.rstrip("."):
        raise DnsPermanentError(550, "5.1.2", "empty destination domain")
    try:
        return dns.name.from_text(domain.rstrip(".").lower() + ".")
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise DnsPermanentError(550, "5.1.2", f"invalid domain {domain!r}: {exc}") from None


class Resolver:
    """Async MX resolver with a TTL cache and in-flight dedupe, shared by all deliveries of a worker.

    `stats` counts cache hits, misses (lookups sent), lookups in flight, callers that joined a lookup
    already in flight ("coalesced") and lookups that ended in a transient error ("errors").
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 5.0,
        *,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        self.clock = time.monotonic
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "inflight": 0, "coalesced": 0, "errors": 0}
        self._dns = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(address, port)
                for host, port in nameservers
                for address in _addresses_of(host, port)
            ]
        # Split the budget so a dead first server still leaves time to ask the next one.
        self._dns.timeout = timeout / len(self._dns.nameservers)
        self._dns.lifetime = timeout
        self._cache: OrderedDict[str, tuple[float, _Outcome]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Outcome]] = {}

    async def next_hops(self, domain: str) -> list[NextHop]:
        """Where to connect for `domain`, best first; raises DnsPermanentError or DnsTransientError."""
        if domain.startswith("[") and domain.endswith("]"):
            return [_literal(domain)]
        key = domain.lower().rstrip(".")
        outcome = self._cached(key)
        if outcome is None:
            outcome = await self._shared_lookup(key, _qname(domain))
        else:
            self.stats["hits"] += 1
        if outcome.error is not None:
            cls, code, enhanced, text = outcome.error
            raise cls(code, enhanced, text)
        assert outcome.groups is not None
        return _flatten(outcome.groups)

    def _cached(self, key: str) -> _Outcome | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, outcome = entry
        if self.clock() >= expires:
            del self._cache[key]
            return None
        return outcome

    async def _shared_lookup(self, key: str, qname: dns.name.Name) -> _Outcome:
        task = self._inflight.get(key)
        if task is None:
            self.stats["misses"] += 1
            task = asyncio.ensure_future(self._lookup(key, qname))
            self._inflight[key] = task
            self.stats["inflight"] += 1
            task.add_done_callback(lambda _: self._finish(key))
        else:
            self.stats["coalesced"] += 1
        return await asyncio.shield(task)

    def _finish(self, key: str) -> None:
        del self._inflight[key]
        self.stats["inflight"] -= 1

    async def _lookup(self, key: str, qname: dns.name.Name) -> _Outcome:
        try:
            async with asyncio.timeout(self.timeout):
                outcome = await self._resolve(qname)
        except TimeoutError:
            outcome = _transient(f"DNS lookup of {key} timed out after {self.timeout:g}s")
        if outcome.error is not None and outcome.error[0] is DnsTransientError:
            self.stats["errors"] += 1
        self._store(key, outcome)
        return outcome

    def _store(self, key: str, outcome: _Outcome) -> None:
        self._cache[key] = (self.clock() + outcome.ttl, outcome)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _resolve(self, qname: dns.name.Name) -> _Outcome:
        domain = qname.to_text(omit_final_dot=True)
        try:
            answer = await self._dns.resolve(qname, "MX", raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            ttl = _negative_ttl(next(iter(exc.responses().values()), None))
            return _permanent(550, "5.1.2", f"domain {domain} does not exist", ttl)
        except dns.exception.DNSException as exc:
            return _transient(f"MX lookup of {domain} failed: {exc}")
        if answer.rrset is None:
            return await self._implicit_mx(qname, _negative_ttl(answer.response))
        mxs = sorted((rd.preference, rd.exchange) for rd in answer.rrset)
        ttl = float(answer.chaining_result.minimum_ttl)
        if len(mxs) == 1 and mxs[0][1] == dns.name.root:
            return _permanent(556, "5.1.10", f"domain {domain} accepts no mail (null MX)", ttl)
        mxs = [(pref, exchange) for pref, exchange in mxs if exchange != dns.name.root]
        return await self._explicit_mx(domain, mxs, ttl)

    async def _implicit_mx(self, qname: dns.name.Name, ttl: float) -> _Outcome:
        """No MX records: the domain itself is the exchange, preference 0 (RFC 5321 5.1)."""
        domain = qname.to_text(omit_final_dot=True)
        try:
            addresses, addr_ttl = await self._addresses(qname)
        except _NoAddress:
            return _permanent(550, "5.4.4", f"domain {domain} has no MX and no address records", ttl)
        except _DnsError as exc:
            return _Outcome(None, (type(exc), exc.code, exc.enhanced, exc.text), TRANSIENT_TTL)
        hops = tuple(NextHop(domain, address, 0) for address in addresses)
        return _Outcome([[hops]], None, _clamp(min(ttl, addr_ttl)))

    async def _explicit_mx(self, domain: str, mxs: list[tuple[int, dns.name.Name]], ttl: float) -> _Outcome:
        """Resolve every exchange at once; skip those without addresses, fail only if none resolve."""
        results = await asyncio.gather(*(self._addresses(exchange) for _, exchange in mxs), return_exceptions=True)
        groups: _Groups = []
        seen: set[str] = set()
        degraded = False
        for (preference, exchange), result in zip(mxs, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, _NoAddress | _DnsError):
                    raise result
                degraded = degraded or isinstance(result, DnsTransientError)
                continue
            addresses, addr_ttl = result
            fresh = [a for a in addresses if a not in seen]
            seen.update(fresh)
            ttl = min(ttl, addr_ttl)
            if not fresh:
                continue
            host = exchange.to_text(omit_final_dot=True)
            hops = tuple(NextHop(host, address, preference) for address in fresh)
            if groups and groups[-1][0][0].preference == preference:
                groups[-1].append(hops)
            else:
                groups.append([hops])
        if not groups:
            return _transient(f"no MX host of {domain} has an address")
        return _Outcome(groups, None, TRANSIENT_TTL if degraded else _clamp(ttl))

    async def _addresses(self, name: dns.name.Name) -> tuple[list[str], float]:
        """IPv4 then IPv6 addresses of a host with the smallest TTL seen; _NoAddress if it has none."""
        results = await asyncio.gather(
            self._dns.resolve(name, "A", raise_on_no_answer=False, search=False),
            self._dns.resolve(name, "AAAA", raise_on_no_answer=False, search=False),
            return_exceptions=True,
        )
        addresses: list[str] = []
        ttl = MAX_TTL
        transient: BaseException | None = None
        for result in results:
            if isinstance(result, dns.resolver.NXDOMAIN):
                continue
            if isinstance(result, dns.exception.DNSException):
                transient = result
                continue
            if isinstance(result, BaseException):
                raise result
            if result.rrset is not None:
                addresses.extend(rd.address for rd in result.rrset)
                ttl = min(ttl, float(result.chaining_result.minimum_ttl))
        if addresses:
            return addresses, ttl
        if transient is not None:
            host = name.to_text(omit_final_dot=True)
            raise DnsTransientError(451, "4.4.3", f"address lookup of {host} failed: {transient}")
        raise _NoAddress(name)


def _permanent(code: int, enhanced: str, text: str, ttl: float) -> _Outcome:
    return _Outcome(None, (DnsPermanentError, code, enhanced, text), _clamp(ttl))


def _transient(text: str) -> _Outcome:
    return _Outcome(None, (DnsTransientError, 451, "4.4.3", text), TRANSIENT_TTL)


def _flatten(groups: _Groups) -> list[NextHop]:
    """Preference order; exchanges of equal preference shuffled on every call to spread the load."""
    hops: list[NextHop] = []
    for exchanges in groups:
        for exchange in random.sample(exchanges, len(exchanges)) if len(exchanges) > 1 else exchanges:
            hops.extend(exchange)
    return hops
