"""The Twisted SMTP client: SMTPClientProtocol on StringTransport + Clock, and
RelayClient against a scripted SMTP server connected through twisted.test.iosim."""
from __future__ import annotations

import gc
import io
from typing import Any

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from shared.envelope import ClientInfo, Envelope, Recipient
from shared.smtp.client import LocalProtocolError, RemoteProtocolError, State
from shared.smtp.reply import Reply
from shared.transport.client import (BODY_CHUNK, NextHop, NextHopUnavailable, RelayClient,
                                     SMTPClientProtocol, SMTPConnectionLost, SMTPTimeoutError,
                                     TLSUnavailable, xclient_attributes)

EHLO = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-STARTTLS\r\n"
        b"250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_NO_PIPELINING = b"250-mx.example.org\r\n250 8BITMIME\r\n"


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started_at: int | None = None
        self.tls_context: Any = None

    def startTLS(self, context: Any) -> None:
        self.tls_started_at = len(self.value())
        self.tls_context = context


def outcome(d: Deferred) -> Any:
    """The result of a fired Deferred (a Failure if it failed)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def waiting(d: Deferred) -> bool:
    """True while ``d`` has no result (also when it waits on another Deferred)."""
    box: list[Any] = []

    def seen(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(seen)
    return not box


def connected(clock: Clock | None = None, **kw: Any) -> tuple[SMTPClientProtocol, TLSStringTransport, Clock]:
    clock = clock or Clock()
    proto = SMTPClientProtocol(clock, command_timeout=10, data_timeout=20, **kw)
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def session(ehlo: bytes = EHLO) -> tuple[SMTPClientProtocol, TLSStringTransport, Clock]:
    proto, transport, clock = connected()
    proto.dataReceived(b"220 mx.example.org ESMTP\r\n")
    d = proto.ehlo("relay.example.net")
    proto.dataReceived(ehlo)
    assert outcome(d).code == 250
    transport.clear()
    return proto, transport, clock


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


# ---- SMTPClientProtocol ------------------------------------------------------

def test_greeting_and_ehlo():
    proto, transport, _ = connected()
    g = proto.greeting()
    assert waiting(g)
    proto.dataReceived(b"220 mx.example.org ESMTP\r\n")
    assert outcome(g) == Reply(220, None, "mx.example.org ESMTP")
    assert outcome(proto.greeting()).code == 220           # asked again later
    d = proto.ehlo("relay.example.net")
    assert transport.value() == b"EHLO relay.example.net\r\n"
    proto.dataReceived(EHLO)
    assert outcome(d).code == 250
    assert "PIPELINING" in proto.conn.extensions


def test_ehlo_falls_back_to_helo_on_5xx_but_not_4xx():
    proto, transport, _ = connected()
    proto.dataReceived(b"220 hi\r\n")
    d = proto.ehlo("relay.example.net")
    proto.dataReceived(b"502 5.5.2 what\r\n")
    assert transport.value() == b"EHLO relay.example.net\r\nHELO relay.example.net\r\n"
    assert waiting(d)
    proto.dataReceived(b"250 hi\r\n")
    assert outcome(d) == Reply(250, None, "hi")
    assert proto.conn.state is State.READY

    proto, transport, _ = connected()
    proto.dataReceived(b"220 hi\r\n")
    d = proto.ehlo("relay.example.net")
    proto.dataReceived(b"421 4.3.2 busy\r\n")
    assert outcome(d).code == 421 and b"HELO" not in transport.value()


def test_error_replies_are_results_not_failures():
    proto, transport, _ = session()
    d = proto.mail("a@example.org")
    proto.dataReceived(b"550 5.7.1 no thanks\r\n")
    assert outcome(d) == Reply(550, "5.7.1", "no thanks")


def test_greeting_timeout_aborts():
    proto, transport, clock = connected()
    g = proto.greeting()
    clock.advance(9.9)
    assert waiting(g)
    clock.advance(0.2)
    assert isinstance(outcome(g).value, SMTPTimeoutError)
    assert transport.disconnected                     # aborted
    assert isinstance(outcome(proto.noop()).value, SMTPTimeoutError)


def test_each_reply_restarts_the_timer_and_idle_has_none():
    proto, transport, clock = session()
    d1 = proto.mail("a@example.org")
    d2 = proto.rcpt("b@example.org")
    clock.advance(8)
    proto.dataReceived(b"250 ok\r\n")
    clock.advance(8)
    assert outcome(d1).code == 250 and waiting(d2)
    proto.dataReceived(b"250 ok\r\n")
    assert outcome(d2).code == 250
    clock.advance(1000)                                 # nothing pending: no timeout
    assert proto.lost is None and not clock.getDelayedCalls()


def test_connection_lost_fails_pending_commands():
    proto, transport, _ = session()
    d = proto.mail("a@example.org")
    proto.connectionLost(Failure(net_error.ConnectionLost()))
    f = outcome(d)
    assert isinstance(f.value, SMTPConnectionLost) and "MAIL FROM" in str(f.value)
    assert isinstance(outcome(proto.rset()).value, SMTPConnectionLost)


def test_garbage_reply_fails_and_aborts():
    proto, transport, _ = session()
    d = proto.noop()
    proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
    assert isinstance(outcome(d).value, RemoteProtocolError)
    assert transport.disconnected


def test_local_protocol_error_is_a_failed_deferred():
    proto, transport, _ = session()
    assert isinstance(outcome(proto.rcpt("b@example.org")).value, LocalProtocolError)
    assert transport.value() == b""


def test_421_answers_every_pending_command():
    proto, transport, _ = session()
    ds = [proto.mail("a@example.org"), proto.rcpt("b@example.org"), proto.rcpt("c@example.org")]
    proto.dataReceived(b"250 ok\r\n421 4.3.2 shutting down\r\n")
    assert [outcome(d).code for d in ds] == [250, 421, 421]
    assert transport.disconnecting
    assert isinstance(outcome(proto.rset()).value, SMTPConnectionLost)


def test_unsolicited_421_during_message_data():
    proto, transport, _ = session()
    d = proto.send_envelope(envelope("b@example.org"))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert outcome(d)[2].code == 354
    proto.send_data(b"part one\r\n")
    transport.producer.pauseProducing()
    w = proto.wait_writable()
    proto.dataReceived(b"421 4.4.2 timeout exceeded\r\n")
    assert isinstance(outcome(w).value, SMTPConnectionLost)
    with pytest.raises(SMTPConnectionLost, match="421"):
        proto.send_data(b"part two\r\n")
    assert isinstance(outcome(proto.end_data()).value, SMTPConnectionLost)


def test_starttls_then_ehlo_again():
    proto, transport, _ = session()
    ctx = object()
    d = proto.starttls(ctx)
    assert transport.value() == b"STARTTLS\r\n"
    proto.dataReceived(b"220 2.0.0 Ready to start TLS\r\n")
    assert transport.tls_context is ctx
    assert transport.tls_started_at == len(b"STARTTLS\r\n")        # EHLO goes after startTLS
    assert transport.value().endswith(b"EHLO relay.example.net\r\n")
    assert waiting(d)
    proto.dataReceived(b"250-mx.example.org\r\n250 PIPELINING\r\n")
    assert outcome(d).code == 250
    assert proto.conn.tls and "STARTTLS" not in proto.conn.extensions


def test_starttls_refused_or_not_offered():
    proto, transport, _ = session()
    d = proto.starttls(object())
    proto.dataReceived(b"454 4.7.0 TLS not available\r\n")
    assert outcome(d).code == 454 and transport.tls_context is None
    proto, transport, _ = session(EHLO_NO_PIPELINING)
    assert isinstance(outcome(proto.starttls(object())).value, TLSUnavailable)


def test_xclient_then_ehlo_again():
    proto, transport, _ = session()
    info = ClientInfo(addr="2001:db8::1", port=40000, helo="client.example", proto="ESMTP")
    d = proto.xclient(xclient_attributes(info))
    assert transport.value() == (b"XCLIENT NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=40000 "
                                 b"PROTO=ESMTP HELO=client.example LOGIN=[UNAVAILABLE]\r\n")
    transport.clear()
    proto.dataReceived(b"220 mx.example.org ESMTP\r\n")
    assert transport.value() == b"EHLO relay.example.net\r\n"
    proto.dataReceived(EHLO)
    assert outcome(d).code == 250 and proto.conn.state is State.READY


def test_xclient_refused_and_not_offered():
    proto, transport, _ = session()
    d = proto.xclient({"ADDR": "192.0.2.1"})
    proto.dataReceived(b"550 5.7.0 insufficient authorization\r\n")
    assert outcome(d).code == 550
    proto, transport, _ = session(EHLO_NO_PIPELINING)
    assert outcome(proto.xclient({"ADDR": "192.0.2.1"})) is None
    assert transport.value() == b""


def test_pipelined_envelope_is_one_write():
    proto, transport, _ = session()
    writes: list[bytes] = []
    proto._write = writes.append                          # type: ignore[method-assign]
    d = proto.send_envelope(envelope("b@example.org", "c@example.org"), size=42)
    assert writes == [b"MAIL FROM:<a@example.org> SIZE=42\r\nRCPT TO:<b@example.org>\r\n"
                      b"RCPT TO:<c@example.org>\r\nDATA\r\n"]
    proto.dataReceived(b"250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
    mail, rcpts, data = outcome(d)
    assert mail.code == 250 and [r.code for r in rcpts] == [550, 250] and data.code == 354
    proto.send_data(b"Subject: x\r\n\r\n.body")
    e = proto.end_data()
    assert writes[1:] == [b"Subject: x\r\n\r\n..body", b"\r\n.\r\n"]
    proto.dataReceived(b"250 2.0.0 Ok: queued as Q1\r\n")
    assert outcome(e).text == "Ok: queued as Q1" and proto.conn.messages_sent == 1


def test_pipelined_envelope_without_accepted_recipient_resets():
    proto, transport, _ = session()
    d = proto.send_envelope(envelope("b@example.org"))
    transport.clear()
    proto.dataReceived(b"250 ok\r\n550 no\r\n554 5.5.1 Error: no valid recipients\r\n")
    assert transport.value() == b"RSET\r\n" and waiting(d)
    proto.dataReceived(b"250 ok\r\n")
    mail, rcpts, data = outcome(d)
    assert data.code == 554 and proto.conn.state is State.READY


def test_envelope_354_without_recipients_sends_empty_message():
    proto, transport, _ = session()
    d = proto.send_envelope(envelope("b@example.org"))
    transport.clear()
    proto.dataReceived(b"250 ok\r\n550 no\r\n354 go ahead anyway\r\n")
    assert transport.value() == b".\r\n"
    proto.dataReceived(b"554 no recipients\r\n")
    mail, rcpts, data = outcome(d)
    assert data.code == 554 and proto.conn.state is State.READY


def test_envelope_without_pipelining_goes_step_by_step():
    proto, transport, _ = session(EHLO_NO_PIPELINING)
    d = proto.send_envelope(envelope("b@example.org", "c@example.org"), size=42)
    assert transport.value() == b"MAIL FROM:<a@example.org>\r\n"        # SIZE not offered
    proto.dataReceived(b"250 ok\r\n")
    proto.dataReceived(b"550 no\r\n")
    proto.dataReceived(b"550 no\r\n")
    assert transport.value().endswith(b"RCPT TO:<c@example.org>\r\nRSET\r\n")   # no DATA
    proto.dataReceived(b"250 ok\r\n")
    mail, rcpts, data = outcome(d)
    assert [r.code for r in rcpts] == [550, 550] and data is None

    proto, transport, _ = session(EHLO_NO_PIPELINING)
    d = proto.send_envelope(envelope("b@example.org", "c@example.org"))
    proto.dataReceived(b"451 4.3.0 later\r\n")
    mail, rcpts, data = outcome(d)
    assert mail.code == 451 and rcpts == [mail, mail] and data is None
    assert transport.value() == b"MAIL FROM:<a@example.org>\r\n"


def test_back_pressure_and_write_stall_timeout():
    proto, transport, clock = session()
    d = proto.send_envelope(envelope("b@example.org"))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    outcome(d)
    proto.send_data(b"x" * 10)
    assert transport.producer is not None and transport.streaming
    assert proto.is_writable()
    transport.producer.pauseProducing()
    assert not proto.is_writable()
    w = proto.wait_writable()
    assert waiting(w)
    transport.producer.resumeProducing()
    assert outcome(w) is None and proto.is_writable()
    transport.producer.pauseProducing()
    w = proto.wait_writable()
    clock.advance(20)
    assert isinstance(outcome(w).value, SMTPTimeoutError) and transport.disconnected


def test_end_of_data_wakes_whoever_waits_for_room():
    """A proxy paused its client on a full buffer; the message ended before the
    buffer drained: the waiter must still be told, or the client stays paused."""
    proto, transport, clock = session()
    d = proto.send_envelope(envelope("b@example.org"))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    outcome(d)
    proto.send_data(b"x" * 10)
    transport.producer.pauseProducing()
    w = proto.wait_writable()
    assert waiting(w)
    proto.end_data()
    assert outcome(w) is None


def test_end_of_data_uses_the_data_timeout():
    proto, transport, clock = session()
    outcome_d = proto.send_envelope(envelope("b@example.org"))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    outcome(outcome_d)
    proto.send_data(b"hello\r\n")
    e = proto.end_data()
    assert transport.producer is None                      # unregistered after the data
    clock.advance(15)
    assert waiting(e)
    clock.advance(6)
    assert isinstance(outcome(e).value, SMTPTimeoutError)


def test_quit_closes_the_connection():
    proto, transport, _ = session()
    d = proto.quit()
    assert transport.value() == b"QUIT\r\n" and not transport.disconnecting
    proto.dataReceived(b"221 bye\r\n")
    assert outcome(d).code == 221 and transport.disconnecting


# ---- RelayClient through iosim ------------------------------------------------------

class FakeTLS:
    """A context object for iosim's pretend TLS."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def iosimVerify(self, other: Any) -> bool:
        return self.ok


