"""The tier's DNS resolver for content checks: asynchronous, with timeouts and one TTL cache.

Every check that looks something up in DNS (SPF, DKIM keys, DMARC policies, ARC
keys) goes through one :class:`Resolver`, so a name looked up by one check is
in the cache for the next, and nothing waits on a socket on the reactor:

- :meth:`Resolver.lookup` runs on the reactor (``twisted.names``), bounded by
  ``[dns] timeout``; it gives a Deferred of an :class:`Answer`;
  :meth:`Resolver.prefetch` looks up several at once;
- :meth:`Resolver.cached` answers from the cache only, at once (from any thread):
  the libraries that call DNS themselves are given answers this way (pyspf's
  evaluation restarts after a miss, dkimpy gets its keys fetched before; see
  :mod:`filter.spf` and :mod:`filter.dkim`).

Answers: ``ok`` (records), ``nodata`` (the name exists, no record of the type),
``nxdomain``.  Positive answers are cached for the smallest TTL of their
records (at most :data:`MAX_TTL`), negative ones for :data:`NEGATIVE_TTL`.
A timeout, SERVFAIL, REFUSED or any other failure is a :class:`DNSTempError`:
never cached, never an empty answer, so no check takes "the server did not
answer" for "there is no record".

Records, by type: A/AAAA the address text; MX ``(preference, name)``;
PTR/CNAME/NS a name; TXT a tuple of byte strings (the record's strings, to be
joined by whoever reads it).  Names are lower case without the trailing dot.
CNAMEs in an answer are followed (:func:`shared.dns.records_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure

from shared.dns import ExpiringCache, client_resolver, records_for, retire_resolver, retry_schedule

log = Logger(namespace="smarthost.dns")

MAX_TTL = 3600
NEGATIVE_TTL = 60
CACHE_SIZE = 50_000

OK, NODATA, NXDOMAIN = "ok", "nodata", "nxdomain"

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR,
         "CNAME": dns.CNAME, "NS": dns.NS, "SPF": dns.SPF}


class DNSTempError(Exception):
    """The lookup did not give an answer: timeout, SERVFAIL, REFUSED, network error."""


@dataclass(frozen=True, slots=True)
class Answer:
    name: str
    qtype: str
    status: str                     # OK | NODATA | NXDOMAIN
    records: tuple[Any, ...] = ()

    def texts(self) -> list[bytes]:
        """TXT records, each record's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r) for r in self.records] if self.qtype == "TXT" else []


def _payload(rr_payload, qtype: str) -> Any:
    if qtype in ("A", "AAAA"):
        return rr_payload.dottedQuad() if qtype == "A" else _ipv6(rr_payload.address)
    if qtype == "MX":
        return (rr_payload.preference, str(rr_payload.name).lower().rstrip("."))
    if qtype in ("TXT", "SPF"):
        return tuple(rr_payload.data)
    return str(rr_payload.name).lower().rstrip(".")


def _ipv6(packed: bytes) -> str:
    import ipaddress
    return str(ipaddress.IPv6Address(packed))


def normal(name: str) -> str:
    return name.rstrip(".").lower()


