"""The queue manager with a Clock and a scripted delivery function."""
from __future__ import annotations

import email
import os
from pathlib import Path

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from shared.envelope import Recipient
from shared.queue import admin
from shared.queue.manager import QueueSettings
from shared.smtp.reply import Reply
from tests.shared.queue.helpers import (
    BODY, OK, PERM, T0, TEMP, FakeDeliver, envelope, make_manager, messages, queue_message, run_until,
)


def states(spool) -> dict[str, list[str]]:
    return {s: spool.list(s) for s in ("incoming", "active", "deferred", "hold", "corrupt")
            if spool.list(s)}


def bounces(deliver: FakeDeliver):
    """(envelope, parsed message) of every bounce handed to the delivery function."""
    return [(env, email.message_from_bytes(data))
            for batch in deliver.calls for _, env, data in batch if env.sender == ""]


def test_success_removes_file_and_status(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope(upstream_id="EDGE123"))
    with capturedLogs() as events:
        mgr.notify(qid)
        clock.advance(0)
    assert deliver.delivered == [qid]
    _, env, data = deliver.calls[0][0]
    assert data.startswith(b"Received: from client.example.org")
    assert states(spool) == {}
    assert os.listdir(spool.root / "status") == []
    text = "\n".join(messages(events))
    assert (f"test: {qid}: to=<bob@example.net>, relay=next.example[192.0.2.1]:25, delay=0.0, "
            f"upstream=EDGE123, status=sent (250 2.0.0 Ok: queued as NEXT1)") in text


def test_4xx_backoff_sequence(spool, clock):
    deliver = FakeDeliver(lambda qid, env, r: TEMP, clock=clock)
    mgr = make_manager(spool, deliver, clock, request_interval=10**6)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    run_until(clock, clock.seconds() + 12_600)
    gaps = [b - a for a, b in zip(deliver.times, deliver.times[1:])]
    assert gaps == [300, 600, 1200, 2400, 4000, 4000]
    assert spool.list("deferred") == [qid]
    status = spool.read_status(qid)
    assert status["attempts"] == 7
    assert status["pending"] == ["bob@example.net"]
    assert status["last_reply"] == {"bob@example.net": str(TEMP)}
    # the next attempt time is the deferred file's mtime
    assert os.stat(spool.path(qid, "deferred")).st_mtime == deliver.times[-1] + 4000


def test_backoff_is_configurable():
    s = QueueSettings(retry_min=10, retry_max=50)
    assert [s.backoff(n) for n in range(1, 7)] == [10, 20, 40, 50, 50, 50]
    assert QueueSettings().backoff(10_000) == 4000
    with pytest.raises(ValueError):
        QueueSettings(retry_min=0)
    with pytest.raises(ValueError):
        QueueSettings(batch_size=0)


def test_expiry_bounces_with_447(spool, clock):
    def script(qid, env, r):
        return OK if env.sender == "" else TEMP
    deliver = FakeDeliver(script, clock=clock)
    mgr = make_manager(spool, deliver, clock, lifetime=1000, request_interval=10**6)
    mgr.start()
    qid = queue_message(spool, envelope(received_at=clock.seconds()))
    mgr.notify(qid)
    run_until(clock, clock.seconds() + 900)         # attempts at 0, 300, 900: not expired yet
    assert spool.list("deferred") == [qid] and bounces(deliver) == []
    with capturedLogs() as events:
        run_until(clock, clock.seconds() + 1200)    # attempt at 2100 > lifetime: bounce
    assert states(spool) == {}
    [(benv, msg)] = bounces(deliver)
    assert [r.address for r in benv.recipients] == ["alice@example.org"]
    r = msg.get_payload()[1].get_payload()[1]
    assert r["Status"] == "4.4.7"
    assert r["Diagnostic-Code"] == "smtp; 451 4.4.1 Next hop not reachable, try again later"
    assert "status=bounced (delivery time expired; 451 4.4.1" in "\n".join(messages(events))


