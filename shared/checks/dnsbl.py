"""The ``dnsbl`` check: DNS blocklists and allowlists with weights, at connect, as postscreen's.

Each client is looked up in every zone of ``[dnsbl] zones`` at once: an IPv4
address as its reversed octets (192.0.2.1 in ``zen.example`` is
``1.2.0.192.zen.example``), an IPv6 address as its 32 reversed nibbles, an
IPv4-mapped IPv6 address as IPv4.  An entry is written as postscreen's
``postscreen_dnsbl_sites``:

    ZONE[=FILTER][*WEIGHT]

- ZONE: the list's domain;
- FILTER: which answers count: an IPv4 pattern whose octets are a number or a
  bracketed list of numbers and ranges, separated by ``;``
  (``127.0.0.[2..11]``, ``127.0.[0..255].[1;3;5..7]``); without a filter any
  answer counts;
- WEIGHT: an integer, 1 if left out; negative for an allowlist.

A zone may be named by several entries (each with its filter and weight): it is
asked once, and every entry whose filter matches one of its answers adds its
weight, once.  The sum is the client's score:

- score >= ``threshold`` (1): the client is listed, and ``action`` says what
  follows (see below); one log line names its address, port, score and the
  entries that matched;
- ``allowlist_threshold`` < 0 and score <= it: the client is allowlisted.  The
  verdict's result (:class:`DnsblResult`, ``Request.results["dnsbl"]`` for the
  checks after it, :func:`allowlisted`) says so, and the pregreet test of a
  listener with ``greet_wait`` ends for it as soon as this is known, as
  postscreen lets a client its allowlists vouch for skip its greeting tests.

``action``, measured against postscreen's ``postscreen_dnsbl_action``:

- ``reject`` (the default): 554 5.7.1 instead of the greeting, naming the zones
  that list the client; the session is then closed (a 5xx greeting ends the
  session, RFC 5321 3.1).  Postscreen's ``drop`` does the same with 521.
  Postscreen's ``enforce`` (talk on, refuse each RCPT, to log whom the client
  wanted to mail) is not offered: the edge would hold a session for a client it
  already judged, and the log line already says who was refused and why.
- ``tempfail``: 421 4.7.0 instead of the greeting, and closed.  A real MTA comes
  back later, so mail from a client a new list wrongly names is delayed, never
  lost, while the log shows whom the list would refuse.
- ``ignore``: only the log line, as postscreen's ``ignore`` (which is
  postscreen's default; here a list is only asked once it is configured, and
  refusing is what it is configured for).

Lists fail open, as postscreen's: a zone that does not answer within
``timeout`` (``[dns] timeout`` unless set), answers SERVFAIL or REFUSED, or
gives an answer that is no listing -- an address outside 127.0.0.0/8, or one
in 127.255.255.0/24, where lists put their error codes (Spamhaus: .252 bad
query, .254 query through a public resolver, .255 over quota) -- counts as not
listing the client.  That is logged once a minute per zone at most, not once
per client: a list that is down must not flood the log.

Caching.  Each zone's answer is kept for its TTL (an NXDOMAIN for its SOA's
negative TTL), held between ``min_ttl`` and ``max_ttl``, as postscreen's
``postscreen_dnsbl_min_ttl``/``max_ttl``; a client that was not listed, when
every zone gave an answer, is not looked up again for ``pass_ttl`` (the role of
``postscreen_dnsbl_ttl``).  Both caches hold at most ``cache_size`` entries and
are kept across reloads (``BuildContext.kept``); answers are kept by query name
(they do not depend on the configuration), passes only for the zone list,
thresholds and weights they were computed with: a reload that changes those
starts the passes afresh.

``relay.mynetworks`` and ``server.upstream_hosts`` are never looked up.  All
lookups run on the reactor through twisted.names (:mod:`shared.dns`), never in
a thread; a client whose answers are all cached is decided without a Deferred.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error as dns_error

from shared.checks.core import CONTINUE, Request, Verdict, note, reject, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import DAY, WEEK, Section, bounded, choice, domain, setting
from shared.dns import ExpiringCache, client_ip, client_resolver, records_for, retire_resolver, retry_schedule
from shared.netlist import NetworkList

log = Logger(namespace="smarthost.dnsbl")

ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
LISTINGS = ipaddress.IPv4Network("127.0.0.0/8")
REPORT_INTERVAL = 60            # seconds between two reports of one zone's failures


# -- the zones entries ----------------------------------------------------------------

Octet = tuple[tuple[int, int], ...]          # ranges (low, high) of one octet


@dataclass(frozen=True)
class Site:
    """One ``zones`` entry: the zone, the answers that count (None: all) and its weight."""
    zone: str
    codes: tuple[Octet, Octet, Octet, Octet] | None
    weight: int                             # the edge's; a score (float) in the filter's lists
    text: str                               # as written, for the log and check-config

    def matches(self, addresses: tuple[str, ...]) -> bool:
        if self.codes is None:
            return bool(addresses)
        return any(all(any(lo <= int(n) <= hi for lo, hi in ranges)
                       for n, ranges in zip(a.split("."), self.codes)) for a in addresses)


_ENTRY = re.compile(r"(?P<zone>[^=*]+)(?:=(?P<filter>[^*]*))?(?:\*(?P<weight>.*))?\Z")
_OCTET = r"([0-9]{1,3}|\[[^\]]*\])"
_FILTER = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}\Z")
_NUMBER = re.compile(r"[0-9]{1,3}\Z")
_WEIGHT = re.compile(r"[+-]?[0-9]{1,6}\Z")


def _integer_weight(given: str | None, text: str) -> int:
    """The edge's weight: an integer, 1 when left out, never 0."""
    if given is None:
        return 1
    if not _WEIGHT.match(given):
        raise ValueError(f"{text!r}: the weight {given!r} is not an integer (negative for an allowlist)")
    weight = int(given)
    if weight == 0:
        raise ValueError(f"{text!r}: a weight of 0 would make the zone count for nothing")
    return weight


