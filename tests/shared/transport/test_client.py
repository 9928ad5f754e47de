"""The Twisted SMTP client: SMTPClientProtocol on StringTransport + Clock.  The session
pool is tested in test_pool.py, queue delivery in tests/shared/queue/test_delivery.py."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from shared.envelope import ClientInfo
from shared.smtp.client import LocalProtocolError, RemoteProtocolError, State
from shared.smtp.reply import Reply
from shared.transport.client import (SMTPClientProtocol, SMTPConnectionLost, SMTPTimeoutError,
                                     TLSUnavailable)
from shared.transport.pool import xclient_attributes
from tests.shared.transport.fakes import envelope, no_unhandled_deferred_errors  # noqa: F401

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
