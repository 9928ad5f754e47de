"""Admin operations, alone and while a queue manager runs on the same spool."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from shared.envelope import Recipient
from shared.queue import admin
from tests.shared.queue.helpers import (
    OK, TEMP, FakeDeliver, envelope, make_manager, queue_message, run_until,
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
    with capturedLogs():
        deliver.release(0, script=lambda q, e, r: TEMP if r.address == "bob@example.net"
                        else OK)
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