def parse_site(text: str, weight: Callable[[str | None, str], float] = _integer_weight,
               example: str = "bl.example=127.0.0.[2..11]*2") -> Site:
    """A ``zones`` entry; ValueError naming the entry and what is wrong with it.  `weight`
    reads what follows ``*`` (None when there is nothing): the edge's integer weights by
    default, the filter's scores (:mod:`filter.dnslists`) otherwise."""
    m = _ENTRY.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not ZONE[=FILTER][*WEIGHT], e.g. {example}")
    try:
        zone = domain(m["zone"])
    except ValueError:
        raise ValueError(f"{text!r}: {m['zone']!r} is not a domain name") from None
    codes = None if m["filter"] is None else _parse_filter(m["filter"], text)
    return Site(zone, codes, weight(m["weight"], text), text.strip())


def _parse_filter(pattern: str, text: str):
    m = _FILTER.match(pattern)
    if m is None:
        raise ValueError(f"{text!r}: the filter {pattern!r} is not an IPv4 pattern such as 127.0.0.2 or "
                         f"127.0.0.[2..11] or 127.0.[0..255].[1;3]")
    octets = tuple(_parse_octet(part, text) for part in m.groups())
    if not any(lo <= 127 <= hi for lo, hi in octets[0]):
        raise ValueError(f"{text!r}: the filter {pattern!r} never matches: lists answer inside 127.0.0.0/8")
    return octets


