"""SMTP load generator, Maildir watcher, idle-connection test and /proc sampling.

Run in its own process so its CPU is counted to no tier under test::

    python -m bench.load send --port P --size 5k --sessions 10 --messages 2000 \
        --maildir DIR/Maildir [--run-id ID] [--rcpt alice@example.test]
        [--message-file FILE] [--per-connection N] [--helo NAME] [--mail-from ADDR]
    python -m bench.load idle --port P --target 10000 [--milestones 1000,10000]

``send`` opens N sessions at once; each sends messages back to back over its
one connection (MAIL, RCPT, DATA -- in one write when the server offers
PIPELINING -- then the whole dot-stuffed message in one write, then waits for
the reply to end of data) until the run's messages are used up.  Every message
carries a unique ``X-Bench-Id: RUN-n`` header; its bytes are built before the
clock starts.  Per message it records the time of the first byte of MAIL and
the time the reply to end of data arrived.  With ``--message-file`` every message is
that prepared file, sent as-is (see :func:`messages_from_file`); with
``--per-connection N`` a session QUITs after N messages and reconnects (N = 1:
one message per connection, as most MX traffic arrives).  A watcher process polls the
Maildir's new/ with os.scandir every few milliseconds, reads the X-Bench-Id
of each file it has not seen yet and moves the file to cur/; that gives the
time the message appeared.  One JSON document goes to stdout: the summary and
every raw figure (all times from CLOCK_MONOTONIC, the same clock in every
process).  A session that waits longer than --reply-timeout for a reply is
given up; its message counts as not accepted (code -3; -1: connection lost).

``idle`` opens up to TARGET connections that read the greeting, send EHLO and
then stay idle; it prints one JSON line per milestone (pausing ``--pause``
seconds there, 1 by default, so the caller can sample the server's memory and
try a client of its own), one when it starts holding them ``--hold`` seconds,
one after (pausing again) and a final JSON line.

The /proc helpers (:func:`cpu_seconds`, :func:`rss_kb`, :func:`pss_kb`,
:class:`RssSampler`) are used by :mod:`bench.run` to charge CPU time and memory
to each tier.

Trusts: the servers it is pointed at to be on loopback; replies are parsed
only as far as their codes (and the EHLO keywords).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import sys
import threading
import time
from collections import Counter, deque

SIZES = {"5k": 5 * 1024, "50k": 50 * 1024, "1m": 1024 * 1024}
LOST, TIMEOUT = -1, -3          # codes recorded for a message whose session broke or stalled
CLK_TCK = os.sysconf("SC_CLK_TCK")
HEAD_READ = 4096


# -- messages ---------------------------------------------------------------------------------

def message_body(size: int) -> bytes:
    """Headers after X-Bench-Id/Message-ID plus a text body, dot-stuffed, ending with CRLF.CRLF.

    Lines are 72 characters; every 40th line begins with a dot, so dot-stuffing is exercised.
    """
    head = (b"From: Bench Sender <bench@example.net>\r\n"
            b"To: Alice <alice@example.test>\r\n"
            b"Subject: benchmark message\r\n"
            b"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"\r\n")
    body = head + body_lines(size, len(head) + 80)
    body = body.replace(b"\r\n.", b"\r\n..")          # dot-stuffing (no line starts the message with ".")
    return body + b".\r\n"


def body_lines(size: int, head_len: int) -> bytes:
    """Text lines of 72 characters until the message (with a header section of `head_len`
    bytes) is about `size` bytes; every 40th line begins with a dot."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ,;:-"
    lines, total, i = [], head_len, 0
    while total < size:
        start = (i * 7) % len(alphabet)
        text = (alphabet[start:] + alphabet)[:72]
        if i % 40 == 39:
            text = b"." + text[1:]
        lines.append(text + b"\r\n")
        total += 74
        i += 1
    return b"".join(lines)


