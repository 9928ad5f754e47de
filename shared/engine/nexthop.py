"""The ``[next_hop]`` section, the relay client it builds, and the route check.

The route: whether the next hop serves a recipient.  At RCPT a recipient
without a route is refused while the client waits (450 4.4.4), never accepted
to sit in a queue; the filter's queue manager defers one already queued.
"""
from __future__ import annotations

from shared.checks.core import CONTINUE, Request, Verdict, tempfail
from shared.checks.registry import CheckType
from shared.checks.relay import domain_of
from shared.config.schema import (SECONDS, Key, Loading, Section, count, choice, domain, hostname,
                                  hostport)
from shared.transport.pool import NextHop, RelayClient


def _finish(ld: Loading) -> None:
    nh = ld.values["next_hop"]
    if not nh["helo_name"]:
        nh["helo_name"] = ld.values["server"]["hostname"]


NEXT_HOP = Section("next_hop", {
    "hosts": Key(list, [], "next tier's SMTP servers, host:port, tried in order", hostport,
                 required_in=("edge", "filter")),
    "connect_timeout": Key((int, float), 30, "seconds (at most 1 week)", SECONDS),
    "command_timeout": Key((int, float), 300, "seconds to wait for each reply (at most 1 week)", SECONDS),
    "tls": Key(str, "may", "STARTTLS to the next hop: none, may or encrypt", choice("none", "may", "encrypt")),
    "xclient": Key(bool, True, "pass the original client with XCLIENT when the next hop offers it"),
    "max_messages_per_connection": Key(int, 100, "messages carried by one connection (at most 100000)",
                                       count(100_000)),
    "helo_name": Key(str, "", "name sent in EHLO (default: server.hostname)", hostname),
    "domains": Key(list, [], "recipient domains the next hop serves (empty: at the filter, "
                             "relay.relay_domains; at the edge, every domain); mail for any other "
                             "domain has no route and is deferred, never sent", domain),
}, finish=_finish)


def relay_client(settings, reactor) -> RelayClient:
    nh = settings.next_hop
    return RelayClient(
        reactor, [NextHop(host, port) for host, port in nh.hosts], helo_name=nh.helo_name,
        connect_timeout=nh.connect_timeout, command_timeout=nh.command_timeout,
        tls=nh.tls, xclient=nh.xclient, max_messages_per_connection=nh.max_messages_per_connection)


class Route:
    """Whether the next hop serves a recipient: its domain is one of ``next_hop.domains``
    (at the filter, by default, the hosted domains of ``relay.relay_domains``).

    The bare ``postmaster`` (RFC 5321 4.5.1) is served wherever the next hop is: every
    server accepts it.
    """

    def __init__(self, domains) -> None:
        self.domains = frozenset(d.lower() for d in domains)

    def __call__(self, address: str) -> bool:
        if "@" not in address:
            return address.lower() == "postmaster"
        return domain_of(address) in self.domains

    def check(self, request: Request) -> Verdict:
        """At RCPT: a recipient without a route is refused while the client waits,
        never accepted to sit in a queue (450: a configuration that may change).

        An authenticated user's mail is the exception: it may go anywhere (the relay
        permitted it), so it is accepted and follows the queue's routing, which holds
        it deferred ("no route") until a next hop serves its domain."""
        rcpt = request.recipient or ""
        if self(rcpt) or request.login:
            return CONTINUE
        return tempfail(450, "4.4.4", f"<{rcpt}>: Recipient address rejected: no route to "
                                      f"{domain_of(rcpt) or rcpt}")


def route(settings) -> Route | None:
    """The tier's route, or None when its next hop serves every domain (the edge's,
    unless ``next_hop.domains`` says otherwise)."""
    domains = settings.next_hop.domains
    if not domains and settings.tier == "filter":
        domains = settings.relay.relay_domains
    return Route(domains) if domains else None


def _build_route(_settings, ctx):
    r = route(ctx.settings)
    return None if r is None else r.check


ROUTE = CheckType("route", phases=("rcpt",), build=_build_route,
                  active=lambda own, settings: route(settings) is not None,
                  doc="refuse (450 4.4.4) a recipient whose domain no next hop serves (next_hop.domains)")