def _parse_octet(part: str, text: str) -> Octet:
    items = part[1:-1].split(";") if part.startswith("[") else [part]
    ranges = []
    for item in items:
        low, dots, high = item.strip().partition("..")
        if not _NUMBER.match(low) or (dots and not _NUMBER.match(high)):
            raise ValueError(f"{text!r}: {item.strip()!r} in {part!r} is neither a number nor a range A..B")
        lo, hi = int(low), int(high) if dots else int(low)
        if not lo <= hi <= 255:
            raise ValueError(f"{text!r}: {item.strip()!r}: octets run from 0 to 255, the lower one first")
        ranges.append((lo, hi))
    return tuple(ranges)


def _site_rule(value: str) -> str:
    parse_site(value)
    return value


# -- settings -------------------------------------------------------------------------

@dataclass(frozen=True)
class DnsblSettings:
    """DNS blocklists and allowlists with weights, at connect (the check `dnsbl`)"""
    zones: tuple = setting((), "'ZONE[=FILTER][*WEIGHT]' entries, as postscreen_dnsbl_sites: e.g. "
                               "'zen.example*3', 'bl.example=127.0.0.[2..11]*2', "
                               "'wl.example=127.0.[0..255].[1..3]*-5'; FILTER's octets are numbers or "
                               "[lists] of numbers and A..B ranges separated by ';'; WEIGHT an integer, "
                               "1 if left out, negative for an allowlist (empty: the check is off)",
                           _site_rule)
    threshold: int = setting(1, "a client whose weights add up to at least this is listed "
                                "(postscreen_dnsbl_threshold)", bounded(1, 10_000))
    allowlist_threshold: int = setting(0, "0: off; below 0, a client whose weights add up to at most this "
                                          "is allowlisted: later checks see it and a listener's pregreet "
                                          "wait ends for it (postscreen_dnsbl_allowlist_threshold)",
                                       bounded(-10_000, 0))
    action: str = setting("reject", "for a listed client: reject (554 5.7.1 instead of the greeting, "
                                    "naming the zones, then closed), tempfail (421 4.7.0, closed: it comes "
                                    "back later) or ignore (log only)",
                          choice("reject", "tempfail", "ignore"))
    timeout: float = setting(0.0, "seconds the lookups of one client may take, all zones together; a zone "
                                  "without an answer by then counts as not listing (0: [dns] timeout)",
                             bounded(0, 60))
    min_ttl: int = setting(60, "shortest time an answer is kept, seconds, whatever its TTL "
                               "(postscreen_dnsbl_min_ttl)", bounded(0, DAY))
    max_ttl: int = setting(3600, "longest time an answer is kept, seconds (postscreen_dnsbl_max_ttl)",
                           bounded(0, WEEK))
    pass_ttl: int = setting(3600, "seconds a client that was not listed (every zone answered) is not looked "
                                  "up again (postscreen_dnsbl_ttl's role; 0: every connection is)",
                            bounded(0, WEEK))
    cache_size: int = setting(100_000, "answers kept, and passes kept, at most (each; the oldest go first)",
                              bounded(1, 10_000_000))


def _finish(ld) -> None:
    own = ld.values["dnsbl"]
    if own["min_ttl"] > own["max_ttl"]:
        raise ld.error("dnsbl.min_ttl", f"{own['min_ttl']} is more than max_ttl ({own['max_ttl']})")
    sites = [parse_site(text) for text in own["zones"]]
    seen = set()
    for site in sites:
        if (site.zone, site.codes) in seen:
            raise ld.error("dnsbl.zones", f"{site.text!r}: {site.zone} with this filter is listed twice "
                                          f"(its weight would count twice: give one entry the sum)")
        seen.add((site.zone, site.codes))
    if sites and own["allowlist_threshold"] == 0 and all(s.weight < 0 for s in sites):
        ld.warn("dnsbl.zones", "only allowlists (negative weights) and no allowlist_threshold: "
                               "the check can neither refuse nor allowlist anyone")
    if own["allowlist_threshold"] < 0 and not any(s.weight < 0 for s in sites):
        ld.warn("dnsbl.allowlist_threshold", "no zone has a negative weight: no client is ever allowlisted")


# -- what the check found -------------------------------------------------------------

