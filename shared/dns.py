"""The client's verified reverse name: forward-confirmed reverse DNS, without blocking.

The edge learns each client's name the way Postfix's smtpd does:

1. PTR lookup of the client address (``in-addr.arpa``, or the ``ip6.arpa``
   nibble form; an IPv4-mapped IPv6 address is looked up as IPv4);
2. for each PTR name (at most ``MAX_PTR_NAMES``), a forward lookup of the
   client's own family (A for IPv4, AAAA for IPv6);
3. the name is *verified* only if one of those forward addresses equals the
   client address.  Anything else leaves the client "unknown".

Statuses (``ReverseName.status``):

``verified``    a PTR name resolves back to the client address; ``name`` is set.
``unverified``  PTR records exist, but none of their valid names resolves back
                (or every PTR name is syntactically invalid).
``none``        no PTR record (NXDOMAIN, or an empty answer).
``tempfail``    SERVFAIL, REFUSED, timeout or any other temporary failure, of
                the PTR lookup or of a forward lookup when no name verified.

What this module trusts: nothing that DNS says about itself.  Records count
only if their owner is the queried name (or a CNAME chain from it, within the
same answer); PTR names must be valid hostnames (letter-digit-hyphen labels of at most 63
characters, underscore tolerated as it occurs in real PTR data; no all-numeric
top label, so a PTR of "1.2.3.4" is refused);
a name is returned only after the forward check.  Names are lower-case, without
the trailing dot.

Everything runs on the reactor through ``twisted.names`` (no threads).  The
whole lookup is bounded by ``timeout`` with one reactor timer; when it fires
or the answer is decided early, queries still outstanding are abandoned: their
results are ignored, and their own retry timers (which add up to ``timeout``)
end them.  They are deliberately not cancelled, because ``twisted.names`` shares
one in-flight query among identical callers, and cancelling it would fail the
other lookups waiting on it.

Results are cached per address: positive ones for min(record TTLs, 3600 s),
negative ones ("none", "unverified") for 60 s; temporary failures are not
cached.  The cache is bounded (oldest entry evicted first).  Concurrent lookups
of one address share one DNS exchange.

The DNSBL check (:mod:`shared.checks.dnsbl`) shares the parts that are not about
reverse names: the twisted.names client (:func:`client_resolver`, its retry
schedule), the bounded cache (:class:`ExpiringCache`) and :func:`records_for`.
"""
from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure

VERIFIED = "verified"
UNVERIFIED = "unverified"
NONE = "none"
TEMPFAIL = "tempfail"

MAX_PTR_NAMES = 5
POSITIVE_TTL_MAX = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 10_000
CNAME_HOPS = 8

log = Logger()

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z", re.ASCII)


def valid_hostname(name: str) -> bool:
    """A lower-case name without trailing dot that may stand for a host (RFC 1123)."""
    if not name or len(name) > 253 or not _HOSTNAME.match(name):
        return False
    return not name.rpartition(".")[2].isdigit()


