"""Spool: queue file format, commit durability, group commit, recovery."""
from __future__ import annotations

import itertools
import json
import os
import stat
import struct
import zlib

import pytest
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from shared.envelope import Envelope, Recipient
from shared.queue.store import (
    CHECK_CHUNK, MAGIC, WRITE_BEHIND, QID_RE, TRAILER_SIZE, CorruptBody, CorruptFile, QueuedMessage, Spool,
    SpoolFiles, SpoolLocked, encode_envelope, make_trailer, read_queue_file,
)
from tests.shared.queue.helpers import BODY, StepRunner, envelope, messages, queue_message


def test_layout_created_private(spool, root):
    for name in ("tmp", "incoming", "active", "deferred", "hold", "corrupt", "status", "requests"):
        st = os.stat(root / name)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700


def test_commit_writes_body_envelope_trailer(spool, root, clock):
    env = envelope(rcpts=("b@example.net", "c@example.net"), envid="E1", upstream_id="UP1")
    qid = queue_message(spool, env)
    assert QID_RE.match(qid)
    assert os.listdir(root / "tmp") == []
    raw = (root / "incoming" / qid).read_bytes()
    assert raw.startswith(BODY)
    magic, body_len, env_len, env_crc, body_crc = struct.unpack(">8sQQII", raw[-TRAILER_SIZE:])
    assert magic == b"SMQ2END\n" == MAGIC and body_len == len(BODY)
    assert body_crc == zlib.crc32(BODY) and env_crc == zlib.crc32(raw[body_len:body_len + env_len])
    assert len(raw) == body_len + env_len + TRAILER_SIZE
    stored = json.loads(raw[body_len:body_len + env_len])
    assert stored["envid"] == "E1" and stored["upstream_id"] == "UP1"
    assert stored["received_at"] == clock.seconds()      # filled in at commit
    msg = spool.open(qid, "incoming")
    assert [r.address for r in msg.envelope.recipients] == ["b@example.net", "c@example.net"]
    with msg.open_body() as f:
        assert f.read(msg.body_len) == BODY
    assert msg.read_prefix(10) == BODY[:10]
    assert msg.read_prefix(10**6) == BODY            # never reads past the message
    assert stat.S_IMODE(os.stat(root / "incoming" / qid).st_mode) == 0o600


def test_qid_from_caller_and_unique(spool):
    m = spool.new_message(qid="01ABCDEFGHJKMNPQRSTV")
    assert m.qid == "01ABCDEFGHJKMNPQRSTV"
    with pytest.raises(FileExistsError):
        spool.new_message(qid="01ABCDEFGHJKMNPQRSTV")
    with pytest.raises(ValueError):
        spool.new_message(qid="../../etc/passwd")
    ids = {spool.new_message().qid for _ in range(200)}
    assert len(ids) == 200


def test_abort_is_idempotent_and_removes_tmp(spool, root):
    m = spool.new_message()
    m.write(b"partial")
    m.abort()
    m.abort()
    assert os.listdir(root / "tmp") == []
    with pytest.raises(ValueError):
        m.write(b"more")
    failures = []
    m.commit(envelope()).addErrback(failures.append)
    assert failures and failures[0].check(ValueError)


def test_commit_fires_only_after_file_and_directory_fsync(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, runner=runner)     # fsync on
    m = spool.new_message()
    m.write(BODY)
    done = []
    m.commit(envelope()).addBoth(done.append)
    assert done == [] and len(runner.jobs) == 1            # file write + fsync + rename
    runner.run_one()
    assert (root / "incoming" / m.qid).exists()
    assert done == [] and spool.dir_syncs == 0             # renamed, directory not yet synced
    runner.run_one()                                       # the directory fsync
    assert spool.dir_syncs == 1 and done == [None]


def test_group_commit_shares_directory_fsyncs(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, runner=runner)
    n = 10
    msgs = [spool.new_message() for _ in range(n)]
    fired = []
    for i, m in enumerate(msgs):
        m.write(BODY)
        m.commit(envelope()).addCallback(lambda _, i=i: fired.append(i))
    # The first file finishes and starts a directory fsync round at once...
    runner.run_one()
    assert runner.jobs[-1][0] == spool.group_sync.sync
    # ...the other nine finish while that round is running: they wait for the next one.
    for _ in range(n - 1):
        runner.run_one()
    assert fired == []
    runner.run_one()                         # round 1: serves the first commit only
    assert fired == [0]
    assert len(runner.jobs) == 1             # round 2 started for the nine waiters
    runner.run_one()
    assert sorted(fired) == list(range(n))
    assert spool.dir_syncs == 2 < n
    assert sorted(spool.list("incoming")) == sorted(m.qid for m in msgs)