@dataclass(frozen=True)
class DnsblResult:
    """What the check found: the Verdict's ``result``, which the checks after it see in
    ``Request.results["dnsbl"]``."""
    score: int
    hits: tuple[str, ...] = ()          # the entries that matched, as written
    listing_zones: tuple[str, ...] = ()  # the zones of the positive entries that matched
    allowlisted: bool = False
    failed: tuple[str, ...] = ()        # zones without a usable answer (counted as not listing)
    cached: bool = False                # a pass from the pass cache: no zone was asked


def allowlisted(request: Request) -> bool:
    """Whether the dnsbl check allowlisted this session's client (for the checks after it)."""
    verdict = request.results.get("dnsbl")
    return verdict is not None and getattr(verdict.result, "allowlisted", False)


@dataclass(frozen=True)
class Answer:
    """One zone's answer for one client: its addresses (none: not listed), or why there is
    no usable answer."""
    addresses: tuple[str, ...] = ()
    problem: str | None = None


class DnsblState:
    """What outlives a reload: the answers by query name, the passes of one configuration,
    and when each zone's failure was last reported."""

    def __init__(self, clock, size: int) -> None:
        self.clock = clock
        self.answers = ExpiringCache(clock, size)
        self.passes = ExpiringCache(clock, size)
        self.passes_of = None               # the configuration the passes were computed with
        self.reported: dict[str, float] = {}

    def passes_for(self, configuration, size: int) -> ExpiringCache:
        """The passes of `configuration` (new ones if the last build had another), both
        caches now bounded by `size`."""
        if configuration != self.passes_of:
            self.passes, self.passes_of = ExpiringCache(self.clock, size), configuration
        self.answers.resize(size)
        self.passes.resize(size)
        return self.passes


def listing_problem(addresses) -> str | None:
    """Why a list's answer (its A records' addresses) is no listing, or None when it is one:
    an address in 127.255.255.0/24 is the list's error code, one outside 127.0.0.0/8 is
    not a list's answer at all (a resolver that rewrites NXDOMAIN, a wildcard)."""
    for a in addresses:
        ip = ipaddress.IPv4Address(a)
        if ip in ERROR_CODES:
            return f"answered {a}, an error code (queries refused, or over quota)"
        if ip not in LISTINGS:
            return f"answered {a}, outside 127.0.0.0/8: not a listing"
    return None


def report_due(reported: dict[str, float], zone: str, now: float) -> bool:
    """Whether a failure of `zone` is to be logged now (once per REPORT_INTERVAL at most;
    `reported` keeps when each zone's was last)."""
    last = reported.get(zone)
    if last is not None and now - last < REPORT_INTERVAL:
        return False
    reported[zone] = now
    return True


def query_name(ip, zone: str) -> str:
    """The name that asks `zone` about `ip`: reversed octets or nibbles, then the zone."""
    return f"{ip.reverse_pointer.rsplit('.', 2)[0]}.{zone}"


_ERRORS = ((dns_error.DNSServerError, "SERVFAIL"), (dns_error.DNSQueryRefusedError, "REFUSED"),
           (dns_error.DNSFormatError, "FORMERR"), (dns_error.DNSNotImplementedError, "NOTIMP"),
           (defer.TimeoutError, "timed out"), (dns_error.DNSQueryTimeoutError, "timed out"))


