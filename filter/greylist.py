"""Greylisting at RCPT: the check ``greylist``.

The triplet -- the client's network (``ipv4_prefix`` /24, ``ipv6_prefix`` /64), the
envelope sender and the recipient -- is refused for now the first time it is seen
(451 4.7.1, with how long to wait), accepted when the client retries after ``delay``
(300 s) and within ``retry_window`` (24 h), and remembered as passed for
``auto_allow_time`` (35 days).  A network whose triplets passed ``auto_allow_count``
times (5) is let through without greylisting for as long, as postgrey's automatic
allowlist does.  Not greylisted: authenticated submission, ``relay.mynetworks``, a client
the DNS lists allowlist (:mod:`filter.dnslists`: a result whose ``allowlisted`` is
true), and the ``networks``, ``senders`` (domains, subdomains included) and ``recipients``
(addresses or @domains) listed.

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
from shared.redisconn import shared_link

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

    def __init__(self, own: GreylistSettings, store, clock, mynetworks) -> None:
        self.own = own
        self.store = store
        self.clock = clock
        self.skip_networks = NetworkList(list(own.networks) + list(mynetworks))
        self.senders = tuple(own.senders)
        self.recipients = frozenset(own.recipients)

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
            return "allowlisted by DNS lists"          # filter.dnslists, at MAIL
        sender_domain = (request.sender or "").rpartition("@")[2].lower()
        if sender_domain and any(sender_domain == d or sender_domain.endswith("." + d) for d in self.senders):
            return "allowlisted sender"
        rcpt = (request.recipient or "").lower()
        if rcpt in self.recipients or "@" + rcpt.rpartition("@")[2] in self.recipients:
            return "allowlisted recipient"
        return None

    def __call__(self, request: Request):
        why = self.skipped(request)
        if why:
            return note(Greylisted("skipped", why))
        net = self.network(request.client_address)
        if net is None:
            return CONTINUE
        triplet = "t:" + hashlib.sha1(f"{net}|{(request.sender or '').lower()}|{(request.recipient or '').lower()}"
                                      .encode()).hexdigest()
        allowed = "a:" + net
        d = self.store.mget(allowed, triplet)
        d.addCallback(self._decide, allowed, triplet, net)
        return d.addErrback(self._failed)

    def _decide(self, values, allowed: str, triplet: str, net: str):
        count, seen = values
        own = self.own
        if own.auto_allow_count and count is not None and int(count) >= own.auto_allow_count:
            return note(Greylisted("allowed", f"{net}: {int(count)} passed"))
        now = self.clock.seconds()
        if seen == b"p" or seen == "p":
            return note(Greylisted("passed", "known"))
        first = float(seen) if seen is not None else None
        if first is not None and now - first >= own.delay and now - first <= own.retry_window:
            d = self.store.set(triplet, b"p", own.auto_allow_time)
            if own.auto_allow_count:
                d.addCallback(lambda _: self.store.incr(allowed, own.auto_allow_time))
            return d.addCallback(lambda _: note(Greylisted("passed", f"after {now - first:.0f}s")))
        if first is None or now - first > own.retry_window:
            wait = own.delay
            d = self.store.set(triplet, repr(now).encode(), own.retry_window)
        else:
            wait = own.delay - (now - first)
            d = defer.succeed(None)
        seconds = max(1, math.ceil(wait))
        v = tempfail(451, "4.7.1", f"Greylisted: please try again in {seconds} seconds")
        return d.addCallback(lambda _: Verdict(v.action, v.reply, result=Greylisted("greylisted", f"retry in {seconds}s")))

    def _failed(self, failure):
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
    return Greylist(own, store, ctx.reactor, s.relay.mynetworks)


GREYLIST = CheckType(
    "greylist", phases=("rcpt",), build=_build, section=Section.of("greylist", GreylistSettings),
    timeout=lambda s: s.redis.timeout * 3 + 5 if s.has("redis") else 5,
    active=lambda own, s: own.enabled,
    doc="greylist new (network, sender, recipient) triplets: 451 4.7.1 until a retry after the delay",
    summary=lambda own, s: (f"delay {own.delay:g}s, window {own.retry_window:g}s, auto-allow after "
                            f"{own.auto_allow_count}; kept in " + ("redis" if s.has("redis") and s.redis.servers
                                                                   else "this process")),
    symbols={"GREYLIST_FAIL": (0.0, "the greylist store did not answer: not greylisted (fail open)")})