class Resolver:
    """Lookups for content checks; see the module docstring.  `cache` may outlive the
    resolver (a reload makes a new resolver for new nameservers, keeping the answers)."""

    def __init__(self, *, reactor, nameservers: list[tuple[str, int]] | None = None, timeout: float = 5.0,
                 cache: ExpiringCache | None = None, resolver=None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.nameservers = nameservers
        self.cache = cache if cache is not None else ExpiringCache(reactor, CACHE_SIZE)
        self._resolver = resolver
        self._inflight: dict[tuple[str, str], defer.Deferred] = {}
        self.lookups = 0          # asked of a server (not the cache): for tests and benchmarks

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = client_resolver(self.reactor, self.nameservers, retry_schedule(self.timeout))
        return self._resolver

    def close(self) -> None:
        if self._resolver is not None:
            retire_resolver(self._resolver)

    def cached(self, name: str, qtype: str) -> Answer | None:
        """The cached answer, or None.  Safe from any thread: it only reads (an expired
        entry is left for the reactor's next write to replace)."""
        entry = self.cache.entries.get(f"{qtype} {normal(name)}")
        if entry is None or entry[0] <= self.reactor.seconds():
            return None
        return entry[1]

    def lookup(self, name: str, qtype: str) -> defer.Deferred:
        """A Deferred of the Answer (errback DNSTempError).  Concurrent lookups of one name
        and type share one query; the whole lookup is bounded by the timeout."""
        name = normal(name)
        answer = self.cached(name, qtype)
        if answer is not None:
            return defer.succeed(answer)
        key = (name, qtype)
        d = defer.Deferred()
        waiting = self._inflight.get(key)
        if waiting is not None:
            waiting.append(d)
            return d
        self._inflight[key] = [d]
        self._query(name, qtype).addBoth(self._deliver, key)
        return d

    def _deliver(self, result, key) -> None:
        for d in self._inflight.pop(key, ()):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _query(self, name: str, qtype: str) -> defer.Deferred:
        self.lookups += 1
        rtype = TYPES[qtype]
        d = self.resolver.query(dns.Query(name, rtype, dns.IN))
        d.addTimeout(self.timeout, self.reactor)

        def answered(result):
            answers, _authority, _additional = result
            found = records_for(answers, name, rtype)
            if not found:
                answer = Answer(name, qtype, NODATA)
                self.cache.put(f"{qtype} {name}", answer, NEGATIVE_TTL)
                return answer
            answer = Answer(name, qtype, OK, tuple(_payload(p, qtype) for p, _ in found))
            ttl = min(min(t for _, t in found), MAX_TTL)
            if ttl > 0:
                self.cache.put(f"{qtype} {name}", answer, ttl)
            return answer

        def failed(failure):
            if failure.check(dns_error.DNSNameError):
                answer = Answer(name, qtype, NXDOMAIN)
                self.cache.put(f"{qtype} {name}", answer, NEGATIVE_TTL)
                return answer
            if failure.check(defer.TimeoutError, dns_error.DNSQueryTimeoutError):
                raise DNSTempError(f"{qtype} {name}: timed out after {self.timeout:g}s")
            if failure.check(dns_error.DNSServerError):
                raise DNSTempError(f"{qtype} {name}: SERVFAIL")
            if failure.check(dns_error.DNSQueryRefusedError):
                raise DNSTempError(f"{qtype} {name}: REFUSED")
            raise DNSTempError(f"{qtype} {name}: {failure.getErrorMessage() or failure.type.__name__}")
        return d.addCallbacks(answered, failed)

    def prefetch(self, queries) -> defer.Deferred:
        """Look up every (name, qtype) of `queries` at once; a Deferred of {(name, qtype):
        Answer or DNSTempError} (names as :func:`normal` makes them), never an errback."""
        queries = list(dict.fromkeys((normal(n), t) for n, t in queries))
        if not queries:
            return defer.succeed({})
        ds = [self.lookup(n, t) for n, t in queries]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(lambda results: {q: (r if ok else r.value) for q, (ok, r) in zip(queries, results)})


def resolver_for(ctx) -> Resolver:
    """The resolver of the configuration being built (one per configuration, made on first
    use by any check, closed when the configuration is retired), over the cache the process
    keeps across reloads."""
    made = ctx.store.get("resolver:current")
    if made is not None and made[0] is ctx:
        return made[1]
    s = ctx.settings
    cache = ctx.kept("resolver:cache", lambda: ExpiringCache(ctx.reactor, CACHE_SIZE))
    resolver = Resolver(reactor=ctx.reactor, nameservers=s.dns.nameservers or None, timeout=s.dns.timeout,
                        cache=cache)
    ctx.store["resolver:current"] = (ctx, resolver)
    ctx.on_retire(resolver.close)
    return resolver
