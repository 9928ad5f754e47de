"""Test doubles for the queue: a synchronous and a step-by-step runner, a scripted
delivery function, and shortcuts to queue messages."""
from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from shared.envelope import Envelope, Recipient
from shared.queue.manager import QueueManager, QueueSettings
from shared.queue.store import Spool
from shared.smtp.reply import Reply

T0 = 1_700_000_000.0          # the test clocks start here

OK = Reply(250, "2.0.0", "Ok: queued as NEXT1")
TEMP = Reply(451, "4.4.1", "Next hop not reachable, try again later")
PERM = Reply(550, "5.1.1", "User unknown")

BODY = (b"Received: from client.example.org\r\n"
        b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: test message\r\n"
        b"Message-ID: <m1@example.org>\r\n"
        b"\r\n"
        b"Hello Bob,\r\n"
        b"this is the body.\r\n")


def sync_runner(f, *args):
    return maybeDeferred(f, *args)


class StepRunner:
    """Holds each blocking job until the test runs it: makes concurrency deterministic."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable, tuple, Deferred]] = []

    def __call__(self, f, *args) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_one(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.run_one()


def envelope(sender: str = "alice@example.org", rcpts=("bob@example.net",), **kw) -> Envelope:
    recipients = [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts]
    return Envelope(sender=sender, recipients=recipients, **kw)


def queue_message(spool: Spool, env: Envelope, body: bytes = BODY) -> str:
    """Receive and commit one message (with a synchronous runner)."""
    msg = spool.new_message()
    for i in range(0, len(body), 7):          # several writes, as DATA arrives
        msg.write(body[i:i + 7])
    d = msg.commit(env)
    results = []
    d.addBoth(results.append)
    assert results == [None], results
    return msg.qid


class FakeDeliver:
    """A delivery function: replies come from ``script(qid, env, rcpt) -> Reply``.

    ``hold=True`` leaves every call's Deferred unfired in ``pending``; the test
    fires it with :meth:`release`.
    """

    def __init__(self, script: Callable[[str, Envelope, Recipient], Reply] | None = None,
                 hold: bool = False, clock: Clock | None = None):
        self.script = script or (lambda qid, env, rcpt: OK)
        self.hold = hold
        self.clock = clock
        self.calls: list[list[tuple[str, Envelope, bytes]]] = []
        self.times: list[float] = []
        self.pending: list[tuple[Deferred, list]] = []

    def __call__(self, items):
        batch = []
        for qid, env, open_body, body_len in items:
            if isinstance(open_body, bytes):        # still in memory from its reception
                data = open_body[:body_len]
            else:
                with open_body() as f:
                    data = f.read(body_len)
            batch.append((qid, env, data))
        self.calls.append(batch)
        if self.clock is not None:
            self.times.append(self.clock.seconds())
        if self.hold:
            d: Deferred = Deferred()
            self.pending.append((d, batch))
            return d
        return succeed(self.results(batch))

    def results(self, batch):
        return [{r.address: self.script(qid, env, r) for r in env.recipients}
                for qid, env, _ in batch]

    def release(self, index: int = 0, script=None) -> None:
        d, batch = self.pending.pop(index)
        if script is not None:
            self.script = script
        d.callback(self.results(batch))

    @property
    def delivered(self) -> list[str]:
        return [qid for batch in self.calls for qid, _, _ in batch]


def make_manager(spool: Spool, deliver, clock: Clock, route=None, **settings) -> QueueManager:
    settings.setdefault("request_interval", 1.0)
    return QueueManager(spool, deliver, QueueSettings(**settings), reactor=clock,
                        log_prefix="test: ", relay="next.example[192.0.2.1]:25", route=route)


def run_until(clock: Clock, when: float) -> None:
    """Advance the clock call by call up to ``when`` (so each call sees its own time)."""
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= when]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(max(0.0, when - clock.seconds()))


def messages(events) -> list[str]:
    return [formatEvent(e) for e in events]