def test_directory_fsync_failure_errbacks_and_removes(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, runner=runner)

    def broken_fsync(path):
        raise OSError(5, "Input/output error")
    spool.group_sync.fsync_dir = broken_fsync
    m = spool.new_message()
    m.write(BODY)
    failures = []
    m.commit(envelope()).addErrback(failures.append)
    with capturedLogs():
        runner.run_all()
    assert failures and failures[0].check(OSError)
    assert spool.list("incoming") == [] and os.listdir(root / "tmp") == []


def test_commit_with_real_threadpool_and_reactor(tmp_path):
    """A fresh (not installed) reactor and the spool's own bounded thread pool."""
    from twisted.internet.selectreactor import SelectReactor
    reactor = SelectReactor()
    spool = Spool(tmp_path / "spool", reactor=reactor, threadpool_size=3)
    spool.start()
    results = []

    def go():
        ds = []
        for i in range(12):
            m = spool.new_message()
            m.write(BODY * (i + 1))
            ds.append(m.commit(envelope()))
        gatherResults(ds).addBoth(results.append).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.callLater(20, reactor.stop)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        spool.stop()
    assert results and results[0] == [None] * 12
    assert len(spool.list("incoming")) == 12
    assert 1 <= spool.dir_syncs <= 12
    assert spool.threadpool.max == 3


def test_spool_lock_excludes_second_daemon(root, clock):
    a = Spool(root, reactor=clock, fsync=False, runner=lambda f, *a: None)
    b = Spool(root, reactor=clock, fsync=False, runner=lambda f, *a: None)
    a.start()
    try:
        with pytest.raises(SpoolLocked):
            b.start()
        assert (root / "pid").read_text().strip() == str(os.getpid())
    finally:
        a.stop()
    b.start()
    b.stop()


def test_move_is_the_state_change(spool, root):
    qid = queue_message(spool, envelope())
    assert spool.move(qid, "incoming", "hold")
    assert spool.list("hold") == [qid] and spool.list("incoming") == []
    assert spool.move(qid, "incoming", "active") is False       # someone moved it already
    assert spool.locate(qid) == "hold"
    with pytest.raises(ValueError):
        spool.move("../x", "hold", "incoming")


def test_status_atomic_roundtrip(spool, root):
    qid = queue_message(spool, envelope())
    assert spool.read_status(qid) is None
    spool.write_status(qid, {"pending": ["b@example.net"], "attempts": 1})
    assert spool.read_status(qid) == {"pending": ["b@example.net"], "attempts": 1}
    assert sorted(os.listdir(root / "status")) == [qid]          # no tmp left behind
    assert spool.remove(qid)
    assert spool.read_status(qid) is None and spool.locate(qid) is None


# -- corrupt files --------------------------------------------------------------

def _corruptions(raw: bytes, body_len: int):
    yield "truncated", raw[:-5], "no end record"
    yield "tiny", raw[:10], "truncated"
    yield "appended", raw + b"x", "no end record"
    flipped = bytearray(raw)
    flipped[body_len + 3] ^= 0x20                       # inside the envelope JSON
    yield "flipped", bytes(flipped), "checksum"
    bad_len = raw[:-TRAILER_SIZE] + struct.pack(">8sQQII", MAGIC, body_len + 1,
                                                len(raw) - TRAILER_SIZE - body_len, 0, 0)
    yield "lengths", bad_len, "length mismatch"


@pytest.mark.parametrize("case", ["truncated", "tiny", "appended", "flipped", "lengths"])
def test_read_queue_file_rejects_damage(spool, root, case):
    qid = queue_message(spool, envelope())
    path = root / "incoming" / qid
    raw = path.read_bytes()
    damaged = {name: (data, reason) for name, data, reason in _corruptions(raw, len(BODY))}
    data, reason = damaged[case]
    path.write_bytes(data)
    with pytest.raises(CorruptFile) as e:
        read_queue_file(path)
    assert reason in e.value.reason


