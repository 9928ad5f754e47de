"""The filter's queue sink: 250 only when the queue file is durable; storage errors are 4xx."""
import errno
import os

import pytest

from twisted.internet import defer

from shared.engine.queued import QueueSink
from shared.engine.session import Transaction
from shared.envelope import Envelope, Recipient


class Message:
    def __init__(self, qid, fail_write=False, commit=None):
        self.qid, self.size, self.fail_write = qid, 0, fail_write
        self.commit_result = commit or defer.succeed(None)
        self.aborted = False
        self.data = b""
        self.body = None

    def write(self, data):
        if self.fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.size += len(data)
        self.data += data

    def commit(self, envelope):
        self.body = self.data          # a small message stays in memory
        return self.commit_result

    def abort(self):
        self.aborted = True


class Spool:
    def __init__(self, message):
        self.message = message

    def new_message(self, qid):
        return self.message


class Manager:
    def __init__(self):
        self.notified = []

    def notify(self, qid, committed=None, body=None):
        self.notified.append((qid, committed, body))


def txn():
    return Transaction("Q1", Envelope(sender="s@example.net", recipients=[Recipient("a@example.org")]))


def result(d):
    out = []
    d.addBoth(out.append) if isinstance(d, defer.Deferred) else out.append(d)
    return out[0]


def test_250_after_commit_and_the_manager_is_told_what_was_written():
    m, mgr = Message("Q1"), Manager()
    s = QueueSink(Spool(m), mgr).session(None)
    t = txn()
    assert s.data_start(t) is None
    body = b"Subject: x\r\n\r\nhi\r\n"
    s.write(body)
    reply = result(s.data_end(t))
    assert (reply.code, reply.text) == (250, "Ok: queued as Q1")
    assert mgr.notified == [("Q1", (t.envelope, len(body)), body)]


def test_disk_full_while_receiving_is_452_at_end_of_data():
    m, mgr = Message("Q1", fail_write=True), Manager()
    s = QueueSink(Spool(m), mgr).session(None)
    t = txn()
    s.data_start(t)
    s.write(b"x" * 10)
    s.write(b"y" * 10)
    reply = result(s.data_end(t))
    assert (reply.code, reply.enhanced) == (452, "4.3.1") and m.aborted and mgr.notified == []


@pytest.mark.parametrize("err,expected", [(errno.EIO, (451, "4.3.0")),
                                          (errno.ENOSPC, (452, "4.3.1"))])   # a full disk at the fsync
def test_failed_commit_is_4xx_never_250(err, expected):
    m, mgr = Message("Q1", commit=defer.fail(OSError(err, os.strerror(err)))), Manager()
    s = QueueSink(Spool(m), mgr).session(None)
    t = txn()
    s.data_start(t)
    s.write(b"x")
    reply = result(s.data_end(t))
    assert (reply.code, reply.enhanced) == expected and m.aborted and mgr.notified == []


def test_session_call_helper_turns_a_sink_exception_into_a_failed_deferred():
    from shared.engine.session import _call

    def broken(*args):
        raise RuntimeError("sink bug")
    d = _call(broken, 1, then=lambda r: r)
    assert isinstance(d, defer.Deferred)
    failure = result(d)
    assert failure.check(RuntimeError)
    assert _call(lambda x: x + 1, 1, then=lambda r: r * 10) == 20          # synchronous: a plain value
    later = defer.Deferred()
    d = _call(lambda: later, then=lambda r: r * 10)
    later.callback(3)
    assert result(d) == 30


def test_a_quarantined_message_is_committed_into_quarantine_and_the_manager_is_not_told(tmp_path):
    """The client is told what it is told of any message; the spool keeps it apart, with the
    reason and the checks' header edits in its envelope."""
    from twisted.internet.task import Clock
    from twisted.logger import capturedLogs, formatEvent

    from shared.ids import new_queue_id
    from shared.message import HeaderEdits
    from shared.queue.store import Spool as RealSpool, read_queue_file
    from tests.shared.queue.helpers import sync_runner

    spool, mgr = RealSpool(tmp_path / "spool", reactor=Clock(), fsync=False, runner=sync_runner), Manager()
    s = QueueSink(spool, mgr).session(None)
    t = Transaction(new_queue_id(), Envelope(sender="s@example.net", recipients=[Recipient("a@example.org")]))
    t.edits = HeaderEdits(add=(("X-Spam-Flag", "YES"),))
    t.quarantine = "score 17.2\r\nforged: line"       # one line in the log, whatever a check says
    assert s.data_start(t) is None
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    with capturedLogs() as events:
        reply = result(s.data_end(t))
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.0.0", f"Ok: queued as {t.queue_id}")
    assert mgr.notified == []
    assert spool.list("quarantine") == [t.queue_id] and spool.list("incoming") == []
    env, _, _ = read_queue_file(spool.path(t.queue_id, "quarantine"), check_message=True)
    assert env.quarantine == "score 17.2  forged: line" and env.header_edits == t.edits
    assert [formatEvent(e) for e in events] == [f"{t.queue_id}: quarantined: score 17.2  forged: line"]


def test_without_quarantine_the_message_goes_to_incoming_as_before(tmp_path):
    from twisted.internet.task import Clock

    from shared.ids import new_queue_id
    from shared.queue.store import Spool as RealSpool
    from tests.shared.queue.helpers import sync_runner

    spool, mgr = RealSpool(tmp_path / "spool", reactor=Clock(), fsync=False, runner=sync_runner), Manager()
    s = QueueSink(spool, mgr).session(None)
    t = Transaction(new_queue_id(), Envelope(sender="s@example.net", recipients=[Recipient("a@example.org")]))
    assert t.quarantine is None
    s.data_start(t)
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    assert result(s.data_end(t)).code == 250
    assert spool.list("incoming") == [t.queue_id] and [q for q, _, _ in mgr.notified] == [t.queue_id]