def test_5xx_bounce_is_queued_and_delivered(spool, clock):
    def script(qid, env, r):
        return OK if env.sender == "" else PERM
    deliver = FakeDeliver(script)
    mgr = make_manager(spool, deliver, clock, bounce_notice_hostname="filter.example.org")
    mgr.start()
    qid = queue_message(spool, envelope(envid="ID1"))
    mgr.notify(qid)
    clock.advance(0)
    clock.advance(0)
    assert states(spool) == {}
    assert len(deliver.delivered) == 2 and deliver.delivered[0] == qid
    [(benv, msg)] = bounces(deliver)
    assert benv.upstream_id == qid
    assert msg.get_content_type() == "multipart/report"
    assert msg["From"].startswith("MAILER-DAEMON@filter.example.org")
    per_message, per_rcpt = msg.get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "ID1"
    assert per_rcpt["Status"] == "5.1.1" and per_rcpt["Action"] == "failed"


def test_failed_null_sender_mail_goes_to_the_postmaster_as_a_double_bounce(spool, clock):
    """A bounce (ours or another MTA's) that cannot be delivered is not dropped: the
    postmaster is told, with the failed message attached."""
    deliver = FakeDeliver(lambda qid, env, r: OK if r.address == "postmaster@example.org" else PERM)
    mgr = make_manager(spool, deliver, clock, double_bounce_recipient="postmaster@example.org")
    mgr.start()
    qid = queue_message(spool, envelope(sender="", rcpts=("gone@example.org",)))
    with capturedLogs() as events:
        mgr.notify(qid)
        clock.advance(0)
        clock.advance(0)
    assert len(deliver.delivered) == 2 and deliver.delivered[0] == qid
    [(benv, msg)] = bounces(deliver)[1:]
    assert benv.notice == "double-bounce"
    assert [r.address for r in benv.recipients] == ["postmaster@example.org"]
    assert b"Subject: test message" in msg.get_payload()[2].as_bytes()
    assert states(spool) == {}
    assert "postmaster notification (double bounce) to <postmaster@example.org>" in "\n".join(messages(events))


def test_a_double_bounce_that_fails_is_kept_on_hold_never_reported_again(spool, clock):
    deliver = FakeDeliver(lambda qid, env, r: PERM)       # the postmaster address is broken too
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope(sender="", rcpts=("gone@example.org",)))
    with capturedLogs() as events:
        mgr.notify(qid)
        for _ in range(4):
            clock.advance(0)
    assert len(deliver.delivered) == 2                   # the message, its double bounce: no third
    [double] = deliver.delivered[1:]
    assert states(spool) == {"hold": [double]}
    status = spool.read_status(double)
    assert status["pending"] == ["postmaster"] and "550 5.1.1" in status["last_reply"]["postmaster"]
    text = "\n".join(messages(events))
    assert f"{double}: undeliverable double bounce to <postmaster> (550 5.1.1 User unknown); put on hold" in text
    # released once the postmaster works again, it is delivered
    deliver.script = lambda qid, env, r: OK
    assert admin.release(spool.root, [double]) == {double: "released"}
    run_until(clock, clock.seconds() + 2)            # the next poll of requests/
    assert deliver.delivered[2:] == [double] and states(spool) == {}