def test_bad_envelope_json_is_corrupt(spool, root):
    env_json = b'{"sender": "a@example.org"}'               # no recipients
    path = root / "incoming" / "01AAAAAAAAAAAAAAAAAA"
    path.write_bytes(BODY + env_json + make_trailer(len(BODY), zlib.crc32(BODY), env_json))
    with pytest.raises(CorruptFile) as e:
        read_queue_file(path)
    assert "bad envelope" in e.value.reason


# -- message checksum -------------------------------------------------------------

MISMATCH = "message checksum mismatch"


def _flip(path, offset: int) -> None:
    """Flip one bit of the byte at ``offset`` in place, as a disk error would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x04]))


def _commit(msg, env) -> None:
    results = []
    msg.commit(env).addBoth(results.append)
    assert results == [None], results


@pytest.mark.parametrize("sizes", [(1,), (7, 4096), (WRITE_BEHIND - 1, 5, WRITE_BEHIND + 3),
                                   (3 * WRITE_BEHIND,)])
def test_message_crc_from_the_chunks_as_they_arrive_is_that_of_the_whole(spool, root, sizes):
    body = bytes(range(256)) * (2 * WRITE_BEHIND // 256 + 7)     # written through on the way
    msg = spool.new_message()
    offset, chunk_sizes = 0, itertools.cycle(sizes)
    while offset < len(body):
        n = next(chunk_sizes)
        msg.write(body[offset:offset + n])
        offset += n
    _commit(msg, envelope())
    path = root / "incoming" / msg.qid
    magic, body_len, _, _, body_crc = struct.unpack(">8sQQII", path.read_bytes()[-TRAILER_SIZE:])
    assert (magic, body_len, body_crc) == (MAGIC, len(body), zlib.crc32(body))
    read_queue_file(path, check_message=True)


def test_flipped_message_byte_is_found_by_recovery_and_moved_to_corrupt(spool, root):
    big = b"".join(b"line %d\r\n" % i for i in range(CHECK_CHUNK // 8))      # checked in 2 chunks
    assert len(big) > CHECK_CHUNK
    good = queue_message(spool, envelope(), big)
    spool.move(good, "incoming", "deferred")
    damaged = {}
    for state, body, offset in (("incoming", BODY, 0), ("deferred", big, len(big) - 3),
                                ("hold", BODY, len(BODY) // 2)):
        qid = queue_message(spool, envelope(), body)
        if state != "incoming":
            spool.move(qid, "incoming", state)
        path = root / state / qid
        _flip(path, offset)
        read_queue_file(path)                      # pick-up reads only the trailer and envelope
        with pytest.raises(CorruptFile, match=MISMATCH):
            read_queue_file(path, check_message=True)
        damaged[qid] = state

    with capturedLogs() as events:
        report = spool.recover()
    text = "\n".join(messages(events))

    assert sorted(report.corrupt) == sorted((qid, state, MISMATCH) for qid, state in damaged.items())
    assert sorted(os.listdir(root / "corrupt")) == sorted(damaged)
    for qid, state in damaged.items():
        assert f"{state}/{qid}: corrupt queue file ({MISMATCH}); moved to corrupt/" in text
    assert spool.list("deferred") == [good]
    assert report.counts == {"incoming": 0, "deferred": 1, "hold": 0, "quarantine": 0}


def test_smq1_file_from_before_the_upgrade_is_recovered_listed_and_delivered(spool, root):
    from shared.queue import admin
    env_json = encode_envelope(envelope(sender="old@example.org"))
    qid = "01OLDFORMAT000000000"
    (root / "deferred" / qid).write_bytes(
        BODY + env_json + struct.pack(">8sQQI", b"SMQ1END\n", len(BODY), len(env_json),
                                      zlib.crc32(env_json)))
    new = queue_message(spool, envelope())
    report = spool.recover()
    assert report.corrupt == [] and report.counts == {"incoming": 1, "deferred": 1, "hold": 0, "quarantine": 0}
    listed = {e["qid"]: e for e in admin.list_queue(root)}
    assert listed[qid]["sender"] == "old@example.org" and listed[qid]["size"] == len(BODY)
    assert listed[new]["error"] is None
    assert "Subject: test message" in admin.show(root, qid)
    msg = spool.open(qid, "deferred")
    assert msg.body_len == len(BODY)
    with msg.open_body() as f:
        assert f.read(len(BODY) + 100) == BODY            # the message, not the envelope after it
    assert msg.damaged is None
    assert msg.read_prefix(10**6) == BODY


def test_reading_a_queue_file_checks_the_message_as_it_goes(spool, root):
    intact = spool.open(queue_message(spool, envelope()), "incoming")
    with intact.open_body() as f:
        chunks = [f.read(10) for _ in range(-(-len(BODY) // 10))]
        assert f.read(10) == b""
    assert b"".join(chunks) == BODY and intact.damaged is None

    qid = queue_message(spool, envelope())
    _flip(root / "incoming" / qid, 5)
    msg = spool.open(qid, "incoming")
    with msg.open_body() as f:
        head = f.read(len(BODY) - 1)
        assert len(head) == len(BODY) - 1 and msg.damaged is None      # not known before the end
        with pytest.raises(CorruptBody) as e:
            f.read(10)                                                 # the last byte
    assert isinstance(e.value, OSError) and e.value.strerror == MISMATCH
    assert msg.damaged == MISMATCH
    with pytest.raises(CorruptBody):
        msg.read_prefix(10**6)            # the whole message, as a bounce returns it


def test_open_body_of_a_file_damaged_since_pick_up(spool, root):
    qid = queue_message(spool, envelope())
    msg = spool.open(qid, "incoming")
    path = root / "incoming" / qid
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptBody, match="no end record"):
        msg.open_body()
    assert msg.damaged.startswith("no end record")


def test_message_held_in_memory_is_not_read_from_the_file(spool, root):
    qid = queue_message(spool, envelope())
    _flip(root / "incoming" / qid, 5)
    msg = QueuedMessage(qid, "incoming", envelope(), len(BODY), spool.path(qid, "incoming"), BODY)
    with msg.open_body() as f:
        assert f.read(len(BODY)) == BODY
    assert msg.damaged is None


# -- recovery ---------------------------------------------------------------------

def test_recover(spool, root):
    good_incoming = queue_message(spool, envelope())
    good_deferred = queue_message(spool, envelope())
    spool.move(good_deferred, "incoming", "deferred")
    interrupted = queue_message(spool, envelope())
    spool.move(interrupted, "incoming", "active")
    truncated = queue_message(spool, envelope())
    spool.move(truncated, "incoming", "deferred")
    path = root / "deferred" / truncated
    path.write_bytes(path.read_bytes()[:-7])
    held_bad = queue_message(spool, envelope())
    spool.move(held_bad, "incoming", "hold")
    (root / "hold" / held_bad).write_bytes(b"")
    (root / "incoming" / "junk.swp").write_bytes(b"x")
    unacked = spool.new_message()
    unacked.write(b"half a message, " + b"x" * WRITE_BEHIND)    # large enough to be on disk already
    os.close(unacked.fd)
    unacked.fd = None
    spool.open_tmp.discard(unacked.qid)                      # as after a restart
    receiving = spool.new_message()                           # this process, still receiving
    receiving.write(b"in progress")
    spool.write_status(good_deferred, {"pending": ["bob@example.net"], "attempts": 1})
    spool.write_status("01ZZZZZZZZZZZZZZZZZZ", {"pending": [], "attempts": 3})   # orphan
    (root / "status" / (good_incoming + ".tmp")).write_bytes(b"{")                # leftover

    with capturedLogs() as events:
        report = spool.recover()
    text = "\n".join(messages(events))

    assert report.removed_tmp == [unacked.qid]
    assert os.listdir(root / "tmp") == [receiving.qid]
    assert report.requeued == [interrupted]
    assert sorted(spool.list("incoming")) == sorted([good_incoming, interrupted])
    assert spool.list("deferred") == [good_deferred]
    assert spool.list("active") == []
    corrupt = {name: (state, reason) for name, state, reason in report.corrupt}
    assert corrupt[truncated][0] == "deferred" and "no end record" in corrupt[truncated][1]
    assert corrupt[held_bad][0] == "hold" and "truncated" in corrupt[held_bad][1]
    assert corrupt["junk.swp"] == ("incoming", "unexpected file name")
    assert sorted(os.listdir(root / "corrupt")) == sorted([truncated, held_bad, "junk.swp"])
    assert f"deferred/{truncated}: corrupt queue file (no end record" in text
    assert f"hold/{held_bad}: corrupt queue file" in text
    assert f"tmp/{unacked.qid}: removed" in text
    assert sorted(os.listdir(root / "status")) == [good_deferred]
    assert report.counts == {"incoming": 2, "deferred": 1, "hold": 0, "quarantine": 0}


def test_admin_view_refuses_non_spool(tmp_path):
    with pytest.raises(FileNotFoundError):
        SpoolFiles(tmp_path / "nothing")


def test_envelope_json_keeps_every_client_field():
    from dataclasses import fields
    from shared.envelope import ClientInfo, Envelope
    client = ClientInfo(**{f.name: f"v-{f.name}" if f.name != "port" else 25 for f in fields(ClientInfo)})
    env = Envelope(sender="a@b", recipients=[], client=client)
    assert Envelope.from_json(env.to_json()).client == client


def test_small_messages_reach_the_file_at_commit_large_ones_as_they_stream(tmp_path):
    spool = Spool(tmp_path / "q", reactor=Clock(), fsync=False, runner=lambda f, *a: maybeDeferred(f, *a))
    small = spool.new_message()
    small.write(b"Subject: s\r\n\r\n")
    small.write(b"hi\r\n")
    assert os.path.getsize(small.tmp_path) == 0                 # held in memory until commit
    big = spool.new_message()
    big.write(b"x" * (WRITE_BEHIND + 1))
    assert os.path.getsize(big.tmp_path) == WRITE_BEHIND + 1     # past the threshold: on disk
    env = Envelope("a@example.org", [Recipient("b@example.net")])
    for m, body in ((small, b"Subject: s\r\n\r\nhi\r\n"), (big, b"x" * (WRITE_BEHIND + 1))):
        m.commit(env)
        stored = spool.open(m.qid, "incoming")
        assert stored.body_len == len(body)
        with stored.open_body() as f:
            assert f.read(stored.body_len) == body


def test_batcher_rounds_results_and_per_item_errors(root, clock):
    from shared.queue.store import Batcher
    runner = StepRunner()
    seen: list[list] = []

    def work(items):
        seen.append(list(items))
        return [ValueError(i) if i == "bad" else i * 2 for i in items]
    b = Batcher(runner, work)
    got: list = []
    b.request(1).addCallback(got.append)
    b.request(2).addCallback(got.append)           # waits: round 1 already runs
    b.request("bad").addErrback(lambda f: got.append(f.type))
    runner.run_one()
    assert seen == [[1]] and got == [2]
    assert len(runner.jobs) == 1                   # round 2 took both waiters
    runner.run_one()
    assert seen[1] == [2, "bad"] and got == [2, 4, ValueError] and b.rounds == 2

    def broken(items):
        raise OSError(5, "Input/output error")
    b2 = Batcher(runner, broken)
    failed: list = []
    b2.request("x").addErrback(lambda f: failed.append(f.type))
    runner.run_one()
    assert failed == [OSError]


def test_removals_share_a_pool_job(root, clock):
    runner = StepRunner()
    spool = Spool(root, reactor=clock, fsync=False, runner=runner)
    qids = []
    for _ in range(4):
        m = spool.new_message()
        m.write(BODY)
        m.commit(envelope())
        runner.run_all()
        qids.append(m.qid)
    spool.write_status(qids[1], {"attempts": 1})
    removed: list = []
    for i, qid in enumerate(qids):
        spool.remove_async(qid, "incoming", status=(i == 1)).addCallback(removed.append)
    assert len(runner.jobs) == 1                   # the first alone...
    runner.run_one()
    assert len(runner.jobs) == 1                   # ...the other three in one job
    runner.run_one()
    assert removed == [True] * 4 and spool.remover.rounds == 2
    assert spool.list("incoming") == [] and os.listdir(root / "status") == []
    spool.remove_async(qids[0], "incoming").addCallback(removed.append)
    runner.run_one()
    assert removed[-1] is False                    # already gone: no error


def test_commit_keeps_a_small_body_for_delivery_from_memory(spool, clock):
    small = spool.new_message()
    small.write(BODY)
    small.commit(envelope())
    assert small.body == BODY
    big = spool.new_message()
    big.write(b"x" * WRITE_BEHIND)                 # written through: not held
    big.write(b"tail")
    big.commit(envelope())
    assert big.body is None