def build_messages(run_id: str, n: int, size: int) -> list[bytes]:
    body = message_body(size)
    return [b"X-Bench-Id: %s-%d\r\nMessage-ID: <%s-%d@bench.example.net>\r\n%s"
            % (run_id.encode(), i, run_id.encode(), i, body) for i in range(n)]


def messages_from_file(run_id: str, n: int, raw: bytes) -> list[bytes]:
    """`n` copies of a prepared message (`raw`, RFC 5322, LF or CRLF line ends), each sent as-is
    after one prepended ``X-Bench-Id: RUN-n`` header (and a ``Message-ID`` when the file has
    none), CRLF line ends, dot-stuffed and terminated.  Headers are only prepended, never
    changed, so a DKIM signature over the file's headers and body still verifies."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    head = text.split(b"\r\n\r\n", 1)[0]
    has_mid = re.search(rb"^message-id:", head, re.I | re.M) is not None
    text = (b"." + text if text.startswith(b".") else text).replace(b"\r\n.", b"\r\n..")
    body = text + b".\r\n"
    out = []
    for i in range(n):
        extra = b"" if has_mid else b"Message-ID: <%s-%d@bench.example.net>\r\n" % (run_id.encode(), i)
        out.append(b"X-Bench-Id: %s-%d\r\n%s%s" % (run_id.encode(), i, extra, body))
    return out


# -- the load -----------------------------------------------------------------------------------

class Load:
    """Shared state of one run: the messages, who takes the next one, the raw times."""

    def __init__(self, messages: list[bytes], mail_from: bytes, rcpt: bytes, *,
                 per_connection: int = 0, helo: bytes = b"bench.example.net") -> None:
        self.messages = messages
        self.per_connection = per_connection      # messages per connection; 0: no limit
        self.ehlo_cmd = b"EHLO %s\r\n" % helo
        self.n = len(messages)
        self.next = 0
        self.t_mail = [0.0] * self.n
        self.t_reply = [0.0] * self.n
        self.codes = [0] * self.n
        self.mail_cmd = b"MAIL FROM:<%s> SIZE=%d\r\n" % (mail_from, len(messages[0]) if messages else 0)
        self.rcpt_cmd = b"RCPT TO:<%s>\r\n" % rcpt
        self.session_errors: list[str] = []
        self.pipelining = None

    def take(self) -> int | None:
        if self.next >= self.n:
            return None
        i = self.next
        self.next += 1
        return i


class SenderProtocol(asyncio.Protocol):
    """One SMTP session sending the load's messages until none is left."""

    def __init__(self, load: Load, done: asyncio.Future) -> None:
        self.load = load
        self.done = done
        self.buf = b""
        self.lines: list[bytes] = []
        self.expect: deque[str] = deque()
        self.pipelining = False
        self.current = -1
        self.ok = True
        self.since = 0.0             # when the oldest reply still expected was asked for
        self.transport = None
        self.sent = 0                # messages taken on this connection

    # plumbing
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.expect.append("greet")

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            if self.current >= 0 and not self.load.codes[self.current]:
                self.load.codes[self.current] = LOST
            self.load.session_errors.append(f"connection lost: {exc or 'closed by server'}")
            self.done.set_result(False)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end + 1]
            start = end + 1
            if line[3:4] == b"-":
                self.lines.append(line)
                continue
            lines, self.lines = self.lines, []
            lines.append(line)
            try:
                code = int(line[:3])
            except ValueError:
                code = -2
            self.reply(code, lines)
        self.buf = buf[start:]

    def fail(self, why: str, code: int = LOST) -> None:
        if self.current >= 0 and not self.load.codes[self.current]:
            self.load.codes[self.current] = code
        self.load.session_errors.append(why)
        if not self.done.done():
            self.done.set_result(False)
        self.transport.abort()

    # the dialogue
    def reply(self, code: int, lines: list[bytes]) -> None:
        if not self.expect:
            return self.fail(f"unexpected reply {lines[-1]!r}")
        what = self.expect.popleft()
        load = self.load
        if what == "eod":
            load.t_reply[self.current] = time.monotonic()
            load.codes[self.current] = code
            self.send_next()
        elif what == "mail" or what == "rcpt":
            if code != 250:
                self.ok = False
                if not load.codes[self.current]:
                    load.codes[self.current] = code
            if not self.pipelining:
                if not self.ok:
                    self.reset()
                elif what == "mail":
                    self.expect.append("rcpt")
                    self.transport.write(load.rcpt_cmd)
                else:
                    self.expect.append("data")
                    self.transport.write(b"DATA\r\n")
        elif what == "data":
            if code == 354 and self.ok:
                self.expect.append("eod")
                self.since = time.monotonic()
                self.transport.write(load.messages[self.current])
            elif code == 354:
                return self.fail("354 to DATA after a refused MAIL or RCPT")
            else:
                if not load.codes[self.current]:
                    load.codes[self.current] = code
                self.reset()
        elif what == "rset":
            self.send_next()
        elif what == "greet":
            if code != 220:
                return self.fail(f"greeting {lines[-1]!r}")
            self.expect.append("ehlo")
            self.transport.write(load.ehlo_cmd)
        elif what == "ehlo":
            if code != 250:
                return self.fail(f"EHLO refused: {lines[-1]!r}")
            self.pipelining = any(l[4:14].upper() == b"PIPELINING" for l in lines)
            load.pipelining = self.pipelining
            self.send_next()
        elif what == "quit":
            if not self.done.done():
                self.done.set_result(True)
            self.transport.close()

    def reset(self) -> None:
        self.expect.append("rset")
        self.transport.write(b"RSET\r\n")

    def send_next(self) -> None:
        load = self.load
        self.ok = True
        if load.per_connection and self.sent >= load.per_connection:
            i = None                 # this connection had its share; the session reconnects
        else:
            i = load.take()
        if i is None:
            self.current = -1
            self.expect.append("quit")
            self.transport.write(b"QUIT\r\n")
            return
        self.current = i
        self.sent += 1
        load.t_mail[i] = self.since = time.monotonic()
        if self.pipelining:
            self.expect.extend(("mail", "rcpt", "data"))
            self.transport.write(load.mail_cmd + load.rcpt_cmd + b"DATA\r\n")
        else:
            self.expect.append("mail")
            self.transport.write(load.mail_cmd)