class Dnsbl:
    """The check (see the module docstring).  `resolver` is any twisted.names IResolver
    (tests); without it one is made on the first lookup from `nameservers` (or
    /etc/resolv.conf)."""

    def __init__(self, own: DnsblSettings, *, reactor, state: DnsblState, exempt: NetworkList, hostname: str,
                 timeout: float, nameservers=None, resolver=None) -> None:
        self.own = own
        self.reactor = reactor
        self.state = state
        self.exempt = exempt
        self.hostname = hostname
        self.timeout = timeout
        self.retries = retry_schedule(timeout)
        self.nameservers = nameservers
        self.resolver = resolver
        self.sites = tuple(parse_site(text) for text in own.zones)
        self.zones = tuple(dict.fromkeys(site.zone for site in self.sites))
        self.passes = state.passes_for((self.sites, own.threshold, own.allowlist_threshold), own.cache_size)
        self.queries_sent = 0

    def __call__(self, request: Request):
        try:
            ip = client_ip(request.client_address)
        except ValueError:
            return CONTINUE
        if request.client_address in self.exempt:
            return CONTINUE
        passed = self.passes.get(str(ip))
        if passed is not None:
            return note(replace(passed, cached=True))
        names = {zone: query_name(ip, zone) for zone in self.zones}
        known = {}
        for zone, name in names.items():
            addresses = self.state.answers.get(name)
            if addresses is not None:
                known[zone] = Answer(addresses)
        if len(known) == len(names):
            return self._decide(request, str(ip), known)
        return self._ask(names, known).addCallback(lambda answers: self._decide(request, str(ip), answers))

    def close(self) -> None:
        """This configuration is replaced: its resolver stops re-reading resolv.conf."""
        if self.resolver is not None:
            retire_resolver(self.resolver)

    # -- lookups ------------------------------------------------------------------

    def _ask(self, names: dict[str, str], known: dict[str, Answer]) -> defer.Deferred:
        """Ask every zone not `known` at once; a Deferred of every zone's Answer within the
        timeout.  Queries still out then are abandoned (not cancelled: twisted.names shares
        one query among identical callers; their own retry schedule ends them)."""
        answers = dict(known)
        done: defer.Deferred = defer.Deferred()

        def finish() -> None:
            if done.called:
                return
            if timer.active():
                timer.cancel()
            for zone in names:
                answers.setdefault(zone, Answer(problem=f"no answer within {self.timeout:g}s"))
            done.callback(answers)

        def answered(answer: Answer, zone: str) -> None:
            if not done.called:
                answers[zone] = answer
                if len(answers) == len(names):
                    finish()

        timer = self.reactor.callLater(self.timeout, finish)
        for zone, name in names.items():
            if zone not in known:
                self._query(name).addCallback(answered, zone)
        return done

    def _query(self, name: str) -> defer.Deferred:
        """A Deferred of the Answer to one query; never fails."""
        if self.resolver is None:
            self.resolver = client_resolver(self.reactor, self.nameservers, self.retries)
        self.queries_sent += 1
        d = defer.maybeDeferred(self.resolver.lookupAddress, name.encode("ascii"), self.retries)
        return d.addCallbacks(self._answered, self._failed, callbackArgs=(name,), errbackArgs=(name,))

    def _answered(self, result, name: str) -> Answer:
        records = records_for(result[0], name, dns.A)
        if not records:                       # NODATA: the name exists, but not as a listing
            self._keep(name, (), _negative_ttl(result[1]))
            return Answer()
        addresses = tuple(sorted({payload.dottedQuad() for payload, _ in records}))
        problem = listing_problem(addresses)
        if problem is not None:
            return Answer(problem=problem)
        self._keep(name, addresses, min(ttl for _, ttl in records))
        return Answer(addresses)

    def _failed(self, failure, name: str) -> Answer:
        if failure.check(dns_error.DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            self._keep(name, (), _negative_ttl(getattr(message, "authority", ())))
            return Answer()
        for kind, text in _ERRORS:
            if failure.check(kind):
                return Answer(problem=text)
        return Answer(problem=failure.getErrorMessage() or failure.type.__name__)

    def _keep(self, name: str, addresses: tuple[str, ...], ttl: float | None) -> None:
        own = self.own
        ttl = own.min_ttl if ttl is None else max(own.min_ttl, min(ttl, own.max_ttl))
        self.state.answers.put(name, addresses, ttl)

    # -- the verdict --------------------------------------------------------------

    def _decide(self, request: Request, key: str, answers: dict[str, Answer]) -> Verdict:
        own = self.own
        failed = tuple(zone for zone in self.zones if answers[zone].problem is not None)
        for zone in failed:
            self._report(zone, answers[zone].problem)
        hits = [site for site in self.sites if site.matches(answers[site.zone].addresses)]
        score = sum(site.weight for site in hits)
        listing = tuple(dict.fromkeys(site.zone for site in hits if site.weight > 0))
        result = DnsblResult(score, tuple(site.text for site in hits), listing,
                             own.allowlist_threshold < 0 and score <= own.allowlist_threshold, failed)
        where = f"[{request.client_address}]:{request.client_port or '-'}"
        if score >= own.threshold:
            text = f"{self.hostname}: client [{request.client_address}] is listed by {', '.join(listing)}"
            verdict = {"reject": reject(554, "5.7.1", text), "tempfail": tempfail(421, "4.7.0", text),
                       "ignore": note(result)}[own.action]
            done = "not refused (action ignore)" if own.action == "ignore" else \
                f"refused with {verdict.reply.code} {verdict.reply.enhanced}"
            log.info("dnsbl: score {score} for {where} (threshold {threshold}; {hits}): {done}", score=score,
                     where=where, threshold=own.threshold, hits=", ".join(result.hits), done=done)
            return replace(verdict, result=result)
        if result.allowlisted:
            log.info("dnsbl: score {score} for {where} (allowlist threshold {threshold}; {hits}): allowlisted",
                     score=score, where=where, threshold=own.allowlist_threshold, hits=", ".join(result.hits))
        if not failed:
            self.passes.put(key, result, own.pass_ttl)
        return note(result)

    def _report(self, zone: str, problem: str) -> None:
        """Log a zone's failure, once per REPORT_INTERVAL at most."""
        if not report_due(self.state.reported, zone, self.reactor.seconds()):
            return
        log.warn("dnsbl: zone {zone}: {problem}; counted as not listing (reported once a minute at most)",
                 zone=zone, problem=problem)


def _negative_ttl(authority) -> int | None:
    """How long a "not listed" may be kept: the SOA's negative TTL (RFC 2308), if it came."""
    ttls = [min(rr.ttl, rr.payload.minimum) for rr in authority if rr.type == dns.SOA]
    return min(ttls) if ttls else None


# -- registration ---------------------------------------------------------------------

def _active(own: DnsblSettings, settings=None) -> bool:
    return bool(own.zones)


def _timeout(own: DnsblSettings, settings) -> float:
    return own.timeout or settings.dns.timeout


def _build(own: DnsblSettings, ctx):
    if not _active(own):
        return None
    s = ctx.settings
    state = ctx.kept("dnsbl", lambda: DnsblState(ctx.reactor, own.cache_size))
    check = Dnsbl(own, reactor=ctx.reactor, state=state, hostname=s.hostname, timeout=_timeout(own, s),
                  exempt=NetworkList([*s.relay.mynetworks, *s.server.upstream_hosts]),
                  nameservers=s.dns.nameservers or None)
    ctx.on_retire(check.close)
    return check


def _summary(own: DnsblSettings, settings) -> str:
    allow = own.allowlist_threshold or "off"
    return (f"zones {', '.join(own.zones)}; threshold {own.threshold}; allowlist_threshold {allow}; "
            f"action {own.action}; lookups within {_timeout(own, settings):g}s")


DNSBL = CheckType("dnsbl", phases=("connect",), build=_build,
                  section=Section.of("dnsbl", DnsblSettings, finish=_finish), active=_active,
                  timeout=lambda s: _timeout(s.dnsbl, s) + 1, summary=_summary,
                  doc="DNS blocklists and allowlists with weights, as postscreen's: 554 5.7.1 at connect "
                      "for a listed client (off until [dnsbl] zones is set)")