@dataclass(frozen=True)
class ReverseName:
    name: str | None          # the verified name, or None
    status: str               # VERIFIED | UNVERIFIED | NONE | TEMPFAIL
    ptr: str | None = None    # the first valid PTR name seen, verified or not

    @property
    def hostname(self) -> str:
        """The name for Received headers and logs: the verified name or "unknown"."""
        return self.name or "unknown"

    @property
    def xclient_name(self) -> str:
        """The XCLIENT NAME value: the verified name, [TEMPUNAVAIL] or [UNAVAILABLE]."""
        if self.name:
            return self.name
        return "[TEMPUNAVAIL]" if self.status == TEMPFAIL else "[UNAVAILABLE]"

    @property
    def xclient_reverse_name(self) -> str:
        """The XCLIENT REVERSE_NAME value: the PTR name, verified or not."""
        if self.ptr:
            return self.ptr
        return "[TEMPUNAVAIL]" if self.status == TEMPFAIL else "[UNAVAILABLE]"


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse a client address as the transport gives it; IPv4-mapped IPv6 becomes IPv4.

    Accepts "[...]" brackets, an "IPv6:" prefix and a "%zone" suffix.
    Raises ValueError for anything that is not an IP address.
    """
    text = address
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.partition("%")[0]
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ExpiringCache:
    """Key -> value, each entry with its own expiry, at most `size` entries (the oldest
    written is dropped first).  Reverse names (address -> ReverseName) and DNSBL
    answers (:mod:`shared.checks.dnsbl`) are kept in one."""

    def __init__(self, clock, size: int = CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError("cache size must be at least 1")
        self.clock = clock
        self.size = size
        self.entries: OrderedDict[str, tuple[float, ReverseName]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> ReverseName | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock.seconds():
            del self.entries[key]
            return None
        return entry[1]

    def resize(self, size: int) -> None:
        """At most `size` entries from now on (the oldest go at the next write)."""
        if size < 1:
            raise ValueError("cache size must be at least 1")
        self.size = size

    def put(self, key: str, value: ReverseName, ttl: float) -> None:
        if ttl <= 0:
            return
        self.entries.pop(key, None)
        self.entries[key] = (self.clock.seconds() + ttl, value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


ReverseCache = ExpiringCache     # its name where it holds reverse names


def _name_text(raw: bytes) -> str:
    """A DNS name as lower-case text without the trailing dot (ASCII case folding only)."""
    return raw.lower().decode("latin-1").rstrip(".")


def records_for(answers, qname: str, rtype: int) -> list[tuple[Any, int]]:
    """(payload, ttl) of the `rtype` records answering `qname`, following CNAMEs in the answer.

    The TTL of each record is capped by the TTLs of the CNAMEs that led to it.
    """
    cnames: dict[str, tuple[str, int]] = {}
    for rr in answers:
        if rr.type == dns.CNAME:
            cnames.setdefault(_name_text(rr.name.name), (_name_text(rr.payload.name.name), rr.ttl))
    owners = {qname: 2**31}
    name, ttl = qname, 2**31
    for _ in range(CNAME_HOPS):
        if name not in cnames:
            break
        name, hop_ttl = cnames[name]
        ttl = min(ttl, hop_ttl)
        if name in owners:
            break
        owners[name] = ttl
    found = []
    for rr in answers:
        if rr.type == rtype:
            chain_ttl = owners.get(_name_text(rr.name.name))
            if chain_ttl is not None:
                found.append((rr.payload, min(rr.ttl, chain_ttl)))
    return found


def _is_negative(reason: Failure) -> bool:
    """NXDOMAIN: the name does not exist (a permanent answer, unlike every other error)."""
    return reason.check(dns_error.DNSNameError) is not None


def retry_schedule(timeout: float) -> tuple[float, float]:
    """One query's retransmission schedule: a first try and one retry, `timeout` together."""
    return (timeout * 0.4, timeout * 0.6)


def client_resolver(reactor, nameservers: list[tuple[str, int]] | None, retries: tuple[float, ...],
                    resolv_conf: str = "/etc/resolv.conf"):
    """A twisted.names client for `nameservers` ((host, port) pairs) or, without them, the
    servers of `resolv_conf` (read now, and again each minute when it changed: see
    :func:`retire_resolver`)."""
    from twisted.names import client
    if nameservers:
        return client.Resolver(servers=list(nameservers), timeout=retries, reactor=reactor)
    return client.Resolver(resolv=resolv_conf, timeout=retries, reactor=reactor)


def retire_resolver(resolver) -> None:
    """Stop a client_resolver's timer that reads resolv.conf again (it would run forever)."""
    call = getattr(resolver, "_parseCall", None)
    if call is not None and call.active():
        call.cancel()