# -- the Maildir watcher ------------------------------------------------------------------------

def watch_maildirs(maildirs: list[str], run_id: str, conn, interval: float) -> None:
    """Child process: report when each message of `run_id` appears in a Maildir's new/.

    Polls new/ with os.scandir every `interval` seconds; each file not seen before is read
    (its first 4 KB, more only if the header is not there) and then moved to cur/, as a
    mail reader would, so that each scan lists only the files that arrived since the last
    one (a scan of a new/ holding thousands of files costs a millisecond or more).
    Files already present when it starts are ignored.  Protocol on `conn`: sends "ready"
    after the first scan; receives ("expect", count, timeout); sends back {n: time}
    once `count` messages were seen or the timeout passed.
    """
    pattern = re.compile(rb"^X-Bench-Id: " + re.escape(run_id.encode()) + rb"-(\d+)\r?$", re.M)
    seen: set[str] = set()
    dirs = []
    for m in maildirs:
        new, cur = os.path.join(m, "new"), os.path.join(m, "cur")
        os.makedirs(new, exist_ok=True)
        os.makedirs(cur, exist_ok=True)
        seen.update(os.listdir(new))
        dirs.append((new, cur))
    found: dict[int, float] = {}
    parent = os.getppid()
    conn.send("ready")
    expect, deadline = None, None
    monotonic = time.monotonic
    while True:
        for new, cur in dirs:
            with os.scandir(new) as it:
                for entry in it:
                    name = entry.name
                    if name in seen:
                        continue
                    t = monotonic()
                    m = None
                    try:
                        with open(entry.path, "rb") as f:
                            head = f.read(HEAD_READ)
                            m = pattern.search(head)
                            if m is None and len(head) == HEAD_READ:
                                m = pattern.search(head + f.read(60_000))
                        os.rename(entry.path, os.path.join(cur, name + ":2,"))
                    except FileNotFoundError:
                        continue
                    except OSError:         # not movable: remember it instead
                        seen.add(name)
                    if m is not None:
                        found[int(m.group(1))] = t
        if os.getppid() != parent:      # the generator was killed: nobody will ask any more
            return
        if expect is None and conn.poll():
            _, expect, timeout = conn.recv()
            deadline = monotonic() + timeout
        if expect is not None and (len(found) >= expect or monotonic() > deadline):
            conn.send(found)
            return
        time.sleep(interval)