def test_recipients_without_a_route_are_deferred_not_sent(spool, clock):
    """The next hop serves example.net only: a recipient elsewhere must not be offered to
    it (it would refuse, and the bounce would go nowhere); it waits, saying why."""
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock, route=lambda a: a.endswith("@example.net"))
    mgr.start()
    qid = queue_message(spool, envelope(rcpts=("bob@example.net", "eve@elsewhere.example")))
    mgr.notify(qid)
    clock.advance(0)
    [[(_, env, _)]] = deliver.calls
    assert [r.address for r in env.recipients] == ["bob@example.net"]
    assert states(spool) == {"deferred": [qid]}
    status = spool.read_status(qid)
    assert status["pending"] == ["eve@elsewhere.example"]
    assert status["last_reply"]["eve@elsewhere.example"].startswith(
        "451 4.4.4 no route to elsewhere.example")
    # a message none of whose recipients has a route is not handed to the delivery at all
    only = queue_message(spool, envelope(rcpts=("eve@elsewhere.example",)))
    mgr.notify(only)
    clock.advance(0)
    assert len(deliver.calls) == 1 and only in spool.list("deferred")


def test_notify_never_respected(spool, clock):
    deliver = FakeDeliver(lambda qid, env, r: OK if env.sender == "" else PERM)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope(rcpts=(Recipient("never@example.net", ("NEVER",)),)))
    mgr.notify(qid)
    clock.advance(0)
    clock.advance(0)
    assert deliver.delivered == [qid] and states(spool) == {}
    qid2 = queue_message(spool, envelope(rcpts=(Recipient("never@example.net", ("NEVER",)),
                                                Recipient("bob@example.net"))))
    mgr.notify(qid2)
    clock.advance(0)
    clock.advance(0)
    [(_, msg)] = bounces(deliver)
    finals = [b["Final-Recipient"] for b in msg.get_payload()[1].get_payload()[1:]]
    assert finals == ["rfc822; bob@example.net"]


def test_partial_failure(spool, clock):
    replies = {"ok@example.net": OK, "temp@example.net": TEMP, "perm@example.net": PERM}
    deliver = FakeDeliver(lambda qid, env, r: OK if env.sender == "" else replies[r.address],
                          clock=clock)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope(rcpts=("ok@example.net", "temp@example.net",
                                                "perm@example.net", "ok@example.net")))
    mgr.notify(qid)
    clock.advance(0)
    clock.advance(0)
    first = deliver.calls[0][0][1]
    assert [r.address for r in first.recipients] == ["ok@example.net", "temp@example.net",
                                                     "perm@example.net"]      # duplicate once
    assert spool.list("deferred") == [qid]
    assert spool.read_status(qid)["pending"] == ["temp@example.net"]
    [(_, msg)] = bounces(deliver)
    finals = [b["Final-Recipient"] for b in msg.get_payload()[1].get_payload()[1:]]
    assert finals == ["rfc822; perm@example.net"]
    # next attempt: only the pending recipient, and it succeeds now
    replies["temp@example.net"] = OK
    run_until(clock, clock.seconds() + 300)
    retry = [env for batch in deliver.calls for q, env, _ in batch if q == qid][-1]
    assert [r.address for r in retry.recipients] == ["temp@example.net"]
    assert states(spool) == {}
    assert len(bounces(deliver)) == 1


def test_batching_groups_at_most_batch_size(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock, batch_size=100, concurrency=20)
    mgr.start()
    qids = [queue_message(spool, envelope()) for _ in range(250)]
    for qid in qids:
        mgr.notify(qid)
    clock.advance(0)
    assert [len(b) for b in deliver.calls] == [100, 100, 50]
    assert deliver.delivered == qids                     # FIFO
    assert states(spool) == {}


def test_concurrency_limit(spool, clock):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock, batch_size=2, concurrency=3)
    mgr.start()
    qids = [queue_message(spool, envelope()) for _ in range(10)]
    for qid in qids:
        mgr.notify(qid)
    clock.advance(0)
    assert len(deliver.pending) == 3 and len(spool.list("active")) == 6
    deliver.release(0)
    clock.advance(0)
    assert len(deliver.pending) == 3 and len(deliver.calls) == 4
    while deliver.pending:
        assert len(deliver.pending) <= 3
        deliver.release(0)
        clock.advance(0)
    assert sorted(deliver.delivered) == sorted(qids)
    assert states(spool) == {}