class FakeSMTPServer(Protocol):
    """A scripted SMTP server (test code: line by line is fine here)."""

    def __init__(self, extensions: tuple[str, ...] = ("PIPELINING", "SIZE 1000000", "8BITMIME",
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


class World:
    """Next hops by (host, port): "refused", "hang", or FakeSMTPServer kwargs."""

    def __init__(self, hosts: dict[tuple[str, int], Any]) -> None:
        self.hosts = hosts
        self.clock = MemoryReactorClock()
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

    def run(self, d: Deferred) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(1000):
            if box:
                break
            if not any([p.flush() for p in self.pumps]):
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


def test_failover_skips_refused_and_hanging_hops():
    world = World({("a", 25): "refused", ("b", 25): "hang", ("c", 2525): {}})
    session = world.run(world.relay().open_session())
    assert world.attempts == [("a", 25), ("b", 25), ("c", 2525)]
    assert session.relay == "c[c]:2525" and session.usable
    assert world.servers[0].commands == [b"EHLO edge.example.net"]
    world.run(session.close())
    assert world.servers[0].commands[-1] == b"QUIT"


def test_no_hop_reachable_gives_451_for_every_recipient():
    world = World({("a", 25): "refused", ("b", 25): "hang",
                   ("c", 25): {"greeting": b"554 5.3.2 go away"}})
    events: list[dict] = []
    relay = world.relay(log=Logger(observer=events.append))
    results = world.run(relay.deliver_batch([message("Q1", "x@example.org", "y@example.org")]))
    reply = results[0]["x@example.org"]
    assert results == [{"x@example.org": reply, "y@example.org": reply}]
    assert reply.code == 451 and reply.enhanced == "4.4.1"
    assert "connect to a:25: Connection refused" in reply.text
    assert "connect to b:25: connection timed out" in reply.text
    assert "c[c]:25 refused to talk to me: 554 5.3.2 go away" in reply.text
    with pytest.raises(NextHopUnavailable):
        world.run(relay.open_session())
    assert [e["status"] for e in events] == ["deferred"]


def test_batch_over_one_connection_with_xforward_and_streamed_body():
    big = b"".join(b".line %d\r\n" % i for i in range(20000))         # > 3 * BODY_CHUNK
    assert len(big) > 3 * BODY_CHUNK
    world = World({("mx", 25): {"reject": ("bad@example.org",)}})
    events: list[dict] = []
    relay = world.relay(log=Logger(observer=events.append))
    info = ClientInfo(addr="192.0.2.7", port=1234, helo="client.example", proto="ESMTP")
    batch = [message("Q1", "x@example.org", "bad@example.org", client=info),
             message("Q2", "y@example.org", data=big),
             message("Q3", "bad@example.org")]
    results = world.run(relay.deliver_batch(batch))
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
    relay = world.relay(max_messages_per_connection=2)
    results = world.run(relay.deliver_batch([message(f"Q{i}", "x@example.org") for i in range(5)]))
    assert all(r["x@example.org"].code == 250 for r in results)
    assert [len(s.messages) for s in world.servers] == [2, 2, 1]
    # the last connection has room for one more: the next batch reuses it, then it is full
    world.run(relay.deliver_batch([message(f"Q{i}", "x@example.org") for i in range(5, 7)]))
    assert [len(s.messages) for s in world.servers] == [2, 2, 2, 1]
    assert world.servers[2].commands[-1] == b"QUIT"


def test_connection_cache_expires():
    world = World({("mx", 25): {}})
    relay = world.relay(connection_cache_time=2.0)
    world.run(relay.deliver_batch([message("Q1", "x@example.org")]))
    world.run(relay.deliver_batch([message("Q2", "x@example.org")]))
    assert len(world.servers) == 1 and len(world.servers[0].messages) == 2
    assert world.servers[0].commands[-1] != b"QUIT"
    world.clock.advance(2.5)
    for p in world.pumps:
        p.flush()
    assert world.servers[0].commands[-1] == b"QUIT"
    world.run(relay.deliver_batch([message("Q3", "x@example.org")]))
    assert len(world.servers) == 2             # expired: a new connection


def test_connection_lost_mid_batch_defers_the_rest():
    world = World({("mx", 25): {"drop_on_mail": 2}})
    relay = world.relay()
    results = world.run(relay.deliver_batch([message("Q1", "x@example.org"),
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
    relay = world.relay()
    qid, env, _open, _n = message("Q1", "x@example.org")
    results = world.run(relay.deliver_batch([(qid, env, lambda: io.BytesIO(b"short"), 1000)]))
    reply = results[0]["x@example.org"]
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert world.servers[0].messages == []


def test_damaged_queue_file_is_never_ended_with_the_final_dot(tmp_path):
    from shared.queue.store import Spool
    spool = Spool(tmp_path / "spool", reactor=Clock(), fsync=False,
                  runner=lambda f, *a: succeed(f(*a)))
    data = b"".join(b"line %d\r\n" % i for i in range(3 * BODY_CHUNK // 8))   # > 2 chunks
    incoming = spool.new_message()
    incoming.write(data)
    incoming.commit(envelope("x@example.org"))
    path = spool.path(incoming.qid, "incoming")
    with open(path, "r+b") as f:                       # one bit flipped in the first chunk
        f.seek(100)
        f.write(bytes([data[100] ^ 0x01]))
    queued = spool.open(incoming.qid, "incoming")
    world = World({("mx", 25): {}})
    results = world.run(world.relay().deliver_batch(
        [(queued.qid, queued.envelope, queued.open_body, queued.body_len)]))
    reply = results[0]["x@example.org"]
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert "message checksum mismatch" in reply.text
    assert queued.damaged == "message checksum mismatch"
    server = world.servers[0]
    assert server.in_data and server.messages == []    # the message was never ended
    assert 0 < len(server.buf) < len(data)              # its first chunks went, not the last
    assert server.closed                                # aborted, not QUIT


def test_unreadable_queue_file_skips_only_that_message():
    world = World({("mx", 25): {}})
    relay = world.relay()

    def broken() -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    qid, env, _open, _n = message("Q1", "x@example.org")
    results = world.run(relay.deliver_batch([(qid, env, broken, 10),
                                             message("Q2", "y@example.org")]))
    assert results[0]["x@example.org"].code == 451
    assert results[1]["y@example.org"].code == 250


def test_smtputf8_and_size_limits_of_the_next_hop():
    world = World({("mx", 25): {"extensions": ("PIPELINING", "SIZE 100")}})
    relay = world.relay()
    _n = message("Q3", "x@example.org")[3]
    results = world.run(relay.deliver_batch([
        message("Q1", "ü@example.org", smtputf8=True),
        message("Q2", "x@example.org", data=b"x" * 101),
        message("Q3", "x@example.org", smtputf8=True)]))         # ASCII envelope: goes
    assert results[0]["ü@example.org"].enhanced == "5.6.7"
    assert results[1]["x@example.org"] .enhanced == "5.3.4"
    assert results[2]["x@example.org"].code == 250
    assert world.servers[0].messages[0]["mail"] == b"MAIL FROM:<a@example.org> SIZE=%d" % _n


def test_open_session_sends_xclient_when_offered():
    world = World({("filter", 10025): {"extensions": ("PIPELINING",
                                                      "XCLIENT ADDR HELO NAME PROTO")}})
    relay = world.relay(xclient=True)
    info = ClientInfo(addr="198.51.100.9", port=5000, helo="x y", proto="SMTP")
    session = world.run(relay.open_session(info))
    server = world.servers[0]
    assert server.xclient == [b"XCLIENT NAME=[UNAVAILABLE] ADDR=198.51.100.9 PROTO=SMTP HELO=x+20y"]
    assert server.commands[-1] == b"EHLO edge.example.net"        # EHLO again after 220
    assert session.usable


def test_refused_xclient_fails_the_hop_and_plain_hops_are_used_without_it():
    hosts = {("a", 25): {"extensions": ("XCLIENT ADDR",), "xclient_reply": "550 5.7.0 no"},
             ("b", 25): {}}
    world = World(hosts)
    session = world.run(world.relay(xclient=True).open_session(ClientInfo(addr="192.0.2.1")))
    assert session.relay == "b[b]:25" and world.servers[1].xclient == []
    world = World({("a", 25): hosts[("a", 25)]})
    with pytest.raises(NextHopUnavailable, match="refused XCLIENT: 550 5.7.0 no"):
        world.run(world.relay(xclient=True).open_session(ClientInfo(addr="192.0.2.1")))


def test_tls_encrypt_needs_starttls_and_uses_it():
    world = World({("plain", 25): {}, ("tls", 25): {"tls": True}})
    relay = world.relay(tls="encrypt", tls_options=lambda host: FakeTLS())
    session = world.run(relay.open_session())
    assert session.relay == "tls[tls]:25" and session.tls
    assert world.servers[0].commands == [b"EHLO edge.example.net"]   # no STARTTLS offered
    assert world.servers[1].commands == [b"EHLO edge.example.net", b"STARTTLS",
                                         b"EHLO edge.example.net"]

    world = World({("plain", 25): {}})
    with pytest.raises(NextHopUnavailable, match="TLS is required, but was not offered"):
        world.run(world.relay(tls="encrypt", tls_options=lambda host: FakeTLS()).open_session())


def test_tls_may_falls_back_to_plaintext_after_failed_handshake():
    world = World({("mx", 25): {"tls": True}})
    relay = world.relay(tls="may", tls_options=lambda host: FakeTLS(ok=False))
    session = world.run(relay.open_session())
    assert not session.tls and len(world.servers) == 2
    assert b"STARTTLS" not in world.servers[1].commands


def test_relay_client_validates_its_configuration():
    clock = MemoryReactorClock()
    with pytest.raises(ValueError):
        RelayClient(clock, [], helo_name="x.example")
    with pytest.raises(ValueError):
        RelayClient(clock, [("a", 25)], helo_name="x.example", tls="maybe")
    with pytest.raises(ValueError):
        RelayClient(clock, [("a", 25)], helo_name="x.example", max_messages_per_connection=0)
    assert RelayClient(clock, [("a", 25)], helo_name="x.example").next_hops == [NextHop("a", 25)]


def test_address_next_hops_connect_directly_names_are_resolved():
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
    r = MemoryReactorClock()
    client = RelayClient(r, [("127.0.0.1", 25)], helo_name="x.example")
    for host, kind in (("192.0.2.7", TCP4ClientEndpoint), ("2001:db8::7", TCP6ClientEndpoint),
                       ("mx.example.org", HostnameEndpoint)):
        assert type(client._default_endpoint(host, 25)) is kind
    from twisted.internet.protocol import Factory
    client._default_endpoint("192.0.2.7", 2525).connect(Factory.forProtocol(Protocol))
    host, port, _, timeout, _ = r.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.7", 2525, client.connect_timeout)


def test_released_session_serves_the_next_client_with_a_new_xclient():
    world = World({("filter", 10025): {"extensions": ("PIPELINING", "XCLIENT ADDR HELO NAME PROTO")}})
    relay = world.relay(xclient=True, connection_cache_time=2.0)
    first = world.run(relay.open_session(ClientInfo(addr="198.51.100.9", helo="one")))
    assert first.announced
    relay.release(first)
    assert world.servers[0].commands[-1] == b"EHLO edge.example.net"    # no QUIT: kept
    second = world.run(relay.open_session(ClientInfo(addr="198.51.100.10", helo="two")))
    assert second is first and len(world.servers) == 1
    assert world.servers[0].xclient[-1] == (b"XCLIENT NAME=[UNAVAILABLE] ADDR=198.51.100.10 "
                                            b"PROTO=[UNAVAILABLE] HELO=two")
    assert world.servers[0].commands[-1] == b"EHLO edge.example.net" and second.usable
    # queue deliveries never get a connection that speaks for a client
    relay.release(second)
    assert relay._take_cached() is None and relay._take_cached(announced=True) is second
    relay.release(second)
    # kept for connection_cache_time only, then QUIT
    world.clock.advance(2.5)
    for pump in world.pumps:
        pump.flush()
    assert world.servers[0].commands[-1] == b"QUIT"


def test_kept_session_is_not_reused_past_its_limits_or_when_dead():
    world = World({("filter", 10025): {"extensions": ("XCLIENT ADDR",)}})
    relay = world.relay(xclient=True, connection_reuse_time_limit=60.0)
    s1 = world.run(relay.open_session(ClientInfo(addr="192.0.2.1")))
    world.clock.advance(61)                   # too old to carry another client
    relay.release(s1)
    s2 = world.run(relay.open_session(ClientInfo(addr="192.0.2.2")))
    assert s2 is not s1 and len(world.servers) == 2
    assert world.servers[0].commands[-1] == b"QUIT"
    relay.release(s2)
    world.servers[1].transport.loseConnection()         # the next hop closed it meanwhile
    for pump in world.pumps:
        pump.flush()
    s3 = world.run(relay.open_session(ClientInfo(addr="192.0.2.3")))
    assert s3 is not s2 and s3.usable and len(world.servers) == 3
    # a session in the middle of a transaction is closed, not kept
    world.run(s3.mail("a@example.org"))
    relay.release(s3)
    assert relay._cached == []


@pytest.mark.parametrize("checked", [False, True])
def test_content_checked_skips_the_line_end_repair_only(checked):
    world = World({("mx", 25): {}})
    relay = world.relay(content_checked=checked)
    clean = b"Subject: t\r\n\r\n.leading dot\r\nend\r\n"
    bare = b"Subject: t\r\n\r\nbare\nLF\r\n"
    world.run(relay.deliver_batch([message("Q1", "x@example.org", data=clean),
                                   message("Q2", "x@example.org", data=bare)]))
    sent = [m["data"] for m in world.servers[0].messages]
    assert sent[0] == clean                    # dot-stuffed on the wire either way, unstuffed here
    # unchecked content is repaired; checked content is trusted as it is
    assert sent[1] == (bare if checked else bare.replace(b"bare\nLF", b"bare\r\nLF"))
