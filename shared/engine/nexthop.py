"""Builds the relay client for a tier's ``[next_hop]`` section, and its route."""
from __future__ import annotations

from typing import Callable

from shared.checks.core import CONTINUE, Check, Request, Verdict, tempfail
from shared.checks.relay import domain_of
from shared.transport.pool import NextHop, RelayClient


def relay_client(settings, reactor, *, content_checked: bool = False) -> RelayClient:
    nh = settings["next_hop"]
    return RelayClient(
        reactor, [NextHop(host, port) for host, port in nh["hosts"]], helo_name=nh["helo_name"],
        connect_timeout=nh["connect_timeout"], command_timeout=nh["command_timeout"],
        tls=nh["tls"], xclient=nh["xclient"],
        max_messages_per_connection=nh["max_messages_per_connection"])


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
        never accepted to sit in a queue (450: a configuration that may change)."""
        rcpt = request.recipient or ""
        if self(rcpt):
            return CONTINUE
        return tempfail(450, "4.4.4", f"<{rcpt}>: Recipient address rejected: no route to "
                                      f"{domain_of(rcpt) or rcpt}")


def route(settings) -> Route | None:
    """The tier's route, or None when its next hop serves every domain (the edge's,
    unless ``next_hop.domains`` says otherwise)."""
    domains = settings["next_hop"]["domains"]
    if not domains and settings.tier == "filter":
        domains = settings["relay"]["relay_domains"]
    return Route(domains) if domains else None


def route_checks(settings) -> list[Check]:
    r = route(settings)
    return [] if r is None else [Check("route", "rcpt", r.check)]
