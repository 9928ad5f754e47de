"""Admin operations, alone and while a queue manager runs on the same spool."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from shared.envelope import Recipient
from shared.ids import new_queue_id
from shared.queue import admin
from tests.shared.queue.helpers import (
    BODY, OK, T0, TEMP, FakeDeliver, envelope, make_manager, messages, queue_message, run_until,
)


def deferred_message(spool, clock, **env):
    qid = queue_message(spool, envelope(**env))
    spool.move(qid, "incoming", "deferred")
    spool.set_next_attempt(qid, "deferred", clock.seconds() + 3000)
    spool.write_status(qid, {"pending": ["bob@example.net"], "attempts": 2,
                             "last_reply": {"bob@example.net": str(TEMP)}})
    return qid


def test_list_and_show(spool, clock, root):
    env = envelope(rcpts=("bob@example.net", Recipient("carol@example.net", ("FAILURE",),
                                                         "rfc822;carol@example.net")),
                   upstream_id="EDGE9", envid="E9")
    d = deferred_message(spool, clock, rcpts=env.recipients, upstream_id="EDGE9", envid="E9")
    i = queue_message(spool, envelope(sender="x@example.org"))
    bad = queue_message(spool, envelope())
    spool.move(bad, "incoming", "corrupt")
    Path(spool.path(bad, "corrupt")).write_bytes(b"garbage")

    entries = {e["qid"]: e for e in admin.list_queue(root)}
    assert set(entries) == {d, i, bad}
    e = entries[d]
    assert e["state"] == "deferred" and e["sender"] == "alice@example.org"
    assert e["recipients"] == ["bob@example.net"]            # only those still pending
    assert e["next_attempt"] == clock.seconds() + 3000
    assert e["attempts"] == 2 and e["last_reply"] == {"bob@example.net": str(TEMP)}
    assert e["upstream_id"] == "EDGE9" and e["size"] > 0
    assert entries[i]["state"] == "incoming" and entries[i]["recipients"] == ["bob@example.net"]
    assert entries[bad]["error"] and entries[bad]["state"] == "corrupt"

    text = admin.show(root, d)
    assert "state: deferred" in text and "sender: <alice@example.org>" in text
    assert "recipient: <carol@example.net> NOTIFY=FAILURE ORCPT=rfc822;carol@example.net" in text
    assert "envid: E9" in text and "attempts: 2" in text
    assert "Subject: test message" in text and "Hello Bob" not in text
    with pytest.raises(KeyError):
        admin.show(root, "01NOSUCHMESSAGE00000")
    with pytest.raises(ValueError):
        admin.show(root, "../etc")

    out = io.StringIO()
    assert admin.main(root, "list", [], out) == 0
    assert d in out.getvalue() and "(corrupt:" in out.getvalue()
    assert "451 4.4.1 Next hop not reachable" in out.getvalue()


def test_hold_release_delete_without_daemon(spool, clock, root):
    d = deferred_message(spool, clock)
    i = queue_message(spool, envelope())
    assert admin.hold(root, [d, i, "01NOSUCHMESSAGE00000", "bad/id"]) == {
        d: "held", i: "held", "01NOSUCHMESSAGE00000": "not found", "bad/id": "invalid queue id"}
    assert sorted(spool.list("hold")) == sorted([d, i])
    assert admin.hold(root, [d]) == {d: "already held"}
    before = time.time()
    assert admin.release(root, [d]) == {d: "released"}
    assert spool.list("deferred") == [d]
    assert os.stat(spool.path(d, "deferred")).st_mtime >= before - 1     # due now
    assert f"{d}.release" in spool.requests()
    assert admin.release(root, [d]) == {d: "not held"}
    assert admin.delete(root, [i, d]) == {i: "deleted", d: "deleted"}
    assert spool.list("hold") == [] and spool.list("deferred") == []
    assert spool.read_status(d) is None


def test_main_all_and_exit_codes(spool, clock, root):
    qids = [queue_message(spool, envelope()) for _ in range(3)]
    out = io.StringIO()
    assert admin.main(root, "hold", ["ALL"], out) == 0
    assert sorted(spool.list("hold")) == sorted(qids)
    assert admin.main(root, "release", ["ALL"], out) == 0
    assert admin.main(root, "delete", [qids[0], "01NOSUCHMESSAGE00000"], out) == 1
    assert "01NOSUCHMESSAGE00000: not found" in out.getvalue()
    with pytest.raises(admin.AdminError):
        admin.main(root, "show", ["01NOSUCHMESSAGE00000"], out)
    with pytest.raises(admin.AdminError):
        admin.main(root / "nope", "list", [], out)


def test_admin_while_manager_runs(spool, clock, root):
    deliver = FakeDeliver(lambda q, e, r: TEMP)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    a = queue_message(spool, envelope())
    b = queue_message(spool, envelope())
    mgr.notify(a)
    mgr.notify(b)
    clock.advance(0)
    assert sorted(spool.list("deferred")) == sorted([a, b])

    # hold one deferred message: its timer fires but it is not delivered
    assert admin.hold(root, [a]) == {a: "held"}
    run_until(clock, clock.seconds() + 300)
    assert deliver.delivered.count(a) == 1 and deliver.delivered.count(b) == 2

    # release it: the daemon schedules it at its next poll of R/requests/
    deliver.script = lambda q, e, r: OK
    assert admin.release(root, [a]) == {a: "released"}
    clock.advance(1)
    clock.advance(0)
    assert deliver.delivered.count(a) == 2 and spool.locate(a) is None
    assert spool.requests() == []

    # flush: b is due in 600 s, but flushing makes it due now
    assert spool.list("deferred") == [b]
    assert admin.flush(root) == 1
    clock.advance(1)
    clock.advance(0)
    assert deliver.delivered.count(b) == 3 and spool.locate(b) is None


def test_hold_and_delete_of_active_message_are_requests(spool, clock, root):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    held = queue_message(spool, envelope())
    deleted = queue_message(spool, envelope(rcpts=("bob@example.net", "eve@example.net")))
    mgr.notify(held)
    mgr.notify(deleted)
    clock.advance(0)
    assert sorted(spool.list("active")) == sorted([held, deleted])
    assert admin.hold(root, [held]) == {held: "hold requested"}
    assert admin.delete(root, [deleted]) == {deleted: "delete requested"}
    clock.advance(1)                                   # the poll leaves in-flight messages alone
    assert sorted(spool.list("active")) == sorted([held, deleted])
    with capturedLogs() as events:
        deliver.release(0, script=lambda q, e, r: TEMP if r.address == "bob@example.net"
                        else OK)
    assert f"test: {held}: put on hold by admin request" in messages(events)
    assert f"test: {deleted}: removed by admin request" in messages(events)
    assert spool.list("hold") == [held]                # not deferred: held
    assert spool.read_status(held)["pending"] == ["bob@example.net"]
    assert spool.locate(deleted) is None and spool.read_status(deleted) is None
    assert spool.requests() == []
    run_until(clock, clock.seconds() + 3600)
    assert deliver.delivered.count(held) == 1          # never scheduled while held


def test_request_that_arrives_after_the_attempt_is_applied_by_the_poll(spool, clock, root):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock, request_interval=1.0)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    clock.advance(0)
    deliver.release(0, script=lambda q, e, r: TEMP)   # finished: now in deferred
    spool.request(f"{qid}.hold")                      # the admin saw it in active just before
    clock.advance(1)
    assert spool.list("hold") == [qid] and spool.requests() == []


def test_requests_left_while_daemon_was_down_are_applied_at_start(spool, clock, root):
    qid = queue_message(spool, envelope())
    spool.move(qid, "incoming", "active")             # the daemon died mid-delivery
    assert admin.delete(root, [qid]) == {qid: "delete requested"}
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    with capturedLogs():
        mgr.start()
    clock.advance(0)
    assert deliver.calls == [] and spool.locate(qid) is None


def test_hold_request_cancelled_before_the_attempt_ends_is_not_applied(spool, clock, root):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    clock.advance(0)
    assert admin.hold(root, [qid]) == {qid: "hold requested"}
    clock.advance(1)                         # the poll saw it: to be applied at the end
    assert admin.release(root, [qid]) == {qid: "hold request cancelled"}
    with capturedLogs():
        deliver.release(0, script=lambda q, e, r: TEMP)
    assert spool.list("deferred") == [qid] and spool.list("hold") == []


def test_messages_are_found_by_their_upstream_id(spool, clock, root):
    up = new_queue_id()                      # the id the previous tier's client was told
    d = deferred_message(spool, clock, upstream_id=up)
    twin = queue_message(spool, envelope(upstream_id=up))       # sent twice (a lost 250)
    other = queue_message(spool, envelope(upstream_id=new_queue_id()))
    out = io.StringIO()
    assert admin.main(root, "show", [up.lower()], out) == 0
    assert f"queue id: {d}" in out.getvalue() and f"queue id: {twin}" in out.getvalue()
    assert other not in out.getvalue()
    for action, result in (("hold", "held"), ("release", "released"),
                           ("flush", "made due now"), ("delete", "deleted")):
        out = io.StringIO()
        assert admin.main(root, action, [up], out) == 0, out.getvalue()
        assert out.getvalue() == "".join(f"{q}: {result} (upstream id {up})\n"
                                         for q in sorted([d, twin]))
    assert spool.locate(d) is None and spool.locate(twin) is None
    assert spool.locate(other) == "incoming"


def test_queue_ids_are_case_insensitive(spool, clock, root):
    qid = queue_message(spool, envelope())
    out = io.StringIO()
    assert admin.main(root, "show", [qid.lower()], out) == 0
    assert f"queue id: {qid}" in out.getvalue()
    out = io.StringIO()
    assert admin.main(root, "hold", [qid.lower()], out) == 0
    assert out.getvalue() == f"{qid}: held\n" and spool.list("hold") == [qid]


def test_show_all(spool, clock, root):
    d = deferred_message(spool, clock)
    i = queue_message(spool, envelope())
    bad = queue_message(spool, envelope())
    spool.move(bad, "incoming", "corrupt")
    Path(spool.path(bad, "corrupt")).write_bytes(b"garbage")
    out = io.StringIO()
    assert admin.main(root, "show", ["all"], out) == 0
    for qid in (d, i, bad):
        assert f"queue id: {qid}" in out.getvalue()
    assert "state: deferred" in out.getvalue() and "corrupt: " in out.getvalue()


def test_flush_of_named_messages_flushes_only_those(spool, clock, root):
    deliver = FakeDeliver(lambda q, e, r: TEMP)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    a, b, c = (queue_message(spool, envelope()) for _ in range(3))
    for qid in (a, b, c):
        mgr.notify(qid)
    clock.advance(0)
    assert sorted(spool.list("deferred")) == sorted([a, b, c])   # next attempts in 300 s
    assert admin.hold(root, [c]) == {c: "held"}
    out = io.StringIO()
    assert admin.main(root, "flush", [a], out) == 0
    assert out.getvalue() == f"{a}: made due now\n"
    assert admin.main(root, "flush", [c, "01NOSUCHMESSAGE00000"], out) == 1
    assert f"{c}: on hold\n01NOSUCHMESSAGE00000: not found\n" in out.getvalue()
    assert "flush" not in spool.requests()
    with capturedLogs() as events:
        clock.advance(1)
        clock.advance(0)
    assert f"test: {a}: flush requested" in messages(events)
    assert deliver.delivered.count(a) == 2
    assert deliver.delivered.count(b) == 1 and deliver.delivered.count(c) == 1


def test_hold_release_delete_by_the_admin_are_logged_by_the_daemon(spool, clock, root):
    deliver = FakeDeliver(lambda q, e, r: TEMP)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    a = queue_message(spool, envelope())
    mgr.notify(a)
    clock.advance(0)                                   # a: deferred
    b = queue_message(spool, envelope())               # b: incoming, not picked up yet
    out = io.StringIO()
    assert admin.main(root, "hold", [a, b], out) == 0
    assert admin.main(root, "release", [a], out) == 0
    assert admin.main(root, "delete", [b], out) == 0
    with capturedLogs() as events:
        clock.advance(1)
    lines = messages(events)
    for line in (f"{a}: put on hold by admin command", f"{b}: put on hold by admin command",
                 f"{a}: released from hold by admin command", f"{b}: removed by admin command"):
        assert f"test: {line}" in lines, lines
    assert spool.requests() == []


def test_what_the_admin_did_while_the_daemon_was_down_is_logged_at_start(spool, clock, root):
    held, deleted = queue_message(spool, envelope()), queue_message(spool, envelope())
    assert admin.hold(root, [held]) == {held: "held"}
    assert admin.delete(root, [deleted]) == {deleted: "deleted"}
    mgr = make_manager(spool, FakeDeliver(), clock)
    with capturedLogs() as events:
        mgr.start()
    assert f"test: {held}: put on hold by admin command" in messages(events)
    assert f"test: {deleted}: removed by admin command" in messages(events)


def test_json_list_and_show(spool, clock, root):
    up = new_queue_id()
    d = deferred_message(spool, clock, rcpts=("bob@example.net", "carol@example.net"),
                         upstream_id=up)
    spool.write_status(d, {"pending": ["bob@example.net", "carol@example.net"], "attempts": 2,
                           "last_reply": {"bob@example.net": str(TEMP)}})
    i = queue_message(spool, envelope(sender=""))
    bad = queue_message(spool, envelope())
    spool.move(bad, "incoming", "corrupt")
    Path(spool.path(bad, "corrupt")).write_bytes(b"garbage")

    out = io.StringIO()
    assert admin.main(root, "list", [], out, as_json=True) == 0
    entries = {e["queue_id"]: e for e in map(json.loads, out.getvalue().splitlines())}
    assert entries[d] == {
        "queue_id": d, "queue_name": "deferred", "arrival_time": int(T0),
        "message_size": len(BODY), "sender": "alice@example.org",
        "recipients": [{"address": "bob@example.net", "delay_reason": str(TEMP)},
                       {"address": "carol@example.net"}],
        "next_attempt": int(clock.seconds() + 3000), "attempts": 2, "upstream_id": up}
    assert entries[i]["sender"] == "" and entries[i]["queue_name"] == "incoming"
    assert entries[i]["next_attempt"] is None and entries[i]["upstream_id"] is None
    assert entries[bad] == {"queue_id": bad, "queue_name": "corrupt",
                            "error": entries[bad]["error"]} and entries[bad]["error"]

    out = io.StringIO()
    assert admin.main(root, "show", [d, bad], out, as_json=True) == 0
    shown, corrupt = map(json.loads, out.getvalue().splitlines())
    assert shown["queue_id"] == d and shown["queue_name"] == "deferred"
    assert shown["message_size"] == len(BODY) and shown["next_attempt"] == clock.seconds() + 3000
    assert shown["envelope"]["upstream_id"] == up
    assert [r["address"] for r in shown["envelope"]["recipients"]] == ["bob@example.net",
                                                                      "carol@example.net"]
    assert shown["status"]["attempts"] == 2
    assert "Subject: test message" in shown["header"] and "Hello Bob" not in shown["header"]
    assert set(corrupt) == {"queue_id", "queue_name", "error"} and corrupt["queue_id"] == bad
