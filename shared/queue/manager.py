"""The queue manager: decides which queued message is delivered when.

STRATEGIES

Sources of work.  A message reaches the scheduler in three ways: notify(qid)
right after the SMTP server committed it to incoming/; a timer that fires at
the earliest next-attempt time of the deferred messages it knows; and a
periodic scan (``scan_interval``, 300 s like Postfix's queue_run_delay) of
incoming/ and deferred/, which finds what the other two missed (messages left
by an earlier run, admin releases, clock jumps).  A deferred file's mtime *is*
its next-attempt time (as in Postfix), so a scan costs one stat per file and
an admin "flush" only has to touch mtimes.  Messages in hold/ and
quarantine/ are never scheduled.

Pick-up.  A message is picked up by moving it incoming|deferred -> active
(renames and the small reads of trailer, envelope and status happen on the
reactor thread, like Postfix's single-threaded qmgr; fsyncs never do).
If the move fails, somebody (an admin command) moved or deleted the file
first: the message is skipped without error.  A file that fails validation at
pick-up goes to corrupt/ and is logged.  The recipients still to do come from
the status file (R/status/<qid>) when it exists, else from the envelope; a
recipient address that appears twice is delivered once.

Batching and concurrency.  At most ``concurrency`` delivery batches run at
once; one batch is one call of the delivery function, which uses one
connection to the next hop for up to ``batch_size`` messages.  A batch is
formed as soon as a slot is free, from what is ready then (coalescing the
notifications of one reactor turn): under light load messages go out one by
one without waiting, under heavy load they queue up while all slots are busy
and go out in full batches.

Fairness.  Two ready queues, new mail (incoming) and retries (deferred), both
FIFO; a batch takes from them alternately, so a flood of new mail cannot
starve retries and a large backlog of retries cannot delay new mail by more
than half.

Retry schedule.  After a transient result (a 4xx reply, or a connection
failure, which the delivery function reports as a 4xx reply) the message goes
to deferred/ with next attempt = now + min(retry_max, retry_min * 2**(n-1))
where n is the number of attempts so far: 300, 600, 1200, 2400, 4000, 4000 s
... with the defaults (Postfix's minimal/maximal_backoff_time).

Expiry.  When an attempt fails transiently and the message is older than
``lifetime`` (5 days; measured from envelope.received_at), the remaining
recipients are bounced with status 4.4.7 "delivery time expired", quoting the
last reply.  An expired message therefore gets one last attempt, as in Postfix.

Partial failure.  Each recipient is final on its own: 2xx -> done, 5xx ->
bounced, 4xx -> still pending.  The status file records the pending ones, the
number of attempts and the last reply of each, and the file moves to
deferred/; when no recipient is pending, file and status are removed.  The
status is written (tmp + fsync + rename) before the file leaves active/, so a
crash at any point repeats at most the last attempt, never skips a recipient.

Routes.  ``route(address)`` says whether the next hop serves a recipient
(the filter's next hop, the domain tier, serves the hosted domains only).  A
recipient without a route is never sent to a hop that would have to refuse it:
it is deferred like any transient failure, with the reply "451 4.4.4 no route
to DOMAIN" in its status (so ``smarthost queue list`` shows why), until a
reload gives it a route or the lifetime ends.

Bounces.  All failed recipients of one attempt get one RFC 3464 report to
the envelope sender (shared.queue.bounce; only for recipients whose NOTIFY
asks for failures).  The report is committed to this same spool and delivered
like any message.  If committing it fails, the failures stay in the status
file and the report is tried again at the next attempt time.  A message with
the null sender (a bounce, ours or another MTA's) that fails is reported to
``double_bounce_recipient`` (the postmaster) instead: a double bounce.  A
double bounce that fails is never reported again (no triple bounce): it goes
to hold/ with its failed recipients still pending and an error in the log, for
the administrator to release once the postmaster address works.  No failure
ends without a report or a message on hold.

Admin requests.  hold/delete of a message in active/ cannot be done by the
admin process without racing the delivery, so it leaves R/requests/<qid>.hold
or .delete; the manager applies it when the attempt ends (delete: file and
status removed, no bounce; hold: the pending rest goes to hold/ instead of
deferred/).  R/requests/ is polled every ``request_interval`` (1 s) with one
os.scandir: hold and delete requests for messages in flight wait for the end
of the attempt; one that arrives after the attempt's last poll is applied by
the next poll, in whatever state the attempt left the message; a hold request
the admin cancelled (by a release) before the attempt ended is not applied.
The poll also applies the hold and delete requests for messages not in
flight, R/requests/flush (every deferred message is due now), <qid>.flush
(schedule this message now), <qid>.release and <qid>.quarantine-release (the
admin moved it from hold/ or quarantine/ to deferred/: schedule it now), and
logs the notices <qid>.held, <qid>.deleted and <qid>.quarantine-deleted of
what the admin command did itself: every hold, release and delete is in the
log.

Trust.  The delivery function is ours but its results are checked: a missing
or malformed result for a recipient counts as a transient failure (451
4.3.0), a failed call defers the whole batch.  Queue files are validated again
at pick-up, and the message bytes against their checksum as they are read for
delivery: a damaged message is never completed at the next hop and goes to
corrupt/ when its attempt ends.  Admin requests are file names checked against
the queue id syntax.

Shutdown.  stop() takes no new work and waits for the batches in flight (at
most ``stop_timeout``); files are left where they are, and whatever is still
in active/ goes back to incoming/ at the next start (recovery).
"""
from __future__ import annotations