# -- statistics ---------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def latency_summary(values_ms: list[float]) -> dict:
    s = sorted(values_ms)
    return {"p50": percentile(s, 50), "p99": percentile(s, 99), "max": s[-1] if s else None}


# -- send ----------------------------------------------------------------------------------------

async def _send(host: str, port: int, load: Load, sessions: int, reply_timeout: float) -> None:
    if load.per_connection:
        return await _send_reconnecting(host, port, load, sessions, reply_timeout)
    loop = asyncio.get_running_loop()
    futures, protocols = [], []
    for _ in range(sessions):
        done = loop.create_future()
        try:
            _, proto = await loop.create_connection(lambda d=done: SenderProtocol(load, d), host, port)
        except OSError as e:
            load.session_errors.append(f"connect: {e}")
            continue
        futures.append(done)
        protocols.append(proto)
    waiting = asyncio.gather(*futures)
    while not waiting.done():
        await asyncio.wait([waiting], timeout=1.0)
        now = time.monotonic()
        for p in protocols:           # a server that stops answering fails the session, not the run
            if p.expect and p.since and now - p.since > reply_timeout and not p.done.done():
                p.fail(f"no reply within {reply_timeout:.0f} s (waiting for {p.expect[0]})", TIMEOUT)


async def _send_reconnecting(host: str, port: int, load: Load, sessions: int, reply_timeout: float) -> None:
    """`sessions` sessions at once, each a loop of connections that send at most
    ``load.per_connection`` messages, QUIT and reconnect until no message is left.  A session
    whose connection fails or breaks ends (its message counts as not accepted), as above."""
    loop = asyncio.get_running_loop()
    protocols: set = set()

    async def session() -> None:
        while load.next < load.n:
            done = loop.create_future()
            try:
                _, proto = await loop.create_connection(lambda d=done: SenderProtocol(load, d), host, port)
            except OSError as e:
                load.session_errors.append(f"connect: {e}")
                return
            protocols.add(proto)
            try:
                ok = await done
            finally:
                protocols.discard(proto)
            if not ok:
                return

    waiting = asyncio.gather(*(session() for _ in range(sessions)))
    while not waiting.done():
        await asyncio.wait([waiting], timeout=1.0)
        now = time.monotonic()
        for p in list(protocols):
            if p.expect and p.since and now - p.since > reply_timeout and not p.done.done():
                p.fail(f"no reply within {reply_timeout:.0f} s (waiting for {p.expect[0]})", TIMEOUT)


