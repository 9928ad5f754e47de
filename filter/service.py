"""The filter tier: email control, then the durable queue.

Trusts: XCLIENT/XFORWARD from ``server.upstream_hosts`` (the edge tier), so
its checks see the original client.  Exposes: an SMTP listener whose 250 after
DATA means the message is fsynced in its queue; the queue manager delivers to
the domain tier with retries and bounces (RFC 3464) on 5xx or expiry.
Recipients are verified with the domain tier at RCPT time
(:mod:`filter.verify`) so an unknown user is refused, not bounced.
"""
from __future__ import annotations

from pathlib import Path

from filter.actions import ACTIONS_CHECK
from filter.antivirus import ANTIVIRUS
from filter.arc import ARC
from filter.arcseal import ARC_SEAL
from filter.authresults import AUTH_RESULTS
from filter.dkim import DKIM
from filter.dkimsign import DKIM_SIGN
from filter.dnslists import DNSLISTS, URILISTS
from filter.dmarc import DMARC
from filter.greylist import GREYLIST
from filter.scanners import RSPAMD, SPAMD
from filter.spf import SPF
from filter.verify import VERIFY
from shared.checks.helo import HELO_NAME
from shared.config.schema import TierSpec, hostport_text
from shared.daemon import writable_directory
from shared.engine.nexthop import NEXT_HOP, ROUTE, relay_client, route
from shared.engine.queued import QueueSink
from shared.queue.config import QUEUE, queue_settings
from shared.queue.delivery import QueueDelivery
from shared.queue.manager import QueueManager
from shared.queue.store import Spool
from shared.redisconn import REDIS
from shared.tier import Component, Configured


class Filter(Component):
    """The spool and its queue manager live as long as the process; next hops, route and
    retry settings change on reload (the spool directory needs a restart)."""

    def __init__(self, settings, reactor, pool) -> None:
        self.settings = settings
        self.reactor = reactor
        self.pool = pool
        with writable_directory(settings, "queue", "directory"):
            self.spool = Spool(Path(settings.queue.directory), reactor=reactor, fsync=settings.queue.fsync)
        self.manager = QueueManager(self.spool, None, queue_settings(settings), reactor=reactor)
        self.sink = QueueSink(self.spool, self.manager)
        self.client = None            # the running configuration's next hops

    def configure(self, settings, ctx) -> Configured:
        client = relay_client(settings, self.reactor)
        ctx.on_retire(client.close_cached)
        return Configured(sink=self.sink, next_hop=client, settings=settings)

    def activate(self, configured: Configured) -> None:
        s = configured.settings
        self.client = configured.next_hop
        self.manager.reconfigure(QueueDelivery(self.client, self.pool).deliver_batch, queue_settings(s),
                                 relay=",".join(hostport_text(*h) for h in s.next_hop.hosts), route=route(s))

    def start(self) -> None:
        """Lock the spool (its pid file) and start the queue manager, as the user the tier runs as."""
        with writable_directory(self.settings, "queue", "directory"):
            self.spool.start()
            self.manager.start()     # recovers the spool first: tmp/ cleaned, active/ re-queued, corrupt/ set apart

    def stop(self):
        d = self.manager.stop()
        d.addBoth(lambda r: (self.spool.stop(), r)[1])
        return d


# The default chain: the client's address in the DNS lists at MAIL (when zones are set; its
# symbols are scored at end of data); recipients verified at RCPT, then greylisted (when
# enabled); at end of data the antivirus (when clamd servers are set: a virus ends the chain),
# the URI lists, the sender-authentication checks (dmarc after spf and dkim, whose results it
# reads), the Authentication-Results field of all of them, the outside spam scanners (when
# their servers are set: spamd, rspamd; after the checks that may refuse outright, so they are
# asked only about mail still in question), the score and its action, greylisting when it
# depends on the score, the signature of our users' mail, and (when configured) our ARC seal
# over it all.
TIER = TierSpec("filter", sections=(NEXT_HOP, QUEUE, REDIS),
                checks=(ROUTE, VERIFY, GREYLIST, HELO_NAME, ANTIVIRUS, SPF, DKIM, ARC, DMARC, AUTH_RESULTS, SPAMD, RSPAMD,
                        ACTIONS_CHECK, DKIM_SIGN, ARC_SEAL, DNSLISTS, URILISTS),
                default_policy={"mail": ("dnslists",),
                                "rcpt": ("route", "verify", "actions", "greylist"),
                                "end_of_data": ("antivirus", "urilists", "spf", "dkim", "arc", "dmarc", "auth_results",
                                                "spamd", "rspamd", "actions", "greylist", "dkim_sign", "arc_seal")},
                component=Filter)
