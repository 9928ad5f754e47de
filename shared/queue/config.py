"""The filter's ``[queue]`` section, and the queue manager's settings built from it."""
from __future__ import annotations

from shared.config.schema import SECONDS, YEAR, Key, Loading, Section, bounded, count, mailbox, path
from shared.queue.manager import QueueSettings


def _finish(ld: Loading) -> None:
    q = ld.values["queue"]
    if q["retry_max"] < q["retry_min"]:
        raise ld.error("queue.retry_max", f"smaller than queue.retry_min ({q['retry_min']})")
    if not q["fsync"]:
        ld.warn("queue.fsync", "false: a 250 no longer promises that the message survives a "
                               "crash or power loss (never in production)")


QUEUE = Section("queue", {
    "directory": Key(str, "", "spool directory, absolute path", path, required_in=("filter",), directory=True),
    "retry_min": Key((int, float), 300, "first retry delay, seconds (doubles each attempt; at most 1 week)",
                     SECONDS),
    "retry_max": Key((int, float), 4000, "longest retry delay, seconds (at most 1 week)", SECONDS),
    "lifetime": Key((int, float), 5 * 86400, "seconds before an undeliverable message bounces "
                                             "(at most 365 days)", bounded(0, YEAR, above=True)),
    "concurrency": Key(int, 20, "parallel connections to the next hop (at most 10000)", count(10_000)),
    "scan_interval": Key((int, float), 300, "seconds between scans of the deferred queue (at most 1 week)",
                         SECONDS),
    "fsync": Key(bool, True, "fsync queue files and directories before 250 (never turn off in production)"),
    "double_bounce_recipient": Key(str, "postmaster", "who is told when a bounce cannot be delivered "
                                                      "(the double bounce)", mailbox),
}, finish=_finish)


def queue_settings(settings) -> QueueSettings:
    q, nh = settings.queue, settings.next_hop
    return QueueSettings(retry_min=q.retry_min, retry_max=q.retry_max, lifetime=q.lifetime,
                         concurrency=q.concurrency, batch_size=nh.max_messages_per_connection,
                         scan_interval=q.scan_interval, bounce_notice_hostname=settings.hostname,
                         double_bounce_recipient=q.double_bounce_recipient)
