"""The edge tier: the Internet-facing listener.

Trusts: nothing it receives.  XCLIENT/XFORWARD are refused unless the peer is
in ``server.upstream_hosts`` (empty by default).  Exposes: SMTP listeners;
relays only to ``relay.relay_domains`` unless the client is in
``relay.mynetworks`` (empty by default: never an open relay).  Accepted
commands are forwarded to the filter tier inside the client's transaction
(:mod:`shared.engine.proxy`), so the client's 250 after DATA is the filter's
fsynced 250.
"""
from __future__ import annotations

from shared.daemon import TierParts
from shared.engine.nexthop import relay_client, route_checks
from shared.engine.proxy import ProxySink


def build(settings, reactor, pool, dry_run: bool = False) -> TierParts:
    if dry_run:
        return TierParts(sink=None, checks=route_checks(settings))
    sink = ProxySink(relay_client(settings, reactor))

    def reload(new) -> None:
        old, sink.relay_client = sink.relay_client, relay_client(new, reactor)
        old.close_cached()          # new sessions use the new next hops, and no kept connection
        parts.checks = route_checks(new)

    def stop():
        return sink.relay_client.close_cached()

    parts = TierParts(sink=sink, checks=route_checks(settings), stop=stop, reload=reload)
    return parts
