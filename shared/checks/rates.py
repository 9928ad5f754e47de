"""The ``rate_limits`` check: per-client and per-user rates, as Postfix's anvil.

Per client address (an IPv6 client counted with its ``ipv6_prefix``, /64 by
default: one host holds a whole /64), within each ``time_unit``:

- connections (at connect): past ``connection_rate``, 421 4.7.0 and the session
  is closed, as Postfix's ``smtpd_client_connection_rate_limit``;
- messages (at MAIL): past ``message_rate``, 450 4.7.1;
- recipients (at RCPT): past ``recipient_rate``, 450 4.7.1.

Per authenticated user, within each ``user_time_unit`` (an hour): messages and
recipients past ``user_message_rate`` and ``user_recipient_rate`` get 450
4.7.1, so a stolen password cannot turn the edge into a spam cannon.

``relay.mynetworks`` and the tier's ``server.upstream_hosts`` are exempt (the
original client behind an upstream tier is counted, not the tier).  0 turns a
limit off; all are off by default, as Postfix's.  The first refusal of a client
in a window is logged, naming the limit; the counters are kept across reloads
and live in this process (several edge nodes each count their own share).

Windows are fixed (a count per key and window start, as anvil's per time unit):
a client may burst up to twice a limit across a window boundary, never more.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.logger import Logger

from shared.checks.core import CONTINUE, Request, Verdict, disconnect, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import Section, bounded, setting
from shared.netlist import NetworkList

log = Logger(namespace="smarthost.rates")

DAY = 86400
_LIMIT = bounded(0, 10_000_000)          # 0: no limit


@dataclass(frozen=True)
class RateSettings:
    """per-client and per-user rate limits (the check `rate_limits`)"""
    time_unit: float = setting(60, "seconds each client's counts run for (as anvil_rate_time_unit; at "
                                   "most 1 day)", bounded(0, DAY, above=True), kind=(int, float))
    connection_rate: int = setting(0, "connections a client may open per time_unit (0: no limit); past it "
                                      "421 4.7.0 and the session is closed", _LIMIT)
    message_rate: int = setting(0, "messages (MAIL) per client per time_unit (0: no limit); past it 450 4.7.1",
                                _LIMIT)
    recipient_rate: int = setting(0, "recipients (RCPT) per client per time_unit (0: no limit); past it "
                                     "450 4.7.1", _LIMIT)
    user_time_unit: float = setting(3600, "seconds an authenticated user's counts run for (at most 1 day)",
                                    bounded(0, DAY, above=True), kind=(int, float))
    user_message_rate: int = setting(0, "messages per authenticated user per user_time_unit (0: no limit)",
                                     _LIMIT)
    user_recipient_rate: int = setting(0, "recipients per authenticated user per user_time_unit (0: no limit)",
                                       _LIMIT)
    ipv6_prefix: int = setting(64, "an IPv6 client is counted with every address of its /PREFIX (48 to 128)",
                               bounded(48, 128))


class Counters:
    """Counts per key in fixed windows: ``add(key, now, unit)`` -> the count in this window.

    Old windows are forgotten as the clock passes them (one sweep per ``unit`` at
    most), so memory follows the clients of the last window, not of all time."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[float, int]] = {}
        self.logged: set[str] = set()       # keys whose refusal this window was logged
        self.swept = 0.0

    def add(self, key: str, now: float, unit: float) -> int:
        if now - self.swept >= unit:
            self._sweep(now, unit)
        start, n = self.counts.get(key, (0.0, 0))
        if now - start >= unit:
            start, n = now, 0
            self.logged.discard(key)
        n += 1
        self.counts[key] = (start, n)
        return n

    def _sweep(self, now: float, unit: float) -> None:
        self.swept = now
        stale = [k for k, (start, _) in self.counts.items() if now - start >= unit]
        for k in stale:
            del self.counts[k]
            self.logged.discard(k)

    def first_refusal(self, key: str) -> bool:
        if key in self.logged:
            return False
        self.logged.add(key)
        return True


def client_key(address: str, ipv6_prefix: int) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


class RateLimits:
    def __init__(self, own: RateSettings, counters: Counters, exempt: NetworkList, reactor, hostname: str) -> None:
        self.own = own
        self.counters = counters
        self.exempt = exempt
        self.reactor = reactor
        self.hostname = hostname

    def __call__(self, request: Request) -> Verdict:
        own, phase = self.own, request.phase
        if request.client_address in self.exempt:
            return CONTINUE
        client = client_key(request.client_address, own.ipv6_prefix)
        if phase == "connect":
            return self._count("connection_rate", client, own.connection_rate, own.time_unit,
                               disconnect(421, "4.7.0", f"{self.hostname} Error: too many connections from "
                                                        f"{request.client_address}"))
        if phase == "mail":
            limits = [("message_rate", client, own.message_rate, own.time_unit,
                       f"too much mail from {request.client_address}")]
            if request.login:
                limits.append(("user_message_rate", request.login, own.user_message_rate, own.user_time_unit,
                               f"too much mail from user {request.login}"))
        elif phase == "rcpt":
            limits = [("recipient_rate", client, own.recipient_rate, own.time_unit,
                       f"too many recipients from {request.client_address}")]
            if request.login:
                limits.append(("user_recipient_rate", request.login, own.user_recipient_rate,
                               own.user_time_unit, f"too many recipients from user {request.login}"))
        else:
            return CONTINUE
        for name, key, limit, unit, text in limits:
            verdict = self._count(name, key, limit, unit, tempfail(450, "4.7.1", f"Error: {text}"))
            if verdict is not CONTINUE:
                return verdict
        return CONTINUE

    def _count(self, name: str, key: str, limit: int, unit: float, refusal: Verdict) -> Verdict:
        if not limit:
            return CONTINUE
        counted = f"{name}:{key}"
        n = self.counters.add(counted, self.reactor.seconds(), unit)
        if n <= limit:
            return CONTINUE
        if self.counters.first_refusal(counted):
            log.info("rate limit: {name} {limit}/{unit:g}s exceeded by {key}: {reply}", name=name, limit=limit,
                     unit=unit, key=key, reply=str(refusal.reply))
        return refusal


def _active(own: RateSettings, settings=None) -> bool:
    return any((own.connection_rate, own.message_rate, own.recipient_rate, own.user_message_rate,
                own.user_recipient_rate))


def _build(own: RateSettings, ctx):
    if not _active(own):
        return None
    s = ctx.settings
    exempt = NetworkList([*s.relay.mynetworks, *s.server.upstream_hosts])
    return RateLimits(own, ctx.kept("rate_limits", Counters), exempt, ctx.reactor, s.hostname)


RATE_LIMITS = CheckType("rate_limits", phases=("connect", "mail", "rcpt"), build=_build,
                        section=Section.of("rate_limits", RateSettings), active=_active,
                        doc="per-client connection, message and recipient rates, per-user message and "
                            "recipient rates (off until [rate_limits] sets one)")
