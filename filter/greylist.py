"""Greylisting at RCPT: the check ``greylist``.

The triplet -- the client's network (``ipv4_prefix`` /24, ``ipv6_prefix`` /64), the
envelope sender and the recipient -- is refused for now the first time it is seen
(451 4.7.1, with how long to wait), accepted when the client retries after ``delay``
(300 s) and within ``retry_window`` (24 h), and remembered as passed for
``auto_allow_time`` (35 days).  A network whose triplets passed ``auto_allow_count``
times (5) is let through without greylisting for as long, as postgrey's automatic
allowlist does.  Not greylisted: authenticated submission, ``relay.mynetworks``, a
client a DNS allowlist vouches for (an earlier check's result with ``allowlisted``,
such as ``dnslists``'), and the ``networks``, ``senders`` (domains, subdomains
included) and ``recipients`` (addresses or @domains) listed.

``min_score`` > 0 greylists only messages whose score reaches it (the ``actions``
check's total), at end of data after ``actions``, every recipient's triplet at once.
``by_domain`` keys a client on its verified domain instead of its network (large
senders rotate addresses): the MAIL FROM domain when SPF passes (evaluated here at RCPT,
or the spf check's result at end of data), the From domain when DMARC passes.

Where it is kept: in Redis when the filter's ``[redis] servers`` is set (every filter
node sharing it sees the same triplets; one round trip per recipient, MGET, and one
more to record a change), else in this process.  Redis down or slow: ``on_failure =
"accept"`` (the default: greylisting fails open, logged by the Redis link and marked
GREYLIST_FAIL on the message's log line) or ``"tempfail"`` (451 4.7.1).  Greylisting
is off unless ``enabled = true``.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
from dataclasses import dataclass

from twisted.internet import defer

from shared.checks.core import CONTINUE, Request, Symbol, Verdict, note, tempfail
from shared.checks.registry import CheckType
from shared.dns import client_ip
from shared.config.schema import SECONDS, Section, bounded, choice, domain, network, setting
from shared.netlist import NetworkList
from shared.redisconn import configured, shared_link
from shared.resolver import resolver_for
from filter.mailauth import organizational_domain
from filter.spf import evaluate_async

DAY = 86400


def _recipient(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("@"):
        return "@" + domain(v[1:])
    if "@" not in v or not v.partition("@")[0]:
        raise ValueError(f"{value!r} is neither an address nor @domain")
    return v


@dataclass(frozen=True)
class GreylistSettings:
    """greylisting at RCPT (the check `greylist`)"""
    enabled: bool = setting(False, "greylist: refuse a new (network, sender, recipient) for now")
    delay: float = setting(300.0, "seconds before a retry of a new triplet is accepted", SECONDS)
    retry_window: float = setting(float(DAY), "seconds after the first try within which the retry must come",
                                  SECONDS)
    auto_allow_count: int = setting(5, "triplets of one network that passed, after which the network is not "
                                       "greylisted any more (0: never)", bounded(0, 1_000_000))
    auto_allow_time: float = setting(35.0 * DAY, "seconds a passed triplet, and an allowed network, is kept "
                                                 "(at most a year)", bounded(1, 366 * DAY))
    ipv4_prefix: int = setting(24, "the client network of an IPv4 client", bounded(8, 32))
    ipv6_prefix: int = setting(64, "the client network of an IPv6 client", bounded(16, 128))
    networks: tuple = setting((), "client networks never greylisted (CIDRs)", network)
    senders: tuple = setting((), "sender domains never greylisted (subdomains too)", domain)
    recipients: tuple = setting((), "recipients never greylisted (addresses, or @domain)", _recipient)
    min_score: float = setting(0.0, "0: greylist every triplet at RCPT; more: only messages whose score (the "
                                    "actions check's) reaches it, at end of data, as rspamd does", bounded(0, 1000))
    by_domain: bool = setting(False, "key a client on its verified domain instead of its network: the MAIL FROM "
                                     "domain when SPF passes, or (at end of data) the From domain when DMARC "
                                     "passes; large senders send from many addresses")
    spf_timeout: float = setting(5.0, "seconds the SPF evaluation of by_domain may take at RCPT", SECONDS)
    on_failure: str = setting("accept", "Redis down or slow: accept (fail open, GREYLIST_FAIL) or tempfail "
                                        "(451 4.7.1)", choice("accept", "tempfail"))


@dataclass(frozen=True, slots=True)
class Greylisted:
    result: str                # greylisted | passed | allowed | skipped | unavailable
    detail: str = ""

    @property
    def log(self) -> str:
        return f"greylist={self.result}" + (f" ({self.detail})" if self.detail else "")


class LocalStore:
    """Triplets and counts in this process (no [redis]): one filter node."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.items: dict[str, tuple[float, bytes]] = {}

    def _get(self, key: str):
        entry = self.items.get(key)
        if entry is None or entry[0] <= self.clock.seconds():
            self.items.pop(key, None)
            return None
        return entry[1]

    def mget(self, *keys: str):
        if len(self.items) > 200_000:
            now = self.clock.seconds()
            self.items = {k: v for k, v in self.items.items() if v[0] > now}
        return defer.succeed([self._get(k) for k in keys])

    def set(self, key: str, value: bytes, ttl: float):
        self.items[key] = (self.clock.seconds() + ttl, value)
        return defer.succeed(True)

    def incr(self, key: str, ttl: float):
        value = int(self._get(key) or 0) + 1
        self.items[key] = (self.clock.seconds() + ttl, str(value).encode())
        return defer.succeed(value)


