"""The ``rate_limits`` check: per-client and per-user rates, as Postfix's anvil.

Per client address (an IPv6 client counted with its ``ipv6_prefix``, /64 by
default: one host holds a whole /64), within each ``time_unit``:

- connections (at connect): past ``connection_rate``, 421 4.7.0 and the session
  is closed, as Postfix's ``smtpd_client_connection_rate_limit``;
- new TLS sessions: past ``tls_rate``, as Postfix's
  ``smtpd_client_new_tls_session_rate_limit``, STARTTLS is refused 454 4.7.0
  (at starttls, before the handshake: the session may go on in plaintext, or
  end) and a connection to an implicit-TLS listener (port 465) gets 421 4.7.0
  and is closed (at connect; the reply goes out once its handshake is done).
  Every STARTTLS and every implicit-TLS connection counts: no TLS session is
  ever resumed here (:mod:`shared.transport.tls`).  Postfix counts a session
  after its handshake and refuses STARTTLS only once the count is past the
  limit, so it lets one handshake more through and answers it 421; here the
  handshake past the limit is not made at all;
- messages (at MAIL): past ``message_rate``, 450 4.7.1;
- recipients (at RCPT): past ``recipient_rate``, 450 4.7.1.

Per authenticated user, within each ``user_time_unit`` (an hour): messages and
recipients past ``user_message_rate`` and ``user_recipient_rate`` get 450
4.7.1, so a stolen password cannot turn the edge into a spam cannon.

``relay.mynetworks`` and the tier's ``server.upstream_hosts`` are exempt (the
original client behind an upstream tier is counted, not the tier).  0 turns a
limit off; all are off by default, as Postfix's.  The first refusal of a client
in a window is logged, naming the limit.

The counting is :mod:`shared.counters`: fixed windows (as anvil's per time
unit: a client may burst up to twice a limit across a window boundary, never
more), kept across reloads, in this process -- or, with ``redis.servers``, in
Redis, so that every edge node using the same server holds a client to one
count (connection_rate = 10: six connections to one node and five to another,
and the eleventh is refused); while Redis does not answer, each node counts by
itself.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shared.checks.core import CONTINUE, Request, Verdict, disconnect, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import Section, bounded, setting
from shared.counters import Counters, counters
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
    tls_rate: int = setting(0, "new TLS sessions (STARTTLS, connections to implicit-TLS listeners) per client "
                               "per time_unit (0: no limit); past it STARTTLS gets 454 4.7.0, an implicit-TLS "
                               "connection 421 4.7.0 and is closed", _LIMIT)
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
    def __init__(self, own: RateSettings, counters: Counters, exempt: NetworkList, hostname: str,
                 implicit_tls: frozenset[str] = frozenset()) -> None:
        self.own = own
        self.counters = counters
        self.exempt = exempt
        self.hostname = hostname
        self.implicit_tls = implicit_tls        # the listeners whose every connection is a TLS handshake

    def __call__(self, request: Request) -> Verdict | Deferred:
        own, phase = self.own, request.phase
        if request.client_address in self.exempt:
            return CONTINUE
        client = client_key(request.client_address, own.ipv6_prefix)
        addr = request.client_address
        if phase == "connect":
            limits = [("connection_rate", client, own.connection_rate, own.time_unit,
                       disconnect(421, "4.7.0", f"{self.hostname} Error: too many connections from {addr}"))]
            if request.listener in self.implicit_tls:
                limits.append(("tls_rate", client, own.tls_rate, own.time_unit,
                               disconnect(421, "4.7.0", f"{self.hostname} Error: too many new TLS sessions "
                                                        f"from {addr}")))
            return self._count(limits)
        if phase == "starttls":
            return self._count([("tls_rate", client, own.tls_rate, own.time_unit,
                                 tempfail(454, "4.7.0", f"Error: too many new TLS sessions from {addr}"))])
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
        return self._count([(name, key, limit, unit, tempfail(450, "4.7.1", f"Error: {text}"))
                            for name, key, limit, unit, text in limits])

    def _count(self, limits: list) -> Verdict | Deferred:
        """Count each limit in turn (that are set) until one refuses: its verdict, or CONTINUE;
        a Deferred of it from the first count that is not answered at once (in Redis)."""
        for i, (name, key, limit, unit, refusal) in enumerate(limits):
            if not limit:
                continue
            n = self.counters.add(name, key, unit)
            if isinstance(n, Deferred):
                return n.addCallback(self._counted, limits, i)
            verdict = self._judge(n, name, key, limit, unit, refusal)
            if verdict is not CONTINUE:
                return verdict
        return CONTINUE

    def _counted(self, n: int, limits: list, i: int) -> Verdict | Deferred:
        verdict = self._judge(n, *limits[i])
        return verdict if verdict is not CONTINUE else self._count(limits[i + 1:])

    def _judge(self, n: int, name: str, key: str, limit: int, unit: float, refusal: Verdict) -> Verdict:
        if n <= limit:
            return CONTINUE
        if self.counters.first_refusal(name, key):
            log.info("rate limit: {name} {limit}/{unit:g}s exceeded by {key}: {reply}", name=name, limit=limit,
                     unit=unit, key=key, reply=str(refusal.reply))
        return refusal


def _active(own: RateSettings, settings=None) -> bool:
    return any((own.connection_rate, own.tls_rate, own.message_rate, own.recipient_rate, own.user_message_rate,
                own.user_recipient_rate))


def _build(own: RateSettings, ctx):
    if not _active(own):
        return None
    s = ctx.settings
    exempt = NetworkList([*s.relay.mynetworks, *s.server.upstream_hosts])
    implicit = frozenset(name for name, listener in s.listeners.items() if listener.tls == "implicit")
    return RateLimits(own, counters(ctx), exempt, s.hostname, implicit)


RATE_LIMITS = CheckType("rate_limits", phases=("connect", "starttls", "mail", "rcpt"), build=_build,
                        section=Section.of("rate_limits", RateSettings), active=_active,
                        doc="per-client connection, new TLS session, message and recipient rates, per-user "
                            "message and recipient rates (off until [rate_limits] sets one)")
