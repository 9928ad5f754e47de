"""Queue delivery: QueueDelivery against scripted SMTP servers connected through
twisted.test.iosim -- batches, the connection cache, queue files that cannot be read
or are damaged, the next hop's limits, header edits, and reading off the reactor thread."""
from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from shared.blocking import BlockingPool
from shared.envelope import ClientInfo
from shared.message import HeaderEdits
from shared.queue.delivery import BODY_CHUNK
from shared.queue.store import Spool
from shared.smtp.reply import Reply
from shared.transport.pool import NextHopUnavailable
from tests.shared.transport.fakes import (World, envelope, message,  # noqa: F401
                                          no_unhandled_deferred_errors)


def test_no_hop_reachable_gives_451_for_every_recipient():
    world = World({("a", 25): "refused", ("b", 25): "hang",
                   ("c", 25): {"greeting": b"554 5.3.2 go away"}})
    events: list[dict] = []
    delivery = world.delivery(log=Logger(observer=events.append))
    results = world.run(delivery.deliver_batch([message("Q1", "x@example.org", "y@example.org")]))
    reply = results[0]["x@example.org"]
    assert results == [{"x@example.org": reply, "y@example.org": reply}]
    assert reply.code == 451 and reply.enhanced == "4.4.1"
    assert "connect to a:25: Connection refused" in reply.text
    assert "connect to b:25: connection timed out" in reply.text
    assert "c[c]:25 refused to talk to me: 554 5.3.2 go away" in reply.text
    with pytest.raises(NextHopUnavailable):
        world.run(delivery.relay_client.open_session())
    assert [e["status"] for e in events] == ["deferred"]


