"""Quarantine in the spool: committed into quarantine/ as durably as into incoming/, kept
by recovery, never scheduled; `smarthost quarantine` list/show/release/delete, and what
the `queue` commands do with quarantined mail."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from shared.envelope import Envelope
from shared.message import HeaderEdits
from shared.queue import admin
from shared.queue.store import Spool, read_queue_file
from tests.shared.queue.helpers import (
    BODY, OK, T0, FakeDeliver, StepRunner, envelope, make_manager, messages, queue_message,
)

EDITS = HeaderEdits(add=(("X-Quarantine-Test", "yes"),), remove=frozenset({"received"}))


def quarantine_message(spool, reason: str = "looks like phishing", body: bytes = BODY, **env) -> str:
    """Receive one message and commit it into quarantine/ (synchronous runner)."""
    msg = spool.new_message()
    for i in range(0, len(body), 7):
        msg.write(body[i:i + 7])
    results = []
    msg.commit(envelope(quarantine=reason, **env), state="quarantine").addBoth(results.append)
    assert results == [None], results
    return msg.qid


# -- envelope and store -----------------------------------------------------------

def test_the_envelope_records_the_reason_only_when_there_is_one():
    plain = Envelope("a@example.org", [])
    assert "quarantine" not in plain.to_json()
    assert Envelope.from_json(plain.to_json()).quarantine is None      # old files decode
    kept = Envelope("a@example.org", [], quarantine="score 17")
    assert kept.to_json()["quarantine"] == "score 17"
    assert Envelope.from_json(kept.to_json()).quarantine == "score 17"
    with pytest.raises(TypeError):
        Envelope.from_json({**plain.to_json(), "quarantine": 5})


def test_commit_into_quarantine_is_durable_before_it_fires(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, runner=runner)     # fsync on
    m = spool.new_message()
    m.write(BODY)
    done = []
    m.commit(envelope(quarantine="test"), state="quarantine").addBoth(done.append)
    runner.run_one()                                       # write, fsync the file, rename
    assert (root / "quarantine" / m.qid).exists() and not (root / "incoming" / m.qid).exists()
    assert done == [] and spool.dir_syncs == 0             # the directory is not yet synced
    assert runner.jobs[-1][0] == spool.group_syncs["quarantine"].sync
    assert spool.group_syncs["quarantine"].path == root / "quarantine"
    runner.run_one()                                       # fsync(quarantine/)
    assert spool.dir_syncs == 1 and done == [None]
    env, size, _ = read_queue_file(root / "quarantine" / m.qid, check_message=True)
    assert env.quarantine == "test" and size == len(BODY)


def test_a_failed_quarantine_commit_leaves_nothing(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, runner=runner)

    def broken_fsync(path):
        raise OSError(5, "Input/output error")
    spool.group_syncs["quarantine"].fsync_dir = broken_fsync
    m = spool.new_message()
    m.write(BODY)
    failures = []
    m.commit(envelope(quarantine="test"), state="quarantine").addErrback(failures.append)
    with capturedLogs():
        runner.run_all()
    assert failures and failures[0].check(OSError)
    assert spool.list("quarantine") == [] and os.listdir(root / "tmp") == []


def test_commit_only_into_incoming_or_quarantine(spool):
    m = spool.new_message()
    failures = []
    m.commit(envelope(), state="deferred").addErrback(failures.append)
    assert failures and failures[0].check(ValueError)
    m.abort()


def test_recovery_keeps_a_quarantined_message_and_sets_a_damaged_one_apart(spool, root, clock):
    good = quarantine_message(spool)
    bad = quarantine_message(spool)
    path = Path(spool.path(bad, "quarantine"))
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20                                        # one flipped message byte
    path.write_bytes(bytes(data))
    with capturedLogs() as events:
        report = Spool(root, reactor=clock, fsync=False, runner=spool.runner).recover()
    assert spool.list("quarantine") == [good] and spool.list("corrupt") == [bad]
    assert report.counts["quarantine"] == 1
    assert report.corrupt == [(bad, "quarantine", "message checksum mismatch")]
    assert any(f"quarantine/{bad}: corrupt queue file" in line for line in messages(events))


def test_an_older_spool_without_quarantine_is_still_read_by_the_admin_commands(spool, root):
    qid = queue_message(spool, envelope())
    os.rmdir(root / "quarantine")
    assert [e["qid"] for e in admin.list_queue(root)] == [qid]
    out = io.StringIO()
    assert admin.quarantine_main(root, "list", [], out) == 0
    assert out.getvalue() == "Quarantine is empty\n"
    Spool(root, reactor=spool.reactor, fsync=False, runner=spool.runner)   # the daemon makes it
    assert (root / "quarantine").is_dir()


def test_quarantined_mail_is_never_scheduled(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    qid = quarantine_message(spool)
    mgr.start()
    mgr.scan(flush=True)
    admin.flush(spool.root)
    clock.advance(400)                                     # the request poll and a rescan
    assert deliver.calls == [] and spool.list("quarantine") == [qid]


# -- smarthost quarantine ---------------------------------------------------------

def test_list_shows_only_quarantined_mail_with_the_reason(spool, clock, root):
    q = quarantine_message(spool, rcpts=("bob@example.net", "carol@example.net"))
    other = queue_message(spool, envelope())
    out = io.StringIO()
    assert admin.quarantine_main(root, "list", [], out) == 0
    text = out.getvalue()
    assert q in text and other not in text
    first, reason, *rest = text.splitlines()
    arrival = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(T0))
    assert first.split() == [q, "quarantine", str(len(BODY)), *arrival.split(), "<alice@example.org>"]
    # The columns of the other states: the size ends, the arrival time starts, where theirs do.
    assert first.index(arrival) == len(f"{q:<22} {'incoming':<9} {len(BODY):>9}  ")
    assert reason.strip() == "quarantined: looks like phishing"
    assert rest[:2] == [f"{'':<22} <bob@example.net>", f"{'':<22} <carol@example.net>"]
    assert text.endswith("-- 1 quarantine\n")

    out = io.StringIO()
    assert admin.quarantine_main(root, "list", [], out, as_json=True) == 0
    [entry] = map(json.loads, out.getvalue().splitlines())
    assert entry == {"queue_id": q, "queue_name": "quarantine", "arrival_time": int(T0),
                     "message_size": len(BODY), "sender": "alice@example.org",
                     "recipients": [{"address": "bob@example.net"}, {"address": "carol@example.net"}],
                     "next_attempt": None, "attempts": 0, "upstream_id": None,
                     "quarantine_reason": "looks like phishing"}


def test_queue_list_shows_quarantined_mail_with_its_state_and_reason(spool, clock, root):
    q = quarantine_message(spool, reason="test")
    i = queue_message(spool, envelope())
    out = io.StringIO()
    assert admin.main(root, "list", [], out) == 0
    text = out.getvalue()
    assert f"{q:<22} quarantine " in text and f"{i:<22} incoming " in text
    assert f"{'':<22} quarantined: test" in text
    assert text.endswith("-- 1 incoming, 1 quarantine\n") or text.endswith("-- 1 quarantine, 1 incoming\n")
    out = io.StringIO()
    admin.main(root, "list", [], out, as_json=True)
    entries = {e["queue_id"]: e for e in map(json.loads, out.getvalue().splitlines())}
    assert entries[q]["queue_name"] == "quarantine" and entries[q]["quarantine_reason"] == "test"
    assert "quarantine_reason" not in entries[i]                   # other states: as before


def test_show_prints_the_envelope_the_reason_the_edits_and_the_whole_message(spool, clock, root):
    q = quarantine_message(spool, reason="score 17.2", header_edits=EDITS, upstream_id="EDGEID0000001")
    out = io.StringIO()
    assert admin.quarantine_main(root, "show", [q], out) == 0
    text = out.getvalue()
    for line in (f"queue id: {q}", "state: quarantine", "quarantine reason: score 17.2",
                 "sender: <alice@example.org>", "recipient: <bob@example.net>",
                 "upstream_id: EDGEID0000001", "header edits: add X-Quarantine-Test; remove received",
                 "Subject: test message", "Hello Bob,", "this is the body."):
        assert line in text.splitlines(), text
    assert "Hello Bob," not in admin.show(root, q)                 # queue show: the header only
    assert "quarantine reason: score 17.2" in admin.show(root, q)

    out = io.StringIO()
    assert admin.quarantine_main(root, "show", [q.lower()], out, as_json=True) == 0
    shown = json.loads(out.getvalue())
    assert shown["queue_name"] == "quarantine" and shown["quarantine_reason"] == "score 17.2"
    assert shown["envelope"]["quarantine"] == "score 17.2"
    assert shown["envelope"]["header_edits"]["add"] == [["X-Quarantine-Test", "yes"]]
    assert shown["message"] == BODY.decode().replace("\r\n", "\n")
    assert "Subject: test message" in shown["header"] and "Hello Bob" not in shown["header"]

    other = queue_message(spool, envelope())
    with pytest.raises(admin.AdminError, match="not quarantined"):
        admin.quarantine_main(root, "show", [other], io.StringIO())
    with pytest.raises(admin.AdminError, match="no such message"):
        admin.quarantine_main(root, "show", ["01NOSUCHMESSAGE00000"], io.StringIO())
    out = io.StringIO()
    assert admin.quarantine_main(root, "show", ["ALL"], out) == 0
    assert f"queue id: {q}" in out.getvalue() and other not in out.getvalue()


def test_release_and_delete(spool, clock, root):
    a, b = quarantine_message(spool), quarantine_message(spool)
    held = queue_message(spool, envelope())
    spool.move(held, "incoming", "hold")
    before = time.time()
    out = io.StringIO()
    assert admin.quarantine_main(root, "release", [a, held, "01NOSUCHMESSAGE00000"], out) == 1
    assert out.getvalue().splitlines() == [f"{a}: released", f"{held}: not quarantined (hold)",
                                           "01NOSUCHMESSAGE00000: not found"]
    assert spool.list("deferred") == [a] and spool.list("hold") == [held]
    assert os.stat(spool.path(a, "deferred")).st_mtime >= before - 1          # due now
    assert f"{a}.quarantine-release" in spool.requests()
    assert admin.quarantine_release(root, [a]) == {a: "not quarantined (deferred)"}

    out = io.StringIO()
    assert admin.quarantine_main(root, "delete", [b], out) == 0
    assert out.getvalue() == f"{b}: deleted\n"
    assert spool.list("quarantine") == [] and f"{b}.quarantine-deleted" in spool.requests()
    assert admin.quarantine_delete(root, [held, a]) == {held: "not quarantined (hold)",
                                                        a: "not quarantined (deferred)"}

    c, d = quarantine_message(spool), quarantine_message(spool)
    assert admin.quarantine_main(root, "release", ["ALL"], io.StringIO()) == 0
    assert sorted(spool.list("deferred")) == sorted([a, c, d]) and spool.list("hold") == [held]


def test_release_and_delete_by_the_upstream_id(spool, clock, root):
    q = quarantine_message(spool, upstream_id="EDGEID0000042")
    out = io.StringIO()
    assert admin.quarantine_main(root, "release", ["edgeid0000042"], out) == 0
    assert out.getvalue() == f"{q}: released (upstream id EDGEID0000042)\n"


def test_the_queue_commands_leave_quarantined_mail_to_quarantine_but_may_delete_it(spool, clock, root):
    q = quarantine_message(spool)
    note = admin.QUARANTINED
    assert admin.hold(root, [q]) == {q: note}
    assert admin.release(root, [q]) == {q: note}
    assert admin.flush_messages(root, [q]) == {q: note}
    out = io.StringIO()
    assert admin.main(root, "release", ["ALL"], out) == 0 and out.getvalue() == ""   # ALL: hold/ only
    assert admin.main(root, "release", [q], out) == 1
    assert admin.main(root, "hold", ["ALL"], out) == 0
    assert admin.flush(root) == 0
    assert spool.list("quarantine") == [q] and spool.list("hold") == []
    assert admin.delete(root, [q]) == {q: "deleted"}
    assert spool.list("quarantine") == [] and f"{q}.deleted" in spool.requests()


def test_the_daemon_logs_each_action_and_delivers_a_released_message_with_its_edits(spool, clock, root):
    deliver = FakeDeliver(lambda q, e, r: OK)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    a = quarantine_message(spool, header_edits=EDITS)
    b = quarantine_message(spool)
    clock.advance(2)
    assert deliver.calls == []
    assert admin.quarantine_release(root, [a]) == {a: "released"}
    assert admin.quarantine_delete(root, [b]) == {b: "deleted"}
    with capturedLogs() as events:
        clock.advance(1)                                   # the request poll
        clock.advance(0)
    lines = messages(events)
    assert f"test: {a}: released from quarantine by admin command" in lines, lines
    assert f"test: {b}: removed from quarantine by admin command" in lines, lines
    [[(qid, env, data)]] = deliver.calls
    assert qid == a and env.header_edits == EDITS and data == BODY     # edits applied when sent
    assert spool.locate(a) is None and spool.locate(b) is None and spool.requests() == []


def test_what_was_done_while_the_daemon_was_down_is_logged_and_done_at_start(spool, clock, root):
    a, b = quarantine_message(spool), quarantine_message(spool)
    admin.quarantine_release(root, [a])
    admin.quarantine_delete(root, [b])
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    with capturedLogs() as events:
        mgr.start()
        clock.advance(0)
    lines = messages(events)
    assert f"test: {a}: released from quarantine by admin command" in lines
    assert f"test: {b}: removed from quarantine by admin command" in lines
    assert deliver.delivered == [a]