def run_send(host: str, port: int, size: int, sessions: int, messages: int, maildirs: list[str],
             run_id: str, mail_from: str, rcpt: str, deliver_timeout: float, poll: float,
             reply_timeout: float = 60.0, message_file: str | None = None, per_connection: int = 0,
             helo: str = "bench.example.net") -> dict:
    if message_file:
        with open(message_file, "rb") as f:
            msgs = messages_from_file(run_id, messages, f.read())
        size = len(msgs[0]) if msgs else 0
    else:
        msgs = build_messages(run_id, messages, size)
    load = Load(msgs, mail_from.encode(), rcpt.encode(), per_connection=per_connection, helo=helo.encode())
    watcher = None
    if maildirs:
        parent, child = multiprocessing.Pipe()
        watcher = multiprocessing.get_context("fork").Process(
            target=watch_maildirs, args=(maildirs, run_id, child, poll),
            daemon=True)
        watcher.start()
        if parent.recv() != "ready":
            raise RuntimeError("watcher failed")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    asyncio.run(_send(host, port, load, sessions, reply_timeout))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = [i for i in range(load.n) if load.codes[i] == 250]
    seen: dict[int, float] = {}
    if watcher is not None:
        parent.send(("expect", len(ok), deliver_timeout))
        seen = parent.recv()
        watcher.join(5)
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)

    t0 = min((load.t_mail[i] for i in range(load.n) if load.t_mail[i]), default=0.0)
    last_reply = max((load.t_reply[i] for i in ok), default=0.0)
    delivered = [i for i in ok if i in seen]
    last_seen = max((seen[i] for i in delivered), default=0.0)
    lat_reply = [round((load.t_reply[i] - load.t_mail[i]) * 1000, 3) for i in ok]
    lat_maildir = [round((seen[i] - load.t_mail[i]) * 1000, 3) for i in delivered]
    return {
        "run_id": run_id, "host": host, "port": port, "size": size, "sessions": sessions,
        "messages": load.n, "pipelining": load.pipelining,
        **({"message_file": message_file} if message_file else {}),
        **({"per_connection": per_connection} if per_connection else {}),
        "accepted": len(ok), "delivered": len(delivered) if maildirs else None,
        "replies": dict(Counter(str(c) for c in load.codes)),
        "session_errors": load.session_errors[:20],
        "accept_seconds": last_reply - t0 if ok else None,
        "deliver_seconds": last_seen - t0 if delivered else None,
        "accepted_per_s": len(ok) / (last_reply - t0) if ok and last_reply > t0 else None,
        "delivered_per_s": (len(delivered) / (last_seen - t0) if delivered and last_seen > t0 else None),
        "latency_250_ms": latency_summary(lat_reply),
        "latency_maildir_ms": latency_summary(lat_maildir) if maildirs else None,
        "generator_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 3),
        "watcher_cpu_s": round(ru_children.ru_utime + ru_children.ru_stime, 3),
        "raw": {
            "t0": t0,
            "t_mail_s": [round(load.t_mail[i] - t0, 6) if load.t_mail[i] else None for i in range(load.n)],
            "t_250_s": [round(load.t_reply[i] - t0, 6) if load.codes[i] == 250 else None
                        for i in range(load.n)],
            "t_maildir_s": [round(seen[i] - t0, 6) if i in seen else None for i in range(load.n)],
            "codes": load.codes,
        },
    }


# -- idle connections ----------------------------------------------------------------------------

class IdleProtocol(asyncio.Protocol):
    """Read the greeting, send EHLO, read its reply, then stay idle."""

    def __init__(self, state: "IdleState") -> None:
        self.state = state
        self.buf = b""
        self.phase = "greet"
        self.t_connected = time.monotonic()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.state.open.add(self)

    def connection_lost(self, exc) -> None:
        self.state.open.discard(self)
        if self.phase == "ready":
            self.state.lost_after_ready += 1
        self.phase = "closed"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
            if line[3:4] == b"-":
                continue
            code = line[:3]
            st = self.state
            if self.phase == "greet":
                if code != b"220":
                    st.refused[line[:3].decode("ascii", "replace")] += 1
                    self.phase = "refused"
                    self.transport.close()
                    return
                if time.monotonic() - self.t_connected <= st.greet_within:
                    st.greeted_in_time += 1
                st.greeted += 1
                self.phase = "ehlo"
                self.transport.write(b"EHLO bench.example.net\r\n")
            elif self.phase == "ehlo":
                if code == b"250":
                    self.phase = "ready"
                    st.ready += 1
                else:
                    st.refused["ehlo " + line[:3].decode("ascii", "replace")] += 1
                    self.phase = "refused"
                    self.transport.close()
                return