def test_batch_over_one_connection_with_xforward_and_streamed_body():
    big = b"".join(b".line %d\r\n" % i for i in range(3 * BODY_CHUNK // 10))
    assert len(big) > 3 * BODY_CHUNK
    world = World({("mx", 25): {"reject": ("bad@example.org",)}})
    events: list[dict] = []
    delivery = world.delivery(log=Logger(observer=events.append))
    info = ClientInfo(addr="192.0.2.7", port=1234, helo="client.example", proto="ESMTP")
    batch = [message("Q1", "x@example.org", "bad@example.org", client=info),
             message("Q2", "y@example.org", data=big),
             message("Q3", "bad@example.org")]
    results = world.run(delivery.deliver_batch(batch))
    assert len(world.servers) == 1
    server = world.servers[0]
    assert [r.text for r in results[0].values()] == ["Ok: queued as Q1", "User unknown"]
    assert results[1]["y@example.org"].text == "Ok: queued as Q2"
    assert results[2] == {"bad@example.org": Reply(550, "5.1.1", "User unknown")}
    assert len(server.messages) == 2
    assert server.messages[0]["xforward"] == [
        b"XFORWARD IDENT=Q1 ADDR=192.0.2.7 PORT=1234 PROTO=ESMTP HELO=client.example"]
    assert server.messages[1]["data"] == big
    assert server.commands[-1] == b"RSET"        # kept in the connection cache, not closed
    # One log line per message, followable across tiers.
    assert [(e["qid"], e["status"]) for e in events] == [("Q1", "partial"), ("Q2", "sent"),
                                                          ("Q3", "bounced")]
    assert events[1]["relay"] == "mx[mx]:25" and "queued as Q2" in events[1]["detail"]
    assert events[0]["recipients"] == ["x@example.org", "bad@example.org"]


def test_max_messages_per_connection():
    world = World({("mx", 25): {}})
    delivery = world.delivery(max_messages_per_connection=2)
    results = world.run(delivery.deliver_batch([message(f"Q{i}", "x@example.org") for i in range(5)]))
    assert all(r["x@example.org"].code == 250 for r in results)
    assert [len(s.messages) for s in world.servers] == [2, 2, 1]
    # the last connection has room for one more: the next batch reuses it, then it is full
    world.run(delivery.deliver_batch([message(f"Q{i}", "x@example.org") for i in range(5, 7)]))
    assert [len(s.messages) for s in world.servers] == [2, 2, 2, 1]
    assert world.servers[2].commands[-1] == b"QUIT"


def test_connection_cache_expires():
    world = World({("mx", 25): {}})
    delivery = world.delivery(connection_cache_time=2.0)
    world.run(delivery.deliver_batch([message("Q1", "x@example.org")]))
    world.run(delivery.deliver_batch([message("Q2", "x@example.org")]))
    assert len(world.servers) == 1 and len(world.servers[0].messages) == 2
    assert world.servers[0].commands[-1] != b"QUIT"
    world.clock.advance(2.5)
    for p in world.pumps:
        p.flush()
    assert world.servers[0].commands[-1] == b"QUIT"
    world.run(delivery.deliver_batch([message("Q3", "x@example.org")]))
    assert len(world.servers) == 2             # expired: a new connection


def test_connection_lost_mid_batch_defers_the_rest():
    world = World({("mx", 25): {"drop_on_mail": 2}})
    delivery = world.delivery()
    results = world.run(delivery.deliver_batch([message("Q1", "x@example.org"),
                                                message("Q2", "y@example.org", "z@example.org"),
                                                message("Q3", "w@example.org")]))
    assert results[0]["x@example.org"].code == 250
    for result in results[1:]:
        for reply in result.values():
            assert reply.code == 451 and reply.enhanced == "4.4.2"
            assert "lost connection with mx[mx]:25" in reply.text
    assert "while sending MAIL FROM" in results[1]["y@example.org"].text


def test_truncated_queue_file_never_ends_the_message():
    world = World({("mx", 25): {}})
    delivery = world.delivery()
    qid, env, _open, _n = message("Q1", "x@example.org")
    results = world.run(delivery.deliver_batch([(qid, env, lambda: io.BytesIO(b"short"), 1000)]))
    reply = results[0]["x@example.org"]
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert world.servers[0].messages == []


def queue_file(tmp_path: Any, data: bytes, env: Any, flip: int | None = None) -> Any:
    """``data`` committed to a spool with ``env``, as the queue manager picks it up;
    ``flip``: the offset of a byte damaged (one bit flipped) on disk after the commit."""
    spool = Spool(tmp_path / "spool", reactor=Clock(), fsync=False,
                  runner=lambda f, *a: succeed(f(*a)))
    incoming = spool.new_message()
    incoming.write(data)
    incoming.commit(env)
    if flip is not None:
        with open(spool.path(incoming.qid, "incoming"), "r+b") as f:
            f.seek(flip)
            f.write(bytes([data[flip] ^ 0x01]))
    return spool.open(incoming.qid, "incoming")


def item(queued: Any) -> tuple[str, Any, Any, int]:
    return queued.qid, queued.envelope, queued.open_body, queued.body_len


def deliver_damaged(queued) -> Any:
    """Deliver a queue file damaged on disk: 451 4.3.0 naming the checksum, the message
    marked damaged, and the next hop never given the final dot; the server, for more."""
    world = World({("mx", 25): {}})
    results = world.run(world.delivery().deliver_batch([item(queued)]))
    reply = results[0]["x@example.org"]
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert "message checksum mismatch" in reply.text
    assert queued.damaged == "message checksum mismatch"
    server = world.servers[0]
    assert server.in_data and server.messages == []            # the message was never ended
    return server


def test_damaged_queue_file_is_never_ended_with_the_final_dot(tmp_path):
    data = b"".join(b"line %d\r\n" % i for i in range(BODY_CHUNK // 4))   # > 2 chunks
    queued = queue_file(tmp_path, data, envelope("x@example.org"), flip=100)   # in the first chunk
    server = deliver_damaged(queued)
    assert 0 < len(server.buf) < len(data)              # its first chunks went, not the last
    assert server.closed                                # aborted, not QUIT


def test_unreadable_queue_file_skips_only_that_message():
    world = World({("mx", 25): {}})
    delivery = world.delivery()

    def broken() -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    qid, env, _open, _n = message("Q1", "x@example.org")
    results = world.run(delivery.deliver_batch([(qid, env, broken, 10),
                                                message("Q2", "y@example.org")]))
    assert results[0]["x@example.org"].code == 451
    assert results[1]["y@example.org"].code == 250


def test_smtputf8_and_size_limits_of_the_next_hop():
    world = World({("mx", 25): {"extensions": ("PIPELINING", "SIZE 100")}})
    delivery = world.delivery()
    _n = message("Q3", "x@example.org")[3]
    results = world.run(delivery.deliver_batch([
        message("Q1", "ü@example.org", smtputf8=True),
        message("Q2", "x@example.org", data=b"x" * 101),
        message("Q3", "x@example.org", smtputf8=True)]))         # ASCII envelope: goes
    assert results[0]["ü@example.org"].enhanced == "5.6.7"
    assert results[1]["x@example.org"] .enhanced == "5.3.4"
    assert results[2]["x@example.org"].code == 250
    assert world.servers[0].messages[0]["mail"] == b"MAIL FROM:<a@example.org> SIZE=%d" % _n


@pytest.mark.parametrize("checked", [False, True])
def test_content_checked_skips_the_line_end_repair_only(checked):
    world = World({("mx", 25): {}})
    delivery = world.delivery(content_checked=checked)
    clean = b"Subject: t\r\n\r\n.leading dot\r\nend\r\n"
    bare = b"Subject: t\r\n\r\nbare\nLF\r\n"
    world.run(delivery.deliver_batch([message("Q1", "x@example.org", data=clean),
                                      message("Q2", "x@example.org", data=bare)]))
    sent = [m["data"] for m in world.servers[0].messages]
    assert sent[0] == clean                    # dot-stuffed on the wire either way, unstuffed here
    # unchecked content is repaired; checked content is trusted as it is
    assert sent[1] == (bare if checked else bare.replace(b"bare\nLF", b"bare\r\nLF"))


# ---- header edits ---------------------------------------------------------------

RECEIVED = b"Received: from client.example.org by filter.example.net\r\n"
HEADER = (RECEIVED
          + b"X-Spam-Status: No (forged by the client)\r\n"
          + b"\tstill forged\r\n"
          + b"Subject: t\r\n"
          + b"x-spam-status: again\r\n"
          + b"\r\n")
KEPT = RECEIVED + b"Subject: t\r\n\r\n"
BODY_TEXT = b"X-Spam-Status: a body line, never a field\r\n.dot\r\n"
EDITS = HeaderEdits(add=(("X-Spam-Status", "Yes, score=7.1\n\ttests=A,B"),        # LF from the check
                         ("Authentication-Results", "filter.example.net; spf=pass")),
                    remove=frozenset({"X-Spam-Status"}))
PREFIX = (b"X-Spam-Status: Yes, score=7.1\r\n\ttests=A,B\r\n"
          b"Authentication-Results: filter.example.net; spf=pass\r\n")


@pytest.mark.parametrize("straddle", [False, True])
def test_header_edits_are_applied_as_the_message_is_sent(tmp_path, straddle):
    # straddle: fields first, so that a removed field spans the first chunk's end
    fill = BODY_CHUNK - 20 - len(RECEIVED)
    padding = b"".join(b"X-Pad: %08d\r\n" % i for i in range(fill // 17)) if straddle else b""
    padding += b"X-Pad: " + b"p" * (fill - len(padding) - 9) + b"\r\n" if straddle else b""
    assert not straddle or len(padding) + len(RECEIVED) == BODY_CHUNK - 20
    rest = BODY_TEXT + (b"x" * (2 * BODY_CHUNK) + b"\r\n" if straddle else b"")
    data = padding + HEADER + rest
    queued = queue_file(tmp_path, data, envelope("x@example.org", header_edits=EDITS))
    world = World({("mx", 25): {}})
    results = world.run(world.delivery().deliver_batch([item(queued)]))
    assert results[0]["x@example.org"].code == 250
    sent = world.servers[0].messages[0]
    assert EDITS.prefix() == PREFIX                 # CRLF line ends, whatever the check wrote
    assert sent["data"] == PREFIX + padding + KEPT + rest       # the body untouched
    # SIZE counts the added fields, not the removed ones: an upper estimate
    assert sent["mail"].endswith(b" SIZE=%d" % (len(data) + len(PREFIX)))
    assert queued.damaged is None


def test_added_fields_only_and_the_size_that_counts_them():
    world = World({("mx", 25): {"extensions": ("PIPELINING", "SIZE 100")}})
    edits = HeaderEdits(add=(("X-Checked", "yes"),))
    data = b"Subject: t\r\n\r\n" + b"x" * 80 + b"\r\n"            # 96 bytes: fits without the field
    results = world.run(world.delivery().deliver_batch([
        message("Q1", "x@example.org", data=data),
        message("Q2", "x@example.org", data=data, header_edits=edits)]))
    assert results[0]["x@example.org"].code == 250
    assert results[1]["x@example.org"] == Reply(
        552, "5.3.4", f"message size {len(data) + 16} exceeds size limit 100 of server mx[mx]:25")
    world = World({("mx", 25): {}})
    world.run(world.delivery().deliver_batch([
        message("Q2", "x@example.org", data=data, header_edits=edits)]))
    assert world.servers[0].messages[0]["data"] == b"X-Checked: yes\r\n" + data


@pytest.mark.parametrize("size", ["one chunk", "three chunks"])
def test_damaged_queue_file_with_header_edits_is_never_ended(tmp_path, size):
    filler = b"x" * (3 * BODY_CHUNK) + b"\r\n" if size == "three chunks" else b""
    data = HEADER + BODY_TEXT + filler
    queued = queue_file(tmp_path, data, envelope("x@example.org", header_edits=EDITS),
                        flip=len(HEADER) + 3)                     # in the body
    server = deliver_damaged(queued)
    assert server.closed                                       # no final dot: aborted
    assert server.buf.startswith(EDITS.prefix())              # the edits went first
    assert len(server.buf) < len(EDITS.prefix()) + len(data)  # the end of the message never went


# ---- reading off the reactor thread -------------------------------------------

class RecordingPool:
    """Runs each job at once in a thread of its own and records what ran where."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def run(self, fn: Any, *args: Any) -> Any:
        box: list[Any] = []

        def work() -> None:
            try:
                box.append(succeed(fn(*args)))
            except Exception:
                box.append(fail())

        t = threading.Thread(target=work, name="pool-thread")
        t.start()
        t.join()
        self.jobs.append(fn.__name__)
        return box[0]


class WatchedFile(io.BytesIO):
    """A message that notes the thread of every open and read."""

    def __init__(self, data: bytes, seen: list[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def read(self, size: int | None = -1) -> bytes:
        self.seen.append(threading.current_thread().name)
        return super().read(size)


def test_queue_files_are_opened_and_read_in_pool_threads_one_job_per_chunk():
    small = b"Subject: s\r\n\r\nsmall\r\n"
    big = b"Subject: b\r\n\r\n" + b"y" * (2 * BODY_CHUNK + 10) + b"\r\n"    # three chunks
    seen: list[str] = []

    def opener(data: bytes) -> Any:
        def open_body() -> WatchedFile:
            seen.append(threading.current_thread().name)
            return WatchedFile(data, seen)
        return open_body

    pool = RecordingPool()
    world = World({("mx", 25): {}})
    results = world.run(world.delivery(pool).deliver_batch([
        ("Q1", envelope("x@example.org"), opener(small), len(small)),
        ("Q2", envelope("x@example.org"), opener(big), len(big))]))
    assert [r["x@example.org"].code for r in results] == [250, 250]
    assert [m["data"] for m in world.servers[0].messages] == [small, big]
    assert len(seen) == 2 + 1 + 3 and set(seen) == {"pool-thread"}    # 2 opens, 1 + 3 reads
    assert pool.jobs == ["_open", "_open", "_read", "_read"]          # one hand-off per chunk


def test_a_message_still_in_memory_is_sent_without_the_pool():
    """A message the manager still holds from its reception needs no I/O: no thread hand-off."""
    data = b"Subject: m\r\n\r\n" + b"m" * (BODY_CHUNK + 7) + b"\r\n"        # two chunks
    pool = RecordingPool()
    world = World({("mx", 25): {}})
    results = world.run(world.delivery(pool).deliver_batch([("Q1", envelope("x@example.org"), data, len(data))]))
    assert results[0]["x@example.org"].code == 250
    assert world.servers[0].messages[0]["data"] == data
    assert pool.jobs == []


def test_a_real_blocking_pool_reads_the_queue_file(tmp_path):
    data = b"Subject: t\r\n\r\n" + b"z" * (BODY_CHUNK + 5) + b"\r\n"
    queued = queue_file(tmp_path, data, envelope("x@example.org"))
    opened_in: list[str] = []
    real_open = queued.open_body

    def open_body() -> Any:
        opened_in.append(threading.current_thread().name)
        return real_open()

    world = World({("mx", 25): {}}, threaded=True)
    pool = BlockingPool(world.clock, size=2, name="test-blocking")
    pool.start()
    try:
        results = world.run(world.delivery(pool).deliver_batch(
            [(queued.qid, queued.envelope, open_body, queued.body_len)]))
    finally:
        pool.stop()
    assert results[0]["x@example.org"].code == 250
    assert world.servers[0].messages[0]["data"] == data
    assert opened_in and opened_in[0].startswith("test-blocking-")
    assert threading.current_thread().name not in opened_in


def test_every_file_opened_is_closed_whatever_became_of_its_message():
    files: list[io.BytesIO] = []

    def queued(qid: str, *rcpts: str, data: bytes = b"Subject: t\r\n\r\nhi\r\n", **kw: Any) -> Any:
        def open_body() -> io.BytesIO:
            files.append(io.BytesIO(data))
            return files[-1]
        return qid, envelope(*rcpts, **kw), open_body, len(data)

    world = World({("mx", 25): {"extensions": ("PIPELINING", "SIZE 100"), "drop_on_mail": 3,
                                "reject": ("bad@example.org",)}})
    results = world.run(world.delivery(RecordingPool()).deliver_batch([
        queued("Q1", "ü@example.org", smtputf8=True),              # refused: no SMTPUTF8
        queued("Q2", "x@example.org", data=b"x" * 101),             # refused: too big
        queued("Q3", "bad@example.org"),                            # RCPT refused
        queued("Q4", "x@example.org", data=b"y" * 10 * BODY_CHUNK),  # too big too
        queued("Q5", "x@example.org"),                              # sent
        queued("Q6", "x@example.org"),                              # the connection drops at MAIL
        queued("Q7", "x@example.org"),                              # opened ahead, never begun
        queued("Q8", "x@example.org")]))                            # never opened
    assert [next(iter(r.values())).code for r in results] == [550, 552, 550, 552, 250, 451, 451, 451]
    assert len(files) == 7 and all(f.closed for f in files)