import functools
import heapq
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.envelope import Envelope, Recipient
from shared.queue.bounce import RETURN_LIMIT, make_bounce
from shared.queue.store import CorruptFile, QueuedMessage, RecoveryReport, Spool, valid_qid
from shared.smtp.reply import Reply

log = Logger(namespace="smarthost.queue.manager")

DeliverItem = tuple[str, Envelope, Callable[[], BinaryIO], int]
DeliverFn = Callable[[list[DeliverItem]], "Deferred[list[dict[str, Reply]]]"]

# Just-received messages are delivered from memory (no open and read of the file
# just fsynced) while the bodies waiting for pick-up take at most this much.
FRESH_BYTES = 32 * 1024 * 1024

# Admin requests that say what the admin command did itself (shared.queue.admin):
# the manager only logs them.
ADMIN_NOTICES = {"held": "put on hold by admin command", "deleted": "removed by admin command",
                 "quarantine-deleted": "removed from quarantine by admin command"}

# Given to a recipient the delivery function said nothing about, or when it failed.
NO_REPLY = Reply(451, "4.3.0", "Delivery agent gave no result, will retry")


def no_route(address: str) -> Reply:
    """The result of a recipient whose domain no next hop serves (it is not sent)."""
    domain = address.rpartition("@")[2] or address
    return Reply(451, "4.4.4", f"no route to {domain}: no next hop serves this domain")


