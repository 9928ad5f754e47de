import os

import pytest

from domain.maildir import Mailboxes, MaildirSink
from shared.blocking import InlinePool
from shared.message import HeaderEdits
from shared.envelope import Envelope, Recipient
from shared.smtp.reply import UNKNOWN_USER, Reply


class Txn:
    def __init__(self, qid="Q1", sender="s@example.net"):
        self.queue_id = qid
        self.envelope = Envelope(sender=sender, recipients=[])
        self.edits = HeaderEdits()


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


@pytest.fixture
def sink(tmp_path):
    boxes = Mailboxes(str(tmp_path / "mail"), ["example.org"], ["alice@example.org", "bob@example.org"],
                      {"team@example.org": ["alice@example.org", "bob@example.org"],
                       "postmaster@example.org": ["alice@example.org"]})
    return MaildirSink(boxes, pool=InlinePool(), hostname="mx:1/x")


def deliver(sink, rcpts, chunks, qid="Q1"):
    s = sink.session(None)
    txn = Txn(qid)
    s.begin(txn)
    answers = [s.rcpt(txn, Recipient(r)) for r in rcpts]
    assert s.data_start(txn) is None
    for c in chunks:
        s.write(c)
    return answers, result(s.data_end(txn))


def new_files(tmp_path, user):
    d = tmp_path / "mail" / "example.org" / user / "Maildir" / "new"
    return sorted(d.iterdir()) if d.exists() else []


def test_delivers_once_per_mailbox_and_cleans_up(tmp_path, sink):
    answers, reply = deliver(sink, ["team@example.org", "Alice@Example.org"], [b"Subject: x\r\n\r\n", b"hi\r\n"])
    assert answers == [None, None]
    assert (reply.code, reply.enhanced) == (250, "2.0.0") and "Q1" in reply.text
    a, b = new_files(tmp_path, "alice"), new_files(tmp_path, "bob")
    assert len(a) == 1 and len(b) == 1          # alias + direct address: one copy for alice
    body = b"Return-Path: <s@example.net>\r\nSubject: x\r\n\r\nhi\r\n"
    assert a[0].read_bytes() == body and b[0].read_bytes() == body
    assert a[0].name.endswith(f",S={len(body)}") and "/" not in a[0].name and ":" not in a[0].name
    assert set(os.listdir(sink.spool)) == sink.reserve.names()   # only unused reserve
    for sub in ("cur", "tmp"):
        assert (tmp_path / "mail" / "example.org" / "alice" / "Maildir" / sub).is_dir()


def test_unknown_user_and_postmaster(tmp_path, sink):
    s = sink.session(None)
    for addr in ("carol@example.org", "alice@other.org"):
        r = s.rcpt(Txn(), Recipient(addr))
        assert (r.code, r.enhanced) == (UNKNOWN_USER.code, UNKNOWN_USER.enhanced) == (550, "5.1.1")
        assert r.text == f"<{addr}>: Recipient address rejected: User unknown in virtual mailbox table"
    assert s.rcpt(Txn(), Recipient("Postmaster")) is None


def test_abort_leaves_nothing(tmp_path, sink):
    s = sink.session(None)
    txn = Txn()
    s.rcpt(txn, Recipient("alice@example.org"))
    s.data_start(txn)
    s.write(b"partial")
    s.abort(txn)
    assert set(os.listdir(sink.spool)) == sink.reserve.names()
    assert new_files(tmp_path, "alice") == []


def test_write_failure_is_tempfail_not_250(tmp_path, sink):
    s = sink.session(None)
    txn = Txn()
    s.rcpt(txn, Recipient("alice@example.org"))
    s.data_start(txn)
    s.write(b"x\r\n")
    # the mailbox path is taken by a file: delivery must fail and say 451
    (tmp_path / "mail" / "example.org").mkdir(parents=True)
    (tmp_path / "mail" / "example.org" / "alice").write_text("not a dir")
    reply = result(s.data_end(txn))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert set(os.listdir(sink.spool)) == sink.reserve.names()
    sink.close()
    assert os.listdir(sink.spool) == []


def test_a_mailbox_removed_after_first_use_is_made_again(tmp_path, sink):
    import shutil
    deliver(sink, ["alice@example.org"], [b"Subject: 1\r\n\r\nx\r\n"])
    shutil.rmtree(tmp_path / "mail" / "example.org" / "alice")
    _, reply = deliver(sink, ["alice@example.org"], [b"Subject: 2\r\n\r\ny\r\n"], qid="Q2")
    assert reply.code == 250
    assert [f.read_bytes().endswith(b"y\r\n") for f in new_files(tmp_path, "alice")] == [True]


@pytest.mark.parametrize("size", [200_000, 100])       # full in the write-behind, or at the fsync
def test_a_full_disk_is_452_at_end_of_data_and_the_session_goes_on(tmp_path, sink, size):
    """The message file is swapped for /dev/full under the session: the kernel itself says
    ENOSPC. No exception may reach the adapter (it would drop the session with 421)."""
    s = sink.session(None)
    txn = Txn()
    s.begin(txn)
    assert s.rcpt(txn, Recipient("alice@example.org")) is None
    assert s.data_start(txn) is None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, s.fd)
    os.close(full)
    s.write(b"x" * size)
    reply = s.data_end(txn)
    reply = reply if isinstance(reply, Reply) else result(reply)    # at once when the write failed
    assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
    assert new_files(tmp_path, "alice") == []
    answers, reply = deliver(sink, ["alice@example.org"], [b"Subject: after\r\n\r\nhi\r\n"])
    assert reply.code == 250 and len(new_files(tmp_path, "alice")) == 1


def test_a_quarantine_is_refused_451_and_nothing_is_delivered(tmp_path, sink):
    """The domain tier cannot keep a message from delivery: it never delivers one a check
    asked to quarantine, and says in its log where the check belongs."""
    from twisted.logger import capturedLogs, formatEvent
    s = sink.session(None)
    txn = Txn()
    txn.quarantine = "test"
    s.begin(txn)
    s.rcpt(txn, Recipient("alice@example.org"))
    s.data_start(txn)
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    with capturedLogs() as events:
        reply = s.data_end(txn)                  # answered at once, as a write error is
    assert (reply.code, reply.enhanced) == (451, "4.3.0") and "configuration" in reply.text
    assert new_files(tmp_path, "alice") == []
    assert set(os.listdir(sink.spool)) == sink.reserve.names()      # the received file is gone
    [line] = [formatEvent(e) for e in events]
    assert line.startswith("Q1: an end_of_data check asked for quarantine") and "at the filter" in line
    # The session goes on: the next transaction is delivered.
    _, reply = deliver(sink, ["alice@example.org"], [b"Subject: y\r\n\r\nhi\r\n"], qid="Q2")
    assert reply.code == 250 and len(new_files(tmp_path, "alice")) == 1