class IdleState:
    def __init__(self, greet_within: float) -> None:
        self.greet_within = greet_within
        self.open: set[IdleProtocol] = set()
        self.greeted = 0
        self.greeted_in_time = 0
        self.ready = 0
        self.lost_after_ready = 0
        self.connect_failed = 0
        self.refused: Counter = Counter()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _idle(host: str, port: int, target: int, milestones: list[int], greet_within: float,
                open_time: float, hold: float, in_flight: int, connect_timeout: float,
                give_up_failures: int, pause: float = 1.0) -> dict:
    """Open connections in stages (each milestone, then the target); after each stage wait until
    every connection is greeted and answered EHLO (at most `greet_within` s), report, pause."""
    loop = asyncio.get_running_loop()
    st = IdleState(greet_within)
    sem = asyncio.Semaphore(in_flight)
    t_start = time.monotonic()
    deadline = t_start + open_time
    tasks: set = set()

    async def one() -> None:
        try:
            await asyncio.wait_for(loop.create_connection(lambda: IdleProtocol(st), host, port),
                                   connect_timeout)
        except (OSError, asyncio.TimeoutError):
            st.connect_failed += 1
        finally:
            sem.release()

    def gave_up() -> bool:
        return time.monotonic() >= deadline or st.connect_failed >= give_up_failures

    attempted = 0
    for stage in sorted({m for m in milestones if m < target} | {target}):
        while attempted < stage and not gave_up():
            await sem.acquire()
            attempted += 1
            t = asyncio.ensure_future(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        settle_until = time.monotonic() + greet_within
        while time.monotonic() < settle_until and (
                tasks or any(p.phase in ("greet", "ehlo") for p in st.open)):
            await asyncio.sleep(0.05)
        if stage in milestones:
            _emit({"milestone": stage, "attempted": attempted, "ready": st.ready - st.lost_after_ready,
                   "open": len(st.open), "seconds": round(time.monotonic() - t_start, 2)})
            await asyncio.sleep(pause)
        if gave_up():
            break
    for t in list(tasks):
        t.cancel()
    opening_seconds = time.monotonic() - t_start
    _emit({"holding": hold, "attempted": attempted, "ready": st.ready - st.lost_after_ready,
           "open": len(st.open)})
    await asyncio.sleep(hold)
    still_ready = sum(1 for p in st.open if p.phase == "ready")
    _emit({"held": hold, "ready": still_ready, "open": len(st.open)})
    await asyncio.sleep(pause)
    result = {
        "target": target, "attempted": attempted, "connect_failed": st.connect_failed,
        "greeted": st.greeted, "greeted_within_s": greet_within, "greeted_in_time": st.greeted_in_time,
        "ehlo_ok": st.ready, "open_at_end": len(st.open), "ready_and_open_after_hold": still_ready,
        "lost_after_ready": st.lost_after_ready, "refused": dict(st.refused), "hold_s": hold,
        "opening_seconds": round(opening_seconds, 2),
    }
    for p in list(st.open):
        p.transport.abort()
    await asyncio.sleep(0.2)
    return result


def run_idle(host: str, port: int, target: int, milestones: list[int], greet_within: float,
             open_time: float, hold: float, in_flight: int, connect_timeout: float,
             give_up_failures: int, pause: float = 1.0) -> dict:
    nofile = raise_nofile()
    if nofile < target + 100:
        _emit({"warning": f"RLIMIT_NOFILE {nofile} is below the target {target}"})
        target = max(0, nofile - 100)
    result = asyncio.run(_idle(host, port, target, milestones, greet_within, open_time, hold,
                               in_flight, connect_timeout, give_up_failures, pause))
    result["nofile"] = nofile
    return result


# -- /proc sampling (used by bench.run) ---------------------------------------------------------

def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of `pid`, CPU seconds of its reaped children); (0, 0) if it is gone.

    A single-threaded process's own time is its scheduler runtime from /proc/PID/schedstat
    (nanoseconds).  utime+stime from /proc/PID/stat come in 10 ms ticks, truncated per
    process: summed over the dozens of short-lived processes of a Postfix tier, that loses
    a good part of what they used.  A multi-threaded process (a smarthost tier with its
    thread pool) is read from /proc/PID/stat, which also counts its exited threads; one
    process per tier makes the truncation negligible.  Reaped children (cutime+cstime) are
    summed by the kernel before the one truncation, so they stay precise.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2:].split()     # fields[0] is field 3 (state)
        children = (int(fields[13]) + int(fields[14])) / CLK_TCK
        if fields[0] == b"Z":
            return 0.0, children
        if int(fields[17]) == 1:                          # num_threads
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9, children
        return (int(fields[11]) + int(fields[12])) / CLK_TCK, children
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0.0, 0.0


