"""Test doubles for the SMTP client tests: a scripted SMTP server connected to the
client through twisted.test.iosim (``World``), and shortcuts to build envelopes and
queued messages."""
from __future__ import annotations

import gc
import io
import queue
from typing import Any

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from shared.blocking import InlinePool
from shared.envelope import Envelope, Recipient
from shared.queue.delivery import QueueDelivery
from shared.transport.pool import RelayClient


def envelope(*rcpts: str, **kw: Any) -> Envelope:
    return Envelope(sender="a@example.org", recipients=[Recipient(r) for r in rcpts], **kw)


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors():
    """Fail a test that leaves a failed Deferred nobody handled."""
    errors: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_level") == LogLevel.critical or "Unhandled error" in str(
                event.get("log_format", "")):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not errors, [formatEvent(e) for e in errors]


class FakeTLS:
    """A context object for iosim's pretend TLS."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def iosimVerify(self, other: Any) -> bool:
        return self.ok


class FakeSMTPServer(Protocol):
    """A scripted SMTP server (test code: line by line is fine here)."""

    def __init__(self, extensions: tuple[str, ...] = ("PIPELINING", "SIZE 10000000", "8BITMIME",
                                                       "XFORWARD NAME ADDR PORT PROTO HELO IDENT"),
                 greeting: bytes = b"220 fake.example ESMTP", reject: tuple[str, ...] = (),
                 drop_on_mail: int | None = None, tls: bool = False,
                 xclient_reply: str = "220 fake.example ESMTP") -> None:
        self.xclient_reply = xclient_reply
        self.extensions = list(extensions) + (["STARTTLS"] if tls else [])
        self.greeting = greeting
        self.reject = reject
        self.drop_on_mail = drop_on_mail
        self.buf = b""
        self.in_data = False
        self.closed = False
        self.commands: list[bytes] = []
        self.messages: list[dict[str, Any]] = []
        self.xclient: list[bytes] = []
        self.tx: dict[str, Any] = {}
        self.mails = 0
        self.tls = False

    def connectionMade(self) -> None:
        self.transport.write(self.greeting + b"\r\n")

    def connectionLost(self, reason: Any) -> None:
        self.closed = True

    def send(self, line: str) -> None:
        self.transport.write(line.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while not self.closed:
            if self.in_data:
                framed = b"\r\n" + self.buf
                end = framed.find(b"\r\n.\r\n")
                if end < 0:
                    return
                raw, self.buf = self.buf[:end], self.buf[end + 3:]
                self.in_data = False
                self.tx["data"] = (b"\r\n" + raw).replace(b"\r\n..", b"\r\n.")[2:]
                self.messages.append(self.tx)
                self.tx = {}
                self.send(f"250 2.0.0 Ok: queued as Q{len(self.messages)}")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            self.buf = rest
            self.command(line)

    def command(self, line: bytes) -> None:
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            lines = ["fake.example", *self.extensions]
            for i, text in enumerate(lines):
                self.send(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
        elif verb == b"STARTTLS":
            self.send("220 2.0.0 go ahead")
            self.extensions.remove("STARTTLS")
            self.transport.startTLS(FakeTLS())
        elif verb == b"XCLIENT":
            self.xclient.append(line)
            self.send(self.xclient_reply)
        elif verb == b"XFORWARD":
            self.tx.setdefault("xforward", []).append(line)
            self.send("250 2.0.0 Ok")
        elif verb == b"MAIL":
            self.mails += 1
            if self.mails == self.drop_on_mail:
                self.closed = True
                self.transport.loseConnection()
                return
            self.tx["mail"] = line
            self.tx["rcpts"] = []
            self.send("250 2.1.0 Ok")
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            if address in self.reject:
                self.send("550 5.1.1 User unknown")
            else:
                self.tx["rcpts"].append(address)
                self.send("250 2.1.5 Ok")
        elif verb == b"DATA":
            if not self.tx.get("rcpts"):
                self.send("554 5.5.1 Error: no valid recipients")
            else:
                self.in_data = True
                self.send("354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"RSET":
            self.tx = {}
            self.send("250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.send("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.send("502 5.5.2 Error: command not recognized")



class ThreadedClock(MemoryReactorClock):
    """A clock a real worker pool can hand results to: calls from its threads wait
    in a queue until :meth:`World.run` makes them."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.from_threads.put((f, args, kw))


class World:
    """Next hops by (host, port): "refused", "hang", or FakeSMTPServer kwargs.

    ``threaded``: the clock takes results from a real worker pool's threads (see
    :class:`ThreadedClock`); :meth:`run` waits for them before it moves time on.
    """

    def __init__(self, hosts: dict[tuple[str, int], Any], threaded: bool = False) -> None:
        self.hosts = hosts
        self.clock = ThreadedClock() if threaded else MemoryReactorClock()
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[FakeSMTPServer] = []
        self.attempts: list[tuple[str, int]] = []

    def endpoint(self, host: str, port: int) -> Any:
        world = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred:
                world.attempts.append((host, port))
                how = world.hosts[(host, port)]
                if how == "refused":
                    return fail(net_error.ConnectionRefusedError())
                if how == "hang":
                    return Deferred()
                server = FakeSMTPServer(**how)
                client = factory.buildProtocol(None)
                world.pumps.append(iosim.connect(
                    server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                    greet=False, clock=world.clock))
                world.servers.append(server)
                return succeed(client)

        return Endpoint()

    def relay(self, **kw: Any) -> RelayClient:
        kw.setdefault("helo_name", "edge.example.net")
        kw.setdefault("connect_timeout", 5)
        return RelayClient(self.clock, list(self.hosts), endpoint_factory=self.endpoint, **kw)

    def delivery(self, pool: Any = None, *, content_checked: bool = True,
                 **kw: Any) -> QueueDelivery:
        """Queue delivery over a new relay client (``kw``); files read inline
        unless a pool is given."""
        return QueueDelivery(self.relay(**kw), pool or InlinePool(),
                             content_checked=content_checked)

    def run(self, d: Deferred) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(1000):
            if box:
                break
            if any([p.flush() for p in self.pumps]):
                continue
            if isinstance(self.clock, ThreadedClock):
                try:
                    f, args, kw = self.clock.from_threads.get(timeout=5)
                except queue.Empty:
                    pass
                else:
                    f(*args, **kw)
                    continue
            self.clock.advance(1)
        assert box, "did not finish"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]


def body(data: bytes) -> tuple[Any, int]:
    return (lambda: io.BytesIO(data)), len(data)


def message(qid: str, *rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n",
            **kw: Any) -> tuple[str, Envelope, Any, int]:
    open_body, n = body(data)
    return qid, envelope(*rcpts, **kw), open_body, n