class RedisStore:
    def __init__(self, link, prefix: str) -> None:
        self.link = link
        self.prefix = prefix

    def _command(self, *args):
        d = self.link.command(*args)
        if d is None:
            return defer.fail(ConnectionError(f"redis at {self.link.address} is down"))
        return d

    def mget(self, *keys: str):
        return self._command("MGET", *(self.prefix + k for k in keys))

    def set(self, key: str, value: bytes, ttl: float):
        return self._command("SET", self.prefix + key, value, "EX", max(1, math.ceil(ttl)))

    def incr(self, key: str, ttl: float):
        d = self._command("INCR", self.prefix + key)
        d.addCallback(lambda n: (self._command("EXPIRE", self.prefix + key, max(1, math.ceil(ttl))), n)[1])
        return d


class Greylist:
    name = "greylist"

    def __init__(self, own: GreylistSettings, store, clock, mynetworks, resolver=None, receiver: str = "") -> None:
        self.own = own
        self.store = store
        self.clock = clock
        self.skip_networks = NetworkList(list(own.networks) + list(mynetworks))
        self.senders = tuple(own.senders)
        self.recipients = frozenset(own.recipients)
        self.resolver = resolver              # for by_domain at RCPT: the MAIL FROM domain's SPF
        self.receiver = receiver

    def network(self, address: str) -> str | None:
        try:
            ip = client_ip(address)
        except ValueError:
            return None
        prefix = self.own.ipv4_prefix if ip.version == 4 else self.own.ipv6_prefix
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def skipped(self, request: Request) -> str | None:
        if request.login:
            return "authenticated"
        if request.client_address in self.skip_networks:
            return "allowlisted network"
        if any(getattr(v.result, "allowlisted", False) for v in request.results.values()):
            return "DNS-allowlisted client"
        sender_domain = (request.sender or "").rpartition("@")[2].lower()
        if sender_domain and any(sender_domain == d or sender_domain.endswith("." + d) for d in self.senders):
            return "allowlisted sender"
        return None

    def _listed(self, rcpt: str) -> bool:
        rcpt = rcpt.lower()
        return rcpt in self.recipients or "@" + rcpt.rpartition("@")[2] in self.recipients

    def __call__(self, request: Request):
        scored = self.own.min_score > 0
        if request.phase == "rcpt":
            if scored:                        # decided at end of data, on the message's score
                return CONTINUE
            recipients = [request.recipient or ""]
        else:
            if not scored:                    # decided at RCPT: that verdict stands (and stays on the log line)
                return request.results.get("greylist", CONTINUE)
            actions = request.results.get("actions")
            score = getattr(actions.result, "score", None) if actions is not None else None
            if score is None or score < self.own.min_score:
                return note(Greylisted("skipped", f"score {score if score is not None else 'unknown'} "
                                                  f"< {self.own.min_score:g}"))
            recipients = list(request.recipients)
        why = self.skipped(request)
        recipients = [r for r in recipients if not self._listed(r)]
        if why or not recipients:
            return note(Greylisted("skipped", why or "allowlisted recipient"))
        net = self.network(request.client_address)
        if net is None:
            return CONTINUE
        keyed = self._domain_key(request)
        if isinstance(keyed, defer.Deferred):
            return keyed.addCallback(lambda k: self._look(request, recipients, k or net))
        return self._look(request, recipients, keyed or net)

    def _domain_key(self, request: Request):
        """With ``by_domain``: the client's verified domain ("spf:example.org" or, at end of
        data, "dmarc:example.org"), or None (keyed on its network)."""
        if not self.own.by_domain or not request.sender:
            return None
        results = request.results
        dmarc = results.get("dmarc")
        if dmarc is not None and getattr(dmarc.result, "result", None) == "pass" and dmarc.result.domain:
            return "dmarc:" + organizational_domain(dmarc.result.domain)
        spf = results.get("spf")
        if spf is not None:
            passed = getattr(spf.result, "passed_domain", None)
            return "spf:" + organizational_domain(passed) if passed else None
        if request.phase != "rcpt" or self.resolver is None:
            return None
        done = evaluate_async(self.resolver, request.client_address, request.sender, request.helo or "",
                              self.receiver, False, self.own.spf_timeout)

        def passed(done):
            result = done[0]
            return "spf:" + organizational_domain(result.domain) if result.result == "pass" and result.domain \
                else None
        if isinstance(done, defer.Deferred):
            return done.addCallbacks(passed, lambda f: None)
        return passed(done)

    def _look(self, request: Request, recipients: list[str], client: str):
        sender = (request.sender or "").lower()
        triplets = ["t:" + hashlib.sha1(f"{client}|{sender}|{r.lower()}".encode()).hexdigest() for r in recipients]
        allowed = "a:" + client
        d = self.store.mget(allowed, *triplets)
        d.addCallback(self._decide, allowed, triplets, client)
        return d.addErrback(self._failed)

    def _decide(self, values, allowed: str, triplets: list[str], client: str):
        count, seen = values[0], values[1:]
        own = self.own
        if own.auto_allow_count and count is not None and int(count) >= own.auto_allow_count:
            return note(Greylisted("allowed", f"{client}: {int(count)} passed"))
        now = self.clock.seconds()
        ready, new, waits = [], [], []
        for key, value in zip(triplets, seen):
            if value in (b"p", "p"):
                continue
            first = float(value) if value is not None else None
            if first is not None and own.delay <= now - first <= own.retry_window:
                ready.append((key, now - first))
            elif first is None or now - first > own.retry_window:
                new.append(key)
                waits.append(own.delay)
            else:
                waits.append(own.delay - (now - first))
        if not waits:                         # every triplet known, or retried in time
            if not ready:
                return note(Greylisted("passed", "known"))
            d = defer.gatherResults([self.store.set(k, b"p", own.auto_allow_time) for k, _ in ready],
                                    consumeErrors=True)
            if own.auto_allow_count:
                d.addCallback(lambda _: self.store.incr(allowed, own.auto_allow_time))
            after = max(t for _, t in ready)
            return d.addCallback(lambda _: note(Greylisted("passed", f"after {after:.0f}s")))
        d = defer.gatherResults([self.store.set(k, repr(now).encode(), own.retry_window) for k in new],
                                consumeErrors=True) if new else defer.succeed(None)
        seconds = max(1, math.ceil(max(waits)))
        v = tempfail(451, "4.7.1", f"Greylisted: please try again in {seconds} second{'s' if seconds != 1 else ''}")
        return d.addCallback(lambda _: Verdict(v.action, v.reply, result=Greylisted("greylisted",
                                                                                   f"retry in {seconds}s")))

    def _failed(self, failure):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure
        why = failure.getErrorMessage() or failure.type.__name__
        if self.own.on_failure == "tempfail":
            v = tempfail(451, "4.7.1", "Greylisting unavailable: try again later")
            return Verdict(v.action, v.reply, result=Greylisted("unavailable", why[:120]))
        return note(Greylisted("unavailable", why[:120]), symbols=(Symbol("GREYLIST_FAIL", why[:80]),))