def test_fairness_between_new_mail_and_retries(spool, clock):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock, batch_size=4, concurrency=1,
                       scan_interval=10**6, request_interval=10**6)
    mgr.start()
    old = [queue_message(spool, envelope()) for _ in range(4)]
    for qid in old:
        mgr.notify(qid)
    clock.advance(0)
    deliver.release(0, script=lambda q, e, r: TEMP)         # all four deferred for 300 s
    blocker = queue_message(spool, envelope())
    mgr.notify(blocker)
    clock.advance(0)                                         # the only slot is busy
    run_until(clock, clock.seconds() + 300)                  # retries are due...
    new = [queue_message(spool, envelope()) for _ in range(4)]
    for qid in new:
        mgr.notify(qid)                                      # ...and new mail waits too
    assert len(deliver.calls) == 2
    deliver.release(0, script=lambda q, e, r: OK)
    clock.advance(0)
    batch = [q for q, _, _ in deliver.calls[2]]
    assert batch == [new[0], old[0], new[1], old[1]] or batch == [old[0], new[0], old[1], new[1]]


def test_hold_never_scheduled(spool, clock):
    deliver = FakeDeliver()
    qid = queue_message(spool, envelope())
    spool.move(qid, "incoming", "hold")
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    mgr.notify(qid)                                        # even if told about it
    run_until(clock, clock.seconds() + 3600)
    assert deliver.calls == [] and spool.list("hold") == [qid]


