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

from shared.checks.core import Check
from shared.config.schema import hostport_text
from shared.daemon import TierParts, writable_directory
from shared.engine.nexthop import relay_client, route, route_checks
from shared.engine.queued import QueueSink
from shared.queue.manager import QueueManager, QueueSettings
from shared.queue.store import Spool
from filter.verify import RecipientVerifier


def queue_settings(settings) -> QueueSettings:
    q, nh = settings["queue"], settings["next_hop"]
    return QueueSettings(retry_min=q["retry_min"], retry_max=q["retry_max"], lifetime=q["lifetime"],
                         concurrency=q["concurrency"], batch_size=nh["max_messages_per_connection"],
                         scan_interval=q["scan_interval"], bounce_notice_hostname=settings.hostname,
                         double_bounce_recipient=q["double_bounce_recipient"])


def checks(settings, verifier) -> list[Check]:
    out = route_checks(settings)        # no route: refused at RCPT, never queued to wait
    if settings["verify"]["recipients"]:
        out.append(Check("verify_recipient", "rcpt", verifier, timeout=settings["next_hop"]["command_timeout"] + 5))
    return out


class FilterTier:
    """The filter's moving parts: relay client, verifier, spool, queue manager."""

    def __init__(self, settings, reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        # The queue holds only what our server core accepted (no bare CR or LF) and bounces
        # built with CRLF: sent without a second line-end check.
        self.client = relay_client(settings, reactor, content_checked=True)
        v = settings["verify"]
        self.verifier = RecipientVerifier(self.client, reactor=reactor, positive_ttl=v["positive_ttl"],
                                          negative_ttl=v["negative_ttl"])
        with writable_directory(settings, "queue", "directory"):
            self.spool = Spool(Path(settings["queue"]["directory"]), reactor=reactor,
                               fsync=settings["queue"]["fsync"])
        self.manager = QueueManager(self.spool, self.client.deliver_batch, queue_settings(settings),
                                    reactor=reactor, route=route(settings),
                                    relay=",".join(hostport_text(*h) for h in settings["next_hop"]["hosts"]))
        self.parts = TierParts(sink=QueueSink(self.spool, self.manager),
                               checks=checks(settings, self.verifier),
                               start=self.start, stop=self.stop, reload=self.reload)

    def start(self) -> None:
        """Lock the spool (its pid file) and start the queue manager, as the user the tier runs as."""
        with writable_directory(self.settings, "queue", "directory"):
            self.spool.start()
            self.manager.start()     # recovers the spool first: tmp/ cleaned, active/ re-queued, corrupt/ set apart

    def stop(self):
        self.verifier.close()
        d = self.manager.stop()
        d.addBoth(lambda r: (self.spool.stop(), r)[1])
        d.addBoth(lambda r: self.client.close_cached())
        return d

    def reload(self, new) -> None:
        """Next hops, verification and retry settings change live; the spool directory does not."""
        self.settings = new
        old, self.client = self.client, relay_client(new, self.reactor, content_checked=True)
        old.close_cached()
        v = new["verify"]
        self.verifier.close()
        self.verifier.relay_client = self.client
        self.verifier.positive_ttl, self.verifier.negative_ttl = v["positive_ttl"], v["negative_ttl"]
        self.verifier.cache.clear()
        self.manager.deliver = self.client.deliver_batch
        self.manager.settings = queue_settings(new)
        self.manager.route = route(new)
        self.parts.checks = checks(new, self.verifier)


def build(settings, reactor, pool, dry_run: bool = False) -> TierParts:
    if dry_run:
        return TierParts(sink=None, checks=checks(settings, lambda r: None))
    return FilterTier(settings, reactor).parts