def _build(own: GreylistSettings, ctx):
    if not own.enabled:
        return None
    s = ctx.settings
    link = shared_link(ctx, "greylist", fallback="greylisting fails open" if own.on_failure == "accept"
                       else "greylisting tempfails", restored="greylisting in redis")
    store = RedisStore(link, s.redis.key_prefix + "grey:") if link is not None else \
        ctx.kept("greylist-local", lambda: LocalStore(ctx.reactor))
    resolver = resolver_for(ctx) if own.by_domain else None
    return Greylist(own, store, ctx.reactor, s.relay.mynetworks, resolver, s.server.hostname)


GREYLIST = CheckType(
    "greylist", phases=("rcpt", "end_of_data"), build=_build, section=Section.of("greylist", GreylistSettings),
    timeout=lambda s: (s.redis.timeout * 3 if s.has("redis") else 0) + s.greylist.spf_timeout + 5,
    after={"end_of_data": ("actions", "spf", "dmarc")},
    active=lambda own, s: own.enabled,
    doc="greylist new (network, sender, recipient) triplets: 451 4.7.1 until a retry after the delay",
    summary=lambda own, s: (f"delay {own.delay:g}s, window {own.retry_window:g}s, auto-allow after "
                            f"{own.auto_allow_count}"
                            + (f"; only at a score of {own.min_score:g} or more, at end of data" if own.min_score
                               else "") + ("; keyed by verified domain" if own.by_domain else "")
                            + "; kept in " + ("redis" if s.has("redis") and configured(s.redis)
                                              else "this process")),
    symbols={"GREYLIST_FAIL": (0.0, "the greylist store did not answer: not greylisted (fail open)")})