class ReverseResolver:
    """Looks up verified reverse names; see the module docstring.

    `reactor` gives time and (unless `resolver` is given) UDP/TCP.  `nameservers`
    are (host, port) pairs; without them /etc/resolv.conf (`resolv_conf`) is used.
    `resolver` is any twisted.names IResolver, for tests.  No resolver is made
    and no file is read until the first lookup.
    """

    def __init__(self, *, reactor, nameservers: list[tuple[str, int]] | None = None,
                 timeout: float = 5.0, resolver=None, cache_size: int = CACHE_SIZE,
                 resolv_conf: str = "/etc/resolv.conf") -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.reactor = reactor
        self.nameservers = [(str(h), int(p)) for h, p in nameservers] if nameservers else None
        self.timeout = float(timeout)
        self.retries = retry_schedule(self.timeout)
        self.resolv_conf = resolv_conf
        self.resolver = resolver
        self.cache = ReverseCache(reactor, cache_size)
        self.inflight: dict[str, _Lookup] = {}
        self.queries_sent = 0

    def backend(self):
        """The IResolver the queries go to, made on first use."""
        if self.resolver is None:
            self.resolver = client_resolver(self.reactor, self.nameservers, self.retries, self.resolv_conf)
        return self.resolver

    def lookup(self, address: str) -> defer.Deferred:
        """Deferred firing with a ReverseName for `address`; never errbacks.

        An `address` that is not an IP address gives status "none".
        """
        try:
            ip = client_ip(address)
        except (ValueError, TypeError, AttributeError):
            return defer.succeed(ReverseName(None, NONE))
        key = str(ip)
        cached = self.cache.get(key)
        if cached is not None:
            return defer.succeed(cached)
        job = self.inflight.get(key)
        if job is not None:
            return job.subscribe()
        job = _Lookup(self, key, ip)
        self.inflight[key] = job
        d = job.subscribe()
        job.start()
        return d

    def ask(self, kind: int, name: str, handler: Callable[[Any], None]) -> None:
        """Send one query; `handler` gets the (answers, authority, additional) or a Failure."""
        def send():
            backend = self.backend()
            method = {dns.PTR: backend.lookupPointer, dns.A: backend.lookupAddress,
                      dns.AAAA: backend.lookupIPV6Address}[kind]
            return method(name.encode("ascii"), self.retries)
        self.queries_sent += 1
        d = defer.maybeDeferred(send)
        d.addBoth(handler)
        d.addErrback(lambda f: log.failure("reverse DNS handler failed", f))

    def finished(self, job: "_Lookup", result: ReverseName, ttl: float | None) -> None:
        if self.inflight.get(job.key) is job:
            del self.inflight[job.key]
        if result.status == VERIFIED:
            self.cache.put(job.key, result, min(ttl if ttl is not None else 0, POSITIVE_TTL_MAX))
        elif result.status in (NONE, UNVERIFIED):
            self.cache.put(job.key, result, NEGATIVE_TTL)


class _Lookup:
    """One address's FCrDNS exchange: a PTR query, then forward queries, under one timer."""

    def __init__(self, owner: ReverseResolver, key: str, ip) -> None:
        self.owner = owner
        self.key = key
        self.ip = ip
        self.waiters: list[defer.Deferred] = []
        self.result: ReverseName | None = None
        self.timer = None
        self.ptr: str | None = None
        self.ptr_ttl = 0
        self.forward_left = 0
        self.forward_tempfail = False

    def subscribe(self) -> defer.Deferred:
        if self.result is not None:
            return defer.succeed(self.result)
        d: defer.Deferred = defer.Deferred()
        self.waiters.append(d)
        return d

    def start(self) -> None:
        self.timer = self.owner.reactor.callLater(self.owner.timeout, self.expired)
        self.owner.ask(dns.PTR, self.ip.reverse_pointer, self.guarded(self.on_ptr))

    def guarded(self, handler):
        """Ignore answers after the lookup ended; turn a bug in `handler` into a tempfail."""
        def run(result):
            if self.result is not None:
                return None
            try:
                handler(result)
            except Exception:
                log.failure("reverse DNS lookup of {addr} failed", addr=self.key)
                self.finish(TEMPFAIL)
            return None
        return run

    def expired(self) -> None:
        self.timer = None
        self.finish(TEMPFAIL)

    def on_ptr(self, result) -> None:
        if isinstance(result, Failure):
            self.finish(NONE if _is_negative(result) else TEMPFAIL)
            return
        records = records_for(result[0], self.ip.reverse_pointer, dns.PTR)
        if not records:
            self.finish(NONE)
            return
        names: list[str] = []
        ttls: list[int] = []
        for payload, ttl in records:
            name = _name_text(payload.name.name)
            if valid_hostname(name) and name not in names:
                names.append(name)
                ttls.append(ttl)
        if not names:
            self.finish(UNVERIFIED)
            return
        del names[MAX_PTR_NAMES:]
        self.ptr = names[0]
        kind = dns.A if self.ip.version == 4 else dns.AAAA
        self.forward_left = len(names)
        for name, ttl in zip(names, ttls):
            self.owner.ask(kind, name, self.guarded(self.forward_handler(name, ttl, kind)))

    def forward_handler(self, name: str, ptr_ttl: int, kind: int):
        def on_forward(result) -> None:
            self.forward_left -= 1
            if isinstance(result, Failure):
                if not _is_negative(result):
                    self.forward_tempfail = True
            else:
                for payload, ttl in records_for(result[0], name, kind):
                    if ipaddress.ip_address(payload.address) == self.ip:
                        self.finish(VERIFIED, name, min(ptr_ttl, ttl))
                        return
            if self.forward_left == 0:
                self.finish(TEMPFAIL if self.forward_tempfail else UNVERIFIED)
        return on_forward

    def finish(self, status: str, name: str | None = None, ttl: float | None = None) -> None:
        if self.result is not None:
            return
        self.result = ReverseName(name, status, self.ptr)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.owner.finished(self, self.result, ttl)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(self.result)
