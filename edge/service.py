"""The edge tier: the Internet-facing listener.

Trusts: nothing it receives.  XCLIENT/XFORWARD are refused unless the peer is
in ``server.upstream_hosts`` (empty by default).  Exposes: SMTP listeners
with a role each (mx; submission and submissions, which take AUTH over TLS
only, see :mod:`shared.auth.service`); relays only to ``relay.relay_domains``
unless the client is in ``relay.mynetworks`` (empty by default: never an open
relay) or authenticated, or presented a TLS client certificate listed in
``relay.client_certificates`` (asked for by ``tls_client_certificates``; only
the edge sees it).  Accepted
commands are forwarded to the filter tier inside the client's transaction
(:mod:`shared.engine.proxy`), so the client's 250 after DATA is the filter's
fsynced 250.  With ``redis.servers`` it shares its rate counters with the other
edge nodes through that Redis (:mod:`shared.redisconn`: trusted, on a private
network).
"""
from __future__ import annotations

from shared.auth.service import AUTH
from shared.checks.access import ACCESS
from shared.checks.dnsbl import DNSBL
from shared.checks.helo import HELO_NAME
from shared.checks.rates import RATE_LIMITS
from shared.checks.relay import CLIENT_CERTIFICATE
from shared.checks.sender_login import SENDER_LOGIN
from shared.config.schema import TierSpec
from shared.engine.nexthop import NEXT_HOP, ROUTE, relay_client
from shared.engine.proxy import ProxySink
from shared.redisconn import REDIS
from shared.tier import Component, Configured


class Edge(Component):
    def __init__(self, settings, reactor, pool) -> None:
        self.reactor = reactor

    def configure(self, settings, ctx) -> Configured:
        client = relay_client(settings, self.reactor)
        ctx.on_retire(client.close_cached)      # kept connections of the old next hops go
        return Configured(sink=ProxySink(client), next_hop=client)


TIER = TierSpec("edge", sections=(NEXT_HOP, AUTH, REDIS),
                checks=(ROUTE, ACCESS, HELO_NAME, RATE_LIMITS, SENDER_LOGIN, DNSBL),
                permits=(CLIENT_CERTIFICATE,),
                default_policy={"connect": ("access", "rate_limits", "dnsbl"), "helo": ("access",),
                                "starttls": ("rate_limits",), "mail": ("access", "rate_limits"),
                                "rcpt": ("route", "access", "rate_limits")},
                # The submission roles' policy: only authenticated users relay, each as themselves;
                # no DNS blocklist (users submit from dynamic addresses that policy lists name).
                # A stolen password must not make a spam cannon: per-user hourly limits by default.
                policies={"submission": {"connect": ("access", "rate_limits"),
                                         "mail": ("sender_login", "access", "rate_limits"),
                                         "relay": ("authenticated",),
                                         "settings": {"rate_limits": {"user_message_rate": 200,
                                                                      "user_recipient_rate": 1000}}}},
                component=Edge)