def test_vanished_file_is_skipped(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    gone = queue_message(spool, envelope())
    kept = queue_message(spool, envelope())
    mgr.notify(gone)
    mgr.notify(kept)
    spool.remove(gone)                                      # an admin delete, before pick-up
    clock.advance(0)
    assert deliver.delivered == [kept]


def test_corrupt_file_at_pickup_goes_to_corrupt(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    path = Path(spool.path(qid, "incoming"))
    path.write_bytes(path.read_bytes()[:-3])
    with capturedLogs() as events:
        mgr.notify(qid)
        clock.advance(0)
    assert deliver.calls == [] and spool.list("corrupt") == [qid]
    assert f"{qid}: corrupt queue file (no end record" in "\n".join(messages(events))


def test_delivery_function_error_defers(spool, clock):
    calls = []

    def broken(items):
        calls.append(items)
        return fail(RuntimeError("boom"))
    mgr = make_manager(spool, broken, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    with capturedLogs():
        mgr.notify(qid)
        clock.advance(0)
    assert len(calls) == 1 and spool.list("deferred") == [qid]
    assert "4.3.0" in spool.read_status(qid)["last_reply"]["bob@example.net"]


def test_missing_reply_is_transient(spool, clock):
    deliver = FakeDeliver()
    deliver.results = lambda batch: [{} for _ in batch]    # says nothing about the recipient
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    clock.advance(0)
    assert spool.list("deferred") == [qid]


def test_periodic_scan_finds_unnotified_mail(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock, scan_interval=60, request_interval=10**6)
    mgr.start()
    qid = queue_message(spool, envelope())                  # nobody calls notify()
    clock.advance(59)
    assert deliver.calls == []
    clock.advance(1)
    clock.advance(0)
    assert deliver.delivered == [qid]


def test_start_schedules_existing_queue(spool, clock):
    deliver = FakeDeliver(clock=clock)
    due = queue_message(spool, envelope())
    spool.move(due, "incoming", "deferred")
    spool.set_next_attempt(due, "deferred", clock.seconds() - 5)
    later = queue_message(spool, envelope())
    spool.move(later, "incoming", "deferred")
    spool.set_next_attempt(later, "deferred", clock.seconds() + 1234)
    new = queue_message(spool, envelope())
    mgr = make_manager(spool, deliver, clock, request_interval=10**6)
    mgr.start()
    clock.advance(0)
    assert sorted(deliver.delivered) == sorted([due, new])
    run_until(clock, clock.seconds() + 1233)
    assert later not in deliver.delivered
    run_until(clock, clock.seconds() + 1)
    assert deliver.delivered[-1] == later and deliver.times[-1] == T0 + 1234


def test_stop_waits_for_inflight_and_leaves_files(spool, clock):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    clock.advance(0)
    stopped = []
    mgr.stop().addCallback(stopped.append)
    assert stopped == []
    later = queue_message(spool, envelope())
    mgr.notify(later)
    clock.advance(0)
    assert len(deliver.calls) == 1                           # no new work after stop()
    deliver.release(0, script=lambda q, e, r: TEMP)
    assert stopped == [None]
    assert spool.list("deferred") == [qid] and spool.list("incoming") == [later]
    assert clock.getDelayedCalls() == []


def test_stop_timeout(spool, clock):
    deliver = FakeDeliver(hold=True)
    mgr = make_manager(spool, deliver, clock, stop_timeout=5)
    mgr.start()
    qid = queue_message(spool, envelope())
    mgr.notify(qid)
    clock.advance(0)
    stopped = []
    with capturedLogs():
        mgr.stop().addCallback(stopped.append)
        clock.advance(5)
    assert stopped == [None] and spool.list("active") == [qid]


def test_bounce_commit_failure_is_retried(spool, clock):
    deliver = FakeDeliver(lambda qid, env, r: OK if env.sender == "" else PERM, clock=clock)
    mgr = make_manager(spool, deliver, clock, request_interval=10**6)
    mgr.start()
    qid = queue_message(spool, envelope())
    real_new_message = spool.new_message

    def disk_full(qid=None):
        raise OSError(28, "No space left on device")
    spool.new_message = disk_full
    with capturedLogs():
        mgr.notify(qid)
        clock.advance(0)
    assert spool.list("deferred") == [qid]
    status = spool.read_status(qid)
    assert status["pending"] == [] and list(status["failed"]) == ["bob@example.net"]
    spool.new_message = real_new_message
    run_until(clock, clock.seconds() + 300)
    assert states(spool) == {}
    assert deliver.delivered.count(qid) == 1                 # not delivered again, only bounced
    assert len(bounces(deliver)) == 1


def test_crash_and_restart_delivers_everything(root, clock):
    """Drop a running manager without stop(); a new Spool+Manager delivers all."""
    from shared.queue.store import Spool
    from tests.shared.queue.helpers import sync_runner
    spool1 = Spool(root, reactor=clock, fsync=False, runner=sync_runner)
    spool1.start()
    first = FakeDeliver(hold=True)
    mgr1 = make_manager(spool1, first, clock, batch_size=3, concurrency=2)
    mgr1.start()
    acked = [queue_message(spool1, envelope()) for _ in range(10)]
    for qid in acked:
        mgr1.notify(qid)
    clock.advance(0)
    deferred = acked[0]
    first.release(0, script=lambda q, e, r: TEMP)            # one batch deferred
    half = spool1.new_message()                               # never acknowledged
    half.write(b"Subject: half\r\n")
    assert len(spool1.list("active")) == 3
    # "kill": no stop(), no cleanup; the process is gone, with its lock and its
    # timers (so the new incarnation gets a clock of its own)
    os.close(spool1.lock_fd)
    del mgr1, spool1
    clock = Clock()
    clock.advance(T0)

    spool2 = Spool(root, reactor=clock, fsync=False, runner=sync_runner)
    spool2.start()
    second = FakeDeliver()
    mgr2 = make_manager(spool2, second, clock, request_interval=10**6)
    with capturedLogs():
        report = mgr2.start()
    assert report.removed_tmp == [half.qid] and len(report.requeued) == 3
    clock.advance(0)
    run_until(clock, clock.seconds() + 300)
    assert sorted(second.delivered) == sorted(acked)
    assert second.delivered.count(deferred) == 1
    assert states(spool2) == {}
    spool2.stop()


def test_log_lines_for_deferred_and_bounced(spool, clock):
    replies = {"t@example.net": Reply(421, "4.7.0", "Try later"), "p@example.net": PERM}
    deliver = FakeDeliver(lambda q, e, r: OK if e.sender == "" else replies[r.address])
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope(rcpts=("t@example.net", "p@example.net")))
    with capturedLogs() as events:
        mgr.notify(qid)
        clock.advance(0)
    text = "\n".join(messages(events))
    assert f"{qid}: to=<t@example.net>, relay=next.example[192.0.2.1]:25" in text
    assert "status=deferred (421 4.7.0 Try later)" in text
    assert "to=<p@example.net>" in text and "status=bounced (550 5.1.1 User unknown)" in text
    assert f"{qid}: sender non-delivery notification:" in text


def test_notify_with_what_was_committed_skips_rereading_the_file(spool, clock):
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    written = envelope(upstream_id="EDGE1")
    qid = queue_message(spool, written)
    # What the committing session hands over is used as is: the file is not parsed again.
    committed = envelope(rcpts=("carol@example.net",), upstream_id="EDGE1")
    mgr.notify(qid, (committed, len(BODY)))
    clock.advance(0)
    assert deliver.delivered == [qid]
    _, env, data = deliver.calls[0][0]
    assert [r.address for r in env.recipients] == ["carol@example.net"]
    assert data == BODY
    assert states(spool) == {}


def test_fresh_message_is_delivered_from_memory_within_the_cap(spool, clock, monkeypatch):
    import shared.queue.manager as manager
    deliver = FakeDeliver()
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    monkeypatch.setattr(manager, "FRESH_BYTES", len(BODY) + 10)
    a = queue_message(spool, envelope())
    b = queue_message(spool, envelope())
    # the bodies handed over differ from the files: that shows which one is sent
    mgr.notify(a, (envelope(), len(BODY)), BODY.replace(b"Hello", b"HELLO"))
    mgr.notify(b, (envelope(), len(BODY)), BODY.replace(b"Hello", b"HOLA!"))   # over the cap
    assert mgr.fresh_bytes == len(BODY)
    clock.advance(0)
    sent = {qid: data for batch in deliver.calls for qid, _, data in batch}
    assert b"HELLO Bob" in sent[a] and sent[b] == BODY
    assert mgr.fresh_bytes == 0 and states(spool) == {}


def _flip_message_byte(spool, qid: str, state: str = "incoming") -> None:
    path = spool.path(qid, state)
    with open(path, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0x20]))


def test_a_message_damaged_on_disk_is_set_apart_when_read_for_delivery(spool, clock):
    deliver = FakeDeliver()                       # reads the body from the file: the check fires
    mgr = make_manager(spool, deliver, clock)
    mgr.start()
    qid = queue_message(spool, envelope())
    _flip_message_byte(spool, qid)
    with capturedLogs() as events:
        mgr.notify(qid)                           # no committed copy in memory: read from disk
        clock.advance(0)
    assert states(spool) == {"corrupt": [qid]}
    assert (f"test: {qid}: corrupt queue file (message checksum mismatch); moved to corrupt/, "
            "not delivered") in "\n".join(messages(events))


def test_a_message_found_damaged_while_its_bounce_is_made_is_set_apart(spool, clock):
    def refuse_unread(items):                    # the next hop refuses before DATA: body unread
        return succeed([{r.address: PERM for r in env.recipients} for _, env, _, _ in items])
    mgr = make_manager(spool, refuse_unread, clock)
    mgr.start()
    qid = queue_message(spool, envelope(ret="FULL"))     # the bounce returns the whole message
    _flip_message_byte(spool, qid)
    mgr.notify(qid)
    clock.advance(0)
    clock.advance(0)
    assert states(spool) == {"corrupt": [qid]}