@dataclass(frozen=True)
class QueueSettings:
    retry_min: float = 300
    retry_max: float = 4000
    lifetime: float = 5 * 86400
    concurrency: int = 20             # concurrent delivery batches (connections) to the next hop
    batch_size: int = 100             # messages per connection
    scan_interval: float = 300        # periodic rescan of incoming/ and deferred/
    bounce_notice_hostname: str = "localhost"
    request_interval: float = 1.0     # poll of R/requests/
    stop_timeout: float = 30.0        # stop() waits at most this long for batches in flight
    return_limit: int = RETURN_LIMIT  # RET=FULL bounces return messages up to this size
    double_bounce_recipient: str = "postmaster"   # told of failed null-sender mail

    def __post_init__(self) -> None:
        for name in ("retry_min", "retry_max", "lifetime", "scan_interval",
                     "request_interval", "stop_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"queue setting {name} must be > 0")
        if self.retry_max < self.retry_min:
            raise ValueError("queue setting retry_max must be >= retry_min")
        for name in ("concurrency", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"queue setting {name} must be an integer >= 1")

    def backoff(self, attempts: int) -> float:
        """Delay before the next attempt after ``attempts`` attempts (>= 1)."""
        return min(self.retry_max, self.retry_min * 2.0 ** min(max(attempts - 1, 0), 64))


@dataclass
class Job:
    """One message picked up for one attempt."""
    qid: str
    message: QueuedMessage
    pending: list[Recipient]
    status: dict[str, Any]
    status_file: bool = True          # False: known to have none (first attempt of a fresh message)
    unrouted: dict[str, Reply] = field(default_factory=dict)   # pending recipients with no route


class QueueManager:
    def __init__(self, spool: Spool, deliver: DeliverFn, settings: QueueSettings = QueueSettings(),
                 *, reactor, log_prefix: str = "", relay: str = "next-hop",
                 route: Callable[[str], bool] | None = None):
        """``relay`` names the next hop in log lines; ``log_prefix`` (e.g. "edge: ")
        starts each log line of this manager; ``route(address)`` tells whether the
        next hop serves a recipient (None: it serves every one)."""
        self.spool = spool
        self.deliver = deliver
        self.route = route
        self.settings = settings
        self.reactor = reactor
        self.log_prefix = log_prefix
        self.relay = relay
        self.running = False
        self.ready_incoming: deque[str] = deque()
        self.ready_deferred: deque[str] = deque()
        self.scheduled: set[str] = set()       # in a ready queue
        self.inflight: set[str] = set()        # in active/, owned by a batch
        self.fresh: dict[str, tuple[Envelope, int, bytes | None]] = {}   # notified with what was committed
        self.fresh_bytes = 0                   # message bytes held in `fresh`
        # Admin requests the last poll found for messages in delivery: applied
        # when their attempt ends (without listing R/requests/ per batch).
        self.inflight_requests: set[str] = set()
        self.wakeups: dict[str, float] = {}    # deferred qid -> next attempt (timer heap)
        self.heap: list[tuple[float, str]] = []
        self.timer = None
        self.pump_call = None
        self.batches = 0
        self.prefer_deferred = False
        self.stop_waiters: list[Deferred] = []
        self.stop_timer = None
        self.scan_loop = LoopingCall(self.scan)
        self.scan_loop.clock = reactor
        self.request_loop = LoopingCall(self.check_requests)
        self.request_loop.clock = reactor

    def reconfigure(self, deliver: DeliverFn, settings: QueueSettings, *, relay: str,
                    route: Callable[[str], bool] | None) -> None:
        """A reload: batches started from now on use the new next hops, route and
        retry settings; those in flight finish with what they started with."""
        self.deliver, self.settings, self.relay, self.route = deliver, settings, relay, route

    # -- lifecycle ------------------------------------------------------------

    def start(self, *, recover: bool = True) -> RecoveryReport | None:
        """Recover the spool, then schedule everything; returns the recovery report.

        Recovery (skipped if ``recover=False`` or already done on this Spool)
        moves active/ back to incoming/ and deletes tmp/ files that this process
        is not receiving, so start the manager before, or in the same process
        as, the SMTP server that writes to this spool.
        """
        report = self.spool.recovery
        if recover and report is None:
            report = self.spool.recover()
        self.running = True
        self.check_requests()
        self.scan()
        self.scan_loop.start(self.settings.scan_interval, now=False)
        self.request_loop.start(self.settings.request_interval, now=False)
        return report

    def stop(self) -> Deferred:
        """Take no new work; fire when the batches in flight are done (or at stop_timeout)."""
        self.running = False
        for loop in (self.scan_loop, self.request_loop):
            if loop.running:
                loop.stop()
        for call in (self.timer, self.pump_call):
            if call is not None and call.active():
                call.cancel()
        self.timer = self.pump_call = None
        if self.batches == 0:
            return succeed(None)
        d: Deferred = Deferred()
        self.stop_waiters.append(d)
        if self.stop_timer is None:
            self.stop_timer = self.reactor.callLater(self.settings.stop_timeout,
                                                     self.release_stop_waiters, True)
        return d

    def release_stop_waiters(self, timed_out: bool = False) -> None:
        if timed_out:
            log.warn("{prefix}stop: {n} delivery batch(es) still running; their messages "
                     "stay in active/ and are recovered at the next start",
                     prefix=self.log_prefix, n=self.batches)
        elif self.stop_timer is not None and self.stop_timer.active():
            self.stop_timer.cancel()
        self.stop_timer = None
        waiters, self.stop_waiters = self.stop_waiters, []
        for d in waiters:
            d.callback(None)

    def notify(self, qid: str, committed: tuple[Envelope, int] | None = None,
               body: bytes | None = None) -> None:
        """A message was just committed to incoming/: schedule it now.

        ``committed`` is its (envelope, body length) as just written, so that
        pick-up need not read and parse the file it has just fsynced; ``body``
        the message itself when the receiver still holds it whole.  Bodies are
        kept for delivery from memory up to FRESH_BYTES in all; past that the
        file is read as for any other message.
        """
        if not valid_qid(qid):
            log.error("{prefix}notify: invalid queue id {qid!r} ignored",
                      prefix=self.log_prefix, qid=qid)
            return
        if self.enqueue(qid, "incoming"):
            if committed is not None:
                if body is not None and self.fresh_bytes + len(body) <= FRESH_BYTES:
                    self.fresh_bytes += len(body)
                else:
                    body = None
                self.fresh[qid] = (committed[0], committed[1], body)
            self.pump_soon()

    # -- finding work -----------------------------------------------------------

    def enqueue(self, qid: str, src: str) -> bool:
        if qid in self.scheduled or qid in self.inflight:
            return False
        self.wakeups.pop(qid, None)
        self.scheduled.add(qid)
        (self.ready_incoming if src == "incoming" else self.ready_deferred).append(qid)
        return True

    def scan(self, *, flush: bool = False) -> None:
        """Enqueue incoming/ and the deferred/ files that are due (all of them if
        ``flush``); arm the timer for the rest."""
        try:
            now = self.reactor.seconds()
            for qid, _ in self.spool.scan("incoming"):
                if qid not in self.spool.open_tmp:      # still being committed
                    self.enqueue(qid, "incoming")
            for qid, when in self.spool.scan("deferred"):
                if qid in self.scheduled or qid in self.inflight:
                    continue
                if flush or when <= now:
                    self.enqueue(qid, "deferred")
                elif self.wakeups.get(qid) != when:
                    self.wake_at(qid, when)
        except Exception:
            log.failure("{prefix}queue scan failed", prefix=self.log_prefix)
        self.pump_soon()

    def wake_at(self, qid: str, when: float) -> None:
        self.wakeups[qid] = when
        heapq.heappush(self.heap, (when, qid))
        self.arm_timer()

    def arm_timer(self) -> None:
        heap = self.heap
        while heap and self.wakeups.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)                  # stale: rescheduled or picked up
        if not heap or not self.running:
            return
        when = heap[0][0]
        if self.timer is not None and self.timer.active():
            if self.timer.getTime() <= when:
                return
            self.timer.cancel()
        self.timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()),
                                            self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        now = self.reactor.seconds()
        while self.heap and self.heap[0][0] <= now:
            when, qid = heapq.heappop(self.heap)
            if self.wakeups.get(qid) == when:
                del self.wakeups[qid]
                self.enqueue(qid, "deferred")
        self.arm_timer()
        self.pump_soon()

    def check_requests(self) -> None:
        """Apply admin requests left in R/requests/ (see STRATEGIES)."""
        try:
            names = self.spool.requests()
            flush = False
            waiting: set[str] = set()
            for name in names:
                if name == "flush":
                    flush = True
                    self.spool.clear_request(name)
                    continue
                qid, _, kind = name.partition(".")
                if not valid_qid(qid) or kind not in ("hold", "delete", "release", "quarantine-release",
                                                      "flush", *ADMIN_NOTICES):
                    log.warn("{prefix}ignoring unknown admin request {name!r}",
                             prefix=self.log_prefix, name=name)
                    self.spool.clear_request(name)
                    continue
                if kind in ("hold", "delete") and qid in self.inflight:
                    waiting.add(name)            # applied when its attempt ends
                    continue
                self.apply_request(qid, kind)
                self.spool.clear_request(name)
            self.inflight_requests = waiting
            if flush:
                log.info("{prefix}flush requested", prefix=self.log_prefix)
                self.scan(flush=True)
        except Exception:
            log.failure("{prefix}checking admin requests failed", prefix=self.log_prefix)
        self.pump_soon()

    def apply_request(self, qid: str, kind: str) -> None:
        if kind == "delete":
            if self.spool.remove(qid):
                log.info("{prefix}{qid}: removed by admin request", prefix=self.log_prefix, qid=qid)
            self.spool.clear_request(f"{qid}.hold")
        elif kind == "hold":
            for src in ("incoming", "deferred"):
                if self.spool.move(qid, src, "hold"):
                    log.info("{prefix}{qid}: put on hold by admin request",
                             prefix=self.log_prefix, qid=qid)
                    break
        elif kind in ("release", "quarantine-release"):
            log.info("{prefix}{qid}: released from {where} by admin command", prefix=self.log_prefix,
                     qid=qid, where="hold" if kind == "release" else "quarantine")
            self.enqueue(qid, "deferred")        # no-op if already picked up
        elif kind == "flush":
            log.info("{prefix}{qid}: flush requested", prefix=self.log_prefix, qid=qid)
            self.enqueue(qid, "deferred")
        else:                                    # done by the admin command: only logged
            log.info("{prefix}{qid}: {what}", prefix=self.log_prefix, qid=qid,
                     what=ADMIN_NOTICES[kind])

    # -- delivering -------------------------------------------------------------

    def pump_soon(self) -> None:
        if self.running and self.pump_call is None:
            self.pump_call = self.reactor.callLater(0, self.pump)

    def pump(self) -> None:
        self.pump_call = None
        while (self.running and self.batches < self.settings.concurrency
               and (self.ready_incoming or self.ready_deferred)):
            jobs = self.take_batch()
            if jobs:
                self.batches += 1
                self.run_batch(jobs)

    def next_ready(self) -> tuple[str, str] | None:
        order = [(self.ready_incoming, "incoming"), (self.ready_deferred, "deferred")]
        if self.prefer_deferred:
            order.reverse()
        self.prefer_deferred = not self.prefer_deferred
        for queue, src in order:
            if queue:
                qid = queue.popleft()
                self.scheduled.discard(qid)
                return qid, src
        return None

    def take_batch(self) -> list[Job]:
        jobs: list[Job] = []
        while len(jobs) < self.settings.batch_size:
            item = self.next_ready()
            if item is None:
                break
            job = self.pick_up(*item)
            if job is not None:
                jobs.append(job)
        return jobs

    def pick_up(self, qid: str, src: str) -> Job | None:
        spool = self.spool
        fresh = self.fresh.pop(qid, None) if src == "incoming" else None
        if fresh is not None and fresh[2] is not None:
            self.fresh_bytes -= len(fresh[2])
        if not spool.move(qid, src, "active"):
            return None                          # moved or deleted by an admin command
        if fresh is not None:                    # just committed: no file to re-read, no status yet
            envelope, body_len, body = fresh
            message = QueuedMessage(qid, "active", envelope, body_len, spool.path(qid, "active"), body)
            return self.job(message, {}, status_file=False)
        try:
            message = spool.open(qid, "active")
        except FileNotFoundError:
            return None
        except CorruptFile as e:
            spool.move(qid, "active", "corrupt")
            log.error("{prefix}{qid}: corrupt queue file ({reason}); moved to corrupt/",
                      prefix=self.log_prefix, qid=qid, reason=e.reason)
            return None
        except OSError as e:                     # EIO, EMFILE...: not the file's fault
            log.error("{prefix}{qid}: cannot read queue file ({err}); will retry",
                      prefix=self.log_prefix, qid=qid, err=e)
            when = self.reactor.seconds() + self.settings.retry_min
            spool.set_next_attempt(qid, "active", when)
            if spool.move(qid, "active", "deferred"):
                self.wake_at(qid, when)
            return None
        return self.job(message, spool.read_status(qid) or {})

    def job(self, message: QueuedMessage, status: dict, *, status_file: bool = True) -> Job:
        qid = message.qid
        wanted = status.get("pending")
        wanted = set(wanted) if isinstance(wanted, list) else None
        seen: set[str] = set()
        pending = []
        for rcpt in message.envelope.recipients:
            if rcpt.address in seen:
                continue
            seen.add(rcpt.address)
            if wanted is None or rcpt.address in wanted:
                pending.append(rcpt)
        self.inflight.add(qid)
        route = self.route
        unrouted = {} if route is None else {r.address: no_route(r.address)
                                             for r in pending if not route(r.address)}
        env = message.envelope
        log.info("{prefix}{qid}: from=<{sender}>, size={size}, nrcpt={nrcpt}, "
                 "upstream={upstream} (queue active)", prefix=self.log_prefix, qid=qid,
                 sender=env.sender, size=message.body_len, nrcpt=len(pending),
                 upstream=env.upstream_id or "-")
        return Job(qid, message, pending, status, status_file, unrouted)

    def run_batch(self, jobs: list[Job]) -> None:
        deliverable = [j for j in jobs if len(j.pending) > len(j.unrouted)]
        if deliverable:
            items = [(j.qid, replace(j.message.envelope,
                                     recipients=[r for r in j.pending if r.address not in j.unrouted]),
                      j.message.body if j.message.body is not None else j.message.open_body,
                      j.message.body_len) for j in deliverable]
            d = maybeDeferred(self.deliver, items)
            d.addCallback(self.check_results, len(deliverable))
            d.addErrback(self.delivery_failed, len(deliverable))
        else:
            d = succeed([])
        d.addCallback(lambda results: self.finish_batch(jobs, deliverable, results))
        d.addErrback(lambda f: log.failure("{prefix}finishing a delivery batch failed", f,
                                           prefix=self.log_prefix))
        d.addBoth(self.batch_done)

    @staticmethod
    def check_results(results: Any, n: int) -> list[dict[str, Reply]]:
        if not isinstance(results, list) or len(results) != n:
            raise TypeError(f"delivery function returned {type(results).__name__} "
                            f"for {n} messages")
        return [r if isinstance(r, dict) else {} for r in results]

    def delivery_failed(self, failure: Failure, n: int) -> list[dict[str, Reply]]:
        log.failure("{prefix}delivery function failed; {n} message(s) will be retried",
                    failure, prefix=self.log_prefix, n=n)
        return [{} for _ in range(n)]

    def finish_batch(self, jobs: list[Job], deliverable: list[Job],
                     results: list[dict[str, Reply]]) -> Deferred:
        by_qid = {j.qid: r for j, r in zip(deliverable, results)}
        requests = self.inflight_requests
        return gatherResults([self.finish(j, {**j.unrouted, **by_qid.get(j.qid, {})}, requests)
                              for j in jobs], consumeErrors=True)

    def batch_done(self, _: Any) -> None:
        self.batches -= 1
        if self.running:
            self.pump_soon()
        elif self.batches == 0 and self.stop_waiters:
            self.release_stop_waiters()

    def finish(self, job: Job, replies: dict[str, Reply], requests: set[str]) -> Deferred:
        d = Deferred.fromCoroutine(self.settle(job, replies, requests))
        d.addErrback(self.settle_failed, job)
        d.addBoth(lambda _: self.inflight.discard(job.qid))
        return d

    async def settle(self, job: Job, replies: dict[str, Reply], requests: set[str]) -> None:
        """Act on one message's results: log, bounce, defer or remove it."""
        spool, qid = self.spool, job.qid
        if job.message.damaged:
            # Read back from disk, the message did not match its checksum: the relay
            # client never sent its end (no "."), nothing was delivered.
            self.set_apart(job)
            return
        env = job.message.envelope
        now = self.reactor.seconds()
        expired_now = now - env.received_at > self.settings.lifetime
        failed = {a: reply_from_json(v) for a, v in job.status.get("failed", {}).items()}
        expired = set(job.status.get("expired", ()))
        deferred: list[Recipient] = []
        last: dict[str, str] = {}
        for rcpt in job.pending:
            reply = replies.get(rcpt.address)
            if not isinstance(reply, Reply):
                reply = NO_REPLY
            if reply.positive:
                self.log_result(job, rcpt, reply, "sent", now)
            elif reply.permanent:
                failed[rcpt.address] = reply
                self.log_result(job, rcpt, reply, "bounced", now)
            elif expired_now:
                failed[rcpt.address] = reply
                expired.add(rcpt.address)
                self.log_result(job, rcpt, reply, "bounced", now, "delivery time expired; ")
            else:
                deferred.append(rcpt)
                last[rcpt.address] = str(reply)
                self.log_result(job, rcpt, reply, "deferred", now)

        if f"{qid}.delete" in requests:
            spool.remove(qid, "active")
            for kind in ("delete", "hold"):
                spool.clear_request(f"{qid}.{kind}")
                requests.discard(f"{qid}.{kind}")
            log.info("{prefix}{qid}: removed by admin request", prefix=self.log_prefix, qid=qid)
            return
        hold = f"{qid}.hold" in requests
        if hold and f"{qid}.hold" not in spool.requests():
            requests.discard(f"{qid}.hold")      # cancelled (a release) since the last poll
            hold = False

        if failed and env.sender == "" and env.notice == "double-bounce":
            # Never a triple bounce: the administrator gets the message itself.
            log.error("{prefix}{qid}: undeliverable double bounce to {to} ({reply}); put on hold "
                      "for the administrator (smarthost queue show / release)", prefix=self.log_prefix,
                      qid=qid, to=",".join(f"<{a}>" for a in failed),
                      reply=str(next(iter(failed.values()))))
            by_addr = {r.address: r for r in env.recipients}
            for address, reply in failed.items():
                deferred.append(by_addr.get(address, Recipient(address)))
                last[address] = str(reply)
            failed, expired, hold = {}, set(), True
        elif failed:
            double = env.sender == ""
            try:
                bounce_qid = await self.send_bounce(job, failed, expired, now, double=double)
            except Exception as e:
                if job.message.damaged:            # found while copying it into the bounce
                    self.set_apart(job)
                    return
                if isinstance(e, OSError):         # a full disk: one line, no traceback
                    log.error("{prefix}{qid}: could not queue the bounce ({err}); will retry",
                              prefix=self.log_prefix, qid=qid, err=e.strerror or str(e))
                else:
                    log.failure("{prefix}{qid}: could not queue the bounce; will retry",
                                prefix=self.log_prefix, qid=qid)
            else:
                if double:
                    log.info("{prefix}{qid}: undeliverable mail with the null sender; postmaster "
                             "notification (double bounce) to <{to}>: {bqid}", prefix=self.log_prefix,
                             qid=qid, to=self.settings.double_bounce_recipient, bqid=bounce_qid)
                elif bounce_qid:
                    log.info("{prefix}{qid}: sender non-delivery notification: {bqid}",
                             prefix=self.log_prefix, qid=qid, bqid=bounce_qid)
                else:
                    log.info("{prefix}{qid}: no bounce: NOTIFY excludes FAILURE",
                             prefix=self.log_prefix, qid=qid)
                failed, expired = {}, set()

        if not deferred and not failed:
            # unlink waits on the file system's journal under fsync load: off the reactor
            # thread, together with the other removals of the moment
            await spool.remove_async(qid, "active", status=job.status_file)
            if hold:
                spool.clear_request(f"{qid}.hold")
                requests.discard(f"{qid}.hold")
            log.info("{prefix}{qid}: removed", prefix=self.log_prefix, qid=qid)
            return

        attempts = int(job.status.get("attempts", 0)) + 1
        next_attempt = now + self.settings.backoff(attempts)
        status = {
            "pending": [r.address for r in deferred],
            "attempts": attempts,
            "first_attempt": job.status.get("first_attempt", now),
            "last_attempt": now,
            "last_reply": last,
            "failed": {a: reply_to_json(r) for a, r in failed.items()},
            "expired": sorted(expired & failed.keys()),
        }
        await spool.write_status_async(qid, status)
        spool.set_next_attempt(qid, "active", next_attempt)
        if hold:
            spool.move(qid, "active", "hold")
            if f"{qid}.hold" in requests:
                spool.clear_request(f"{qid}.hold")
                requests.discard(f"{qid}.hold")
                log.info("{prefix}{qid}: put on hold by admin request", prefix=self.log_prefix, qid=qid)
        elif spool.move(qid, "active", "deferred") and self.running:
            self.wake_at(qid, next_attempt)

    def set_apart(self, job: Job) -> None:
        """A message found damaged while it was read for this attempt: to corrupt/, logged."""
        self.spool.move(job.qid, "active", "corrupt")
        log.error("{prefix}{qid}: corrupt queue file ({reason}); moved to corrupt/, not delivered",
                  prefix=self.log_prefix, qid=job.qid, reason=job.message.damaged)

    def settle_failed(self, failure: Failure, job: Job) -> None:
        """Could not record the outcome (disk full?): retry the message later."""
        log.failure("{prefix}{qid}: could not record delivery results; will retry",
                    failure, prefix=self.log_prefix, qid=job.qid)
        when = self.reactor.seconds() + self.settings.retry_min
        self.spool.set_next_attempt(job.qid, "active", when)
        if self.spool.move(job.qid, "active", "deferred") and self.running:
            self.wake_at(job.qid, when)

    async def send_bounce(self, job: Job, failed: dict[str, Reply], expired: set[str],
                          now: float, double: bool = False) -> str | None:
        """Queue the report of ``failed``: to the sender, or (``double``) to the postmaster."""
        env = job.message.envelope
        build = functools.partial(
            make_bounce, env, job.qid, failed, self.settings.bounce_notice_hostname,
            env.received_at, job.message.read_prefix, expired=frozenset(expired), now=now,
            return_limit=self.settings.return_limit,
            postmaster=self.settings.double_bounce_recipient if double else None)
        result = await self.spool.run(build)
        if result is None:
            return None
        bounce_env, data = result
        incoming = self.spool.new_message()
        try:
            incoming.write(data)
        except BaseException:
            incoming.abort()
            raise
        await incoming.commit(bounce_env)
        self.notify(incoming.qid)
        return incoming.qid

    def log_result(self, job: Job, rcpt: Recipient, reply: Reply, status: str, now: float,
                   note: str = "") -> None:
        env = job.message.envelope
        log.info("{prefix}{qid}: to=<{rcpt}>, relay={relay}, delay={delay}, upstream={upstream}, "
                 "status={status} ({note}{reply})", prefix=self.log_prefix, qid=job.qid,
                 rcpt=rcpt.address, relay=self.relay, delay=f"{max(0.0, now - env.received_at):.1f}",
                 upstream=env.upstream_id or "-", status=status, note=note, reply=str(reply))


def reply_to_json(reply: Reply) -> list[Any]:
    return [reply.code, reply.enhanced, reply.text]


def reply_from_json(value: Any) -> Reply:
    try:
        code, enhanced, text = value
        return Reply(int(code), enhanced, str(text))
    except (TypeError, ValueError):
        return Reply(550, "5.0.0", "delivery failed (reply not recorded)")