def tier_cpu_seconds(pids: list[int], master: int | None) -> float:
    """CPU of a tier: every live process's own time, plus the reaped children's time charged
    to the master (Postfix's master reaps its exited children; smarthost tiers are one process)."""
    total = sum(cpu_seconds(p)[0] for p in set(pids))
    if master is not None:
        total += cpu_seconds(master)[1]
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of the machine spent busy so far (/proc/stat: all but idle and
    iowait).  Over a run, that minus what the measured processes used is what everything else
    took meanwhile (other users' work, the kernel's own): the noise a figure was taken under."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle             # user nice system idle iowait irq softirq steal
    return busy / CLK_TCK


def calibration_ms(rounds: int = 3) -> float:
    """CPU milliseconds a fixed pure-Python loop takes here now (the least of `rounds`).  On a
    quiet machine it is steady; when it grows, every CPU figure taken meanwhile grows with it
    (caches shared with other work, or a busy host: a virtual CPU the host takes away without
    reporting steal time counts as running)."""
    best = float("inf")
    for _ in range(rounds):
        t, x = time.process_time(), 0
        for i in range(1_000_000):
            x += i * i
        best = min(best, time.process_time() - t)
    return best * 1000


class NoiseWindow:
    """What the machine did from now until `noise()`: its busy CPUs, and the CPUs everything
    but the measured processes (their CPU seconds given to `noise`) and this process's reaped
    children (the load generator) used meanwhile; and :func:`calibration_ms` at the start."""

    def __init__(self) -> None:
        self.calibration_ms = calibration_ms()
        self.t0, self.busy0 = time.monotonic(), machine_busy_seconds()
        self.children0 = _children_cpu()

    def noise(self, measured_cpu_s: float) -> dict:
        seconds = time.monotonic() - self.t0
        busy = machine_busy_seconds() - self.busy0
        children = _children_cpu() - self.children0
        return {"window_s": seconds, "machine_busy_cpus": busy / seconds,
                "others_cpus": max(0.0, busy - measured_cpu_s - children) / seconds,
                "calibration_ms": round(self.calibration_ms, 1)}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_status_kb(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kb(pids: list[int]) -> int:
    return sum(proc_status_kb(p, b"VmRSS:") for p in set(pids))


def pss_kb(pids: list[int]) -> int:
    """Summed proportional set size: shared pages split among the processes sharing them, so
    a tier of many processes (Postfix) is not charged its shared libraries once per process."""
    total = 0
    for pid in set(pids):
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class RssSampler:
    """Samples the summed VmRSS of each tier's processes every `interval` seconds in a thread
    and keeps the maximum (and the summed PSS, dearer to read, every `pss_interval`).
    `pid_lists` maps a name to a function returning the current pids (called again every
    `refresh` seconds, for systems that spawn processes)."""

    def __init__(self, pid_lists: dict, interval: float = 0.1, refresh: float = 0.5,
                 pss_interval: float = 1.0) -> None:
        self.pid_lists = pid_lists
        self.interval = interval
        self.refresh = refresh
        self.pss_interval = pss_interval
        self.peak_kb = {name: 0 for name in pid_lists}
        self.peak_pss_kb = {name: 0 for name in pid_lists}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = {}
        next_refresh = next_pss = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                pids = {name: list(f()) for name, f in self.pid_lists.items()}
                next_refresh = now + self.refresh
            for name, ps in pids.items():
                self.peak_kb[name] = max(self.peak_kb[name], rss_kb(ps))
            if now >= next_pss:
                for name, ps in pids.items():
                    self.peak_pss_kb[name] = max(self.peak_pss_kb[name], pss_kb(ps))
                next_pss = now + self.pss_interval
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- command line ---------------------------------------------------------------------------------

def _size(text: str) -> int:
    t = text.lower()
    if t in SIZES:
        return SIZES[t]
    return int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("send", help="send messages over N sessions and time them")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--size", type=_size, default="5k", help="5k, 50k, 1m or bytes")
    s.add_argument("--sessions", type=int, default=10)
    s.add_argument("--messages", type=int, default=1000)
    s.add_argument("--maildir", action="append", default=[], help="Maildir to watch (repeatable)")
    s.add_argument("--run-id", default=f"r{os.getpid()}")
    s.add_argument("--mail-from", default="bench@example.net")
    s.add_argument("--rcpt", default="alice@example.test")
    s.add_argument("--deliver-timeout", type=float, default=120.0,
                   help="seconds to wait for the Maildir after the last 250")
    s.add_argument("--poll", type=float, default=0.003, help="Maildir poll interval, seconds")
    s.add_argument("--reply-timeout", type=float, default=60.0,
                   help="seconds without the expected reply before a session is given up")
    s.add_argument("--no-raw", action="store_true", help="leave the per-message figures out")
    s.add_argument("--message-file", default=None,
                   help="send this prepared message (RFC 5322) as-is instead of built ones; "
                        "X-Bench-Id (and Message-ID, when it has none) are prepended; --size is ignored")
    s.add_argument("--per-connection", type=int, default=0,
                   help="messages per connection, then QUIT and reconnect (default 0: all on one)")
    s.add_argument("--helo", default="bench.example.net", help="the name sent in EHLO")
    i = sub.add_parser("idle", help="open idle connections (greeting + EHLO) and count them")
    i.add_argument("--host", default="127.0.0.1")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--target", type=int, default=10000)
    i.add_argument("--milestones", default="1000,10000")
    i.add_argument("--greet-within", type=float, default=5.0)
    i.add_argument("--open-time", type=float, default=90.0, help="longest time spent opening")
    i.add_argument("--hold", type=float, default=5.0, help="seconds to stay idle before counting")
    i.add_argument("--in-flight", type=int, default=200, help="connections being opened at once")
    i.add_argument("--connect-timeout", type=float, default=3.0)
    i.add_argument("--give-up-failures", type=int, default=500,
                   help="stop opening after this many failed connects")
    i.add_argument("--pause", type=float, default=1.0, help="seconds to wait at each milestone")
    a = p.parse_args(argv)
    if a.mode == "send":
        result = run_send(a.host, a.port, a.size, a.sessions, a.messages, a.maildir, a.run_id,
                          a.mail_from, a.rcpt, a.deliver_timeout, a.poll, a.reply_timeout,
                          a.message_file, a.per_connection, a.helo)
        if a.no_raw:
            result.pop("raw")
    else:
        result = run_idle(a.host, a.port, a.target, [int(m) for m in a.milestones.split(",") if m],
                          a.greet_within, a.open_time, a.hold, a.in_flight, a.connect_timeout,
                          a.give_up_failures, a.pause)
        result = {"result": result}
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
