"""The Twisted adapter around the server core, with StringTransport and Clock."""
import pytest
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from shared.smtp.reply import Reply
from shared.smtp.server import ServerConfig
from shared.tlsutil import self_signed
from shared.transport.server import ABORT_GRACE, COMMAND_SLICE, CloseAfter, SMTPServerFactory

# NOOP floods come from an upstream tier (the test peer is 192.0.2.10): its sessions
# carry many clients and have no junk-command limit to end them (upstream_config).
UPSTREAM = ["192.0.2.0/24"]


class TLSStringTransport(StringTransport):
    def __init__(self, host="192.0.2.10"):
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.tls_started_with = None

    def startTLS(self, ctx):
        self.tls_started_with = ctx

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class Handler:
    """Answers decisions from a script; records every event."""

    def __init__(self, proto, answers=None):
        self.proto = proto
        self.events = []
        self.answers = answers or {}
        self.pending = []

    def _answer(self, name, event):
        self.events.append((name, event))
        a = self.answers.get(name)
        if a == "defer":
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if a == "boom":
            raise RuntimeError("handler bug")
        if a == "defer-fail":
            return defer.fail(RuntimeError("async bug"))
        return a

    in_transaction = False

    def on_connect(self):
        return None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda event=None: self._answer(name, event)
        raise AttributeError(name)


class BufferedTransport(TLSStringTransport):
    """Holds what is written until drained, and pauses its producer while it
    holds more than bufferSize octets, as Twisted's TCP transports do."""

    bufferSize = 65536

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.bufferSize and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self):
        """The peer has read everything: what was held, as lines."""
        out = lines(self)
        self.clear()
        self.producer.resumeProducing()
        return out


def make(answers=None, transport=None, **kw):
    clock = Clock()
    handlers = []

    def handler_factory(proto):
        h = Handler(proto, answers)
        handlers.append(h)
        return h
    opts = dict(reactor=clock, server_config=ServerConfig(hostname="mx.test"), handler_factory=handler_factory,
                command_timeout=300, session_timeout=3600)
    opts.update(kw)
    factory = SMTPServerFactory.single(**opts)
    proto = factory.buildProtocol(None)
    transport = transport or TLSStringTransport()
    proto.makeConnection(transport)
    return clock, factory, proto, transport, handlers


def lines(transport):
    return transport.value().decode().split("\r\n")


def test_greeting_and_pipelined_replies_stay_in_order_with_slow_answers():
    clock, factory, proto, t, [h] = make({"on_mail_from": "defer", "on_rcpt_to": "defer"})
    assert t.value().startswith(b"220 mx.test")
    assert t.no_delay is True          # short replies must not wait for delayed ACKs
    t.clear()
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nNOOP\r\n")
    out = t.value()
    assert out.startswith(b"250-mx.test") and b"250 2.1.0" not in out
    t.clear()
    # MAIL pending: RCPT must not have been parsed yet
    assert [n for n, _ in h.events] == ["on_hello", "on_mail_from"]
    h.pending.pop(0).callback(None)
    assert [n for n, _ in h.events][-1] == "on_rcpt_to"
    assert t.value().startswith(b"250 2.1.0")
    t.clear()
    h.pending.pop(0).callback(Reply(550, "5.1.1", "no such user"))
    assert lines(t)[:2] == ["550 5.1.1 no such user", "250 2.0.0 Ok"]


def test_handler_errors_become_tempfail_not_tracebacks():
    for how in ("boom", "defer-fail"):
        clock, factory, proto, t, [h] = make({"on_mail_from": how})
        t.clear()
        proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        text = t.value().decode()
        if how == "boom":   # a synchronous bug closes the session with 421
            assert "421 4.3.0" in text and t.disconnecting
        else:
            assert "451 4.3.0" in text and not t.disconnecting
        assert "Traceback" not in text


def test_idle_timeout_says_421_and_closes():
    clock, factory, proto, t, _ = make()
    t.clear()
    clock.advance(299)
    proto.dataReceived(b"NOOP\r\n")
    clock.advance(299)
    assert not t.disconnecting
    clock.advance(2)
    assert b"421 4.4.2 mx.test Error: timeout exceeded" in t.value() and t.disconnecting
    assert proto in factory.sessions           # until the transport has flushed and closed
    proto.dataReceived(b"NOOP\r\n")           # nothing more is answered
    assert t.value().endswith(b"timeout exceeded\r\n")
    proto.connectionLost()
    assert proto not in factory.sessions


def test_peer_that_does_not_read_is_cut_off():
    clock, factory, proto, t, _ = make()
    proto.abort_session(Reply(421, "4.3.2", "bye"))
    aborted = []
    t.abortConnection = lambda: aborted.append(True)
    clock.advance(4.9)
    assert not aborted
    clock.advance(0.2)
    assert aborted


def test_starttls_discards_pipelined_plaintext():
    clock, factory, proto, t, [h] = make(tls_context=object())
    proto.dataReceived(b"EHLO c\r\n")
    assert b"STARTTLS" in t.value()
    t.clear()
    proto.dataReceived(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert t.tls_started_with is not None
    assert t.value() == b"220 2.0.0 Ready to start TLS\r\n"
    assert "on_mail_from" not in [n for n, _ in h.events]
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@b.test>\r\n")   # EHLO needed again after TLS
    assert t.value().startswith(b"503")


def test_connection_limits_and_shutdown():
    clock, factory, proto, t, handlers = make(max_connections=1)
    handlers[0].in_transaction = True          # busy: no idle session to make room with
    p2 = factory.buildProtocol(None)
    t2 = TLSStringTransport()
    p2.makeConnection(t2)
    assert t2.value().startswith(b"421 4.7.0") and t2.disconnecting
    p2.connectionLost()
    handlers[0].in_transaction = False
    t.clear()
    d = factory.shutdown(10)
    assert b"421 4.3.2" in t.value() and t.disconnecting
    assert not d.called                        # the 421 is still in the transport's buffer
    proto.connectionLost()
    assert d.called


def test_close_after_reply():
    clock, factory, proto, t, _ = make({"on_hello": CloseAfter(Reply(554, "5.7.1", "go away"))})
    t.clear()
    proto.dataReceived(b"EHLO c\r\nNOOP\r\n")
    assert t.value() == b"554 5.7.1 go away\r\n" and t.disconnecting


def test_backpressure_pauses_reading_while_a_decision_waits():
    clock, factory, proto, t, [h] = make({"on_mail_from": "defer"}, upstream_hosts=UPSTREAM)
    proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    proto.dataReceived(b"NOOP\r\n" * 20000)        # 120 kB pipelined behind a pending MAIL
    assert t.producerState == "paused"
    h.pending.pop(0).callback(None)
    assert t.producerState == "producing"


def test_per_client_limit_spares_upstream_tiers():
    clock, factory, proto, t, _ = make(max_connections_per_client=1, upstream_hosts=["192.0.2.0/24"])
    for host, refused in (("192.0.2.10", False), ("198.51.100.7", False), ("198.51.100.7", True)):
        p = factory.buildProtocol(None)
        tr = TLSStringTransport(host)
        p.makeConnection(tr)
        assert tr.value().startswith(b"421 4.7.0") is refused, host


# -- output back-pressure: a peer that does not read its replies --------------------------


def test_the_session_is_its_transports_streaming_producer():
    clock, factory, proto, t, _ = make()
    assert t.producer is proto and t.streaming is True


def test_full_output_holds_pipelined_commands_until_the_transport_drains():
    clock, factory, proto, t, [h] = make()
    proto.dataReceived(b"EHLO c\r\n")
    t.clear()
    proto.pauseProducing()
    proto.dataReceived(b"HELP\r\nMAIL FROM:<a@b.test>\r\nVRFY x\r\nNOOP\r\n")
    assert t.value() == b""                                # nothing answered, nothing decided
    assert "on_mail_from" not in [n for n, _ in h.events]
    assert t.producerState == "paused"                     # and the peer is not read
    proto.resumeProducing()
    assert [ln[:3] for ln in lines(t)] == ["214", "250", "252", "250", ""]
    assert b"250 2.1.0" in t.value()
    assert t.producerState == "producing"


def test_a_read_of_commands_is_answered_no_faster_than_the_peer_reads():
    """One 64 KiB read of NOOPs: the replies are given a slice at a time, and
    the transport holds at most its buffer and one slice's replies."""
    clock, factory, proto, t, _ = make(transport=BufferedTransport(), upstream_hosts=UPSTREAM)
    proto.dataReceived(b"EHLO c\r\n")
    t.clear()
    count = 65536 // len(b"NOOP\r\n")
    proto.dataReceived(b"NOOP\r\n" * count)
    one_slice = (COMMAND_SLICE // len(b"NOOP\r\n") + 1) * len(b"250 2.0.0 Ok\r\n")
    assert t.bufferSize < len(t.value()) <= t.bufferSize + one_slice
    assert t.producerState == "paused"
    answered = []
    for _ in range(10):
        if t.producerState != "paused":
            break
        answered += t.drain()[:-1]
    assert t.producerState == "producing"
    answered += lines(t)[:-1]
    assert answered == ["250 2.0.0 Ok"] * count


def test_input_and_output_backpressure_do_not_release_each_other():
    clock, factory, proto, t, [h] = make({"on_mail_from": "defer"}, upstream_hosts=UPSTREAM)
    proto.dataReceived(b"EHLO c\r\n")
    # the handler's pause outlasts a full output, and the other way round
    proto.pause_input()
    proto.pauseProducing()
    proto.resumeProducing()
    assert t.producerState == "paused"
    proto.resume_input()
    assert t.producerState == "producing"
    proto.pauseProducing()
    proto.dataReceived(b"NOOP\r\n")
    proto.pause_input()
    proto.resume_input()
    assert t.producerState == "paused"
    proto.resumeProducing()
    assert t.producerState == "producing"
    # input buffered behind a decision outlasts a full output, and the other way round
    proto.dataReceived(b"MAIL FROM:<a@b.test>\r\n" + b"NOOP\r\n" * 20000)
    assert t.producerState == "paused"
    proto.pauseProducing()
    proto.resumeProducing()
    assert t.producerState == "paused"
    proto.pauseProducing()
    t.clear()
    h.pending.pop(0).callback(None)
    assert lines(t) == ["250 2.1.0 Ok", ""]              # the answer that was out, nothing after it
    assert t.producerState == "paused"
    t.clear()
    proto.resumeProducing()
    assert t.producerState == "producing"
    assert lines(t) == ["250 2.0.0 Ok"] * 20000 + [""]


QUEUED = Reply(250, "2.0.0", "Ok: queued as 1")
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"


def chunks_of(h):
    return [e.data for n, e in h.events if n == "on_data_chunk"]


def test_a_bdat_chunk_is_given_to_the_core_a_read_at_a_time_like_data():
    clock, factory, proto, t, [h] = make({"on_data_end": QUEUED})
    proto.dataReceived(ENVELOPE)
    body = b"x" * 998 + b"\r\n"
    reads = [b"BDAT %d LAST\r\n" % (64 * len(body)) + body * 16] + [body * 16] * 3
    for data in reads:
        proto.dataReceived(data)
    assert b"".join(chunks_of(h)) == body * 64
    assert len(chunks_of(h)) <= len(reads) + 1          # not one per COMMAND_SLICE
    assert lines(t)[-2:] == ["250 2.0.0 Ok: queued as 1", ""]


def test_commands_behind_a_chunk_are_still_answered_a_slice_at_a_time():
    clock, factory, proto, t, [h] = make({"on_data_end": QUEUED}, transport=BufferedTransport(),
                                         upstream_hosts=UPSTREAM)
    proto.dataReceived(ENVELOPE)
    t.clear()
    count = 65536 // len(b"NOOP\r\n")
    chunk = (b"z" * 998 + b"\r\n") * 10                 # longer than a slice
    proto.dataReceived(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n" * count)
    one_slice = (COMMAND_SLICE // len(b"NOOP\r\n") + 1) * len(b"250 2.0.0 Ok\r\n")
    assert t.bufferSize < len(t.value()) <= t.bufferSize + one_slice + len(QUEUED.to_bytes())
    assert t.producerState == "paused"
    answered = []
    while t.producerState == "paused":
        answered += t.drain()[:-1]
    answered += lines(t)[:-1]
    assert answered == ["250 2.0.0 Ok: queued as 1"] + ["250 2.0.0 Ok"] * count
    assert b"".join(chunks_of(h)) == chunk


def test_a_chunk_waiting_for_its_data_start_answer_pauses_reading():
    clock, factory, proto, t, [h] = make({"on_data_start": "defer", "on_data_end": QUEUED},
                                         upstream_hosts=UPSTREAM)
    proto.dataReceived(ENVELOPE)
    body = b"y" * 98 + b"\r\n"
    proto.dataReceived(b"BDAT %d LAST\r\n" % (2000 * len(body)))
    proto.dataReceived(body * 1000)                       # 100 kB behind the pending DataStart
    assert t.producerState == "paused" and chunks_of(h) == []
    t.clear()
    h.pending.pop(0).callback(None)
    assert t.value() == b""                               # no 354 for BDAT
    assert t.producerState == "producing"
    proto.dataReceived(body * 1000)
    assert b"".join(chunks_of(h)) == body * 2000
    assert lines(t) == ["250 2.0.0 Ok: queued as 1", ""]


def test_the_sink_can_pause_reading_inside_a_chunk():
    clock, factory, proto, t, [h] = make({"on_data_end": QUEUED})
    proto.dataReceived(ENVELOPE + b"BDAT 10 LAST\r\n12345")
    proto.pause_input()
    assert t.producerState == "paused"
    proto.resume_input()
    proto.dataReceived(b"678\r\n")
    assert t.producerState == "producing" and b"".join(chunks_of(h)) == b"12345678\r\n"


def test_nothing_is_answered_once_the_transport_stops_its_producer():
    clock, factory, proto, t, _ = make()
    t.clear()
    proto.stopProducing()
    proto.dataReceived(b"NOOP\r\n")
    assert t.value() == b""


def test_starttls_drops_plaintext_held_back_from_the_core():
    clock, factory, proto, t, [h] = make(tls_context=object())
    proto.dataReceived(b"EHLO c\r\n")
    t.clear()
    proto.dataReceived(b"STARTTLS\r\n" + b"NOOP\r\n" * 1000 + b"EHLO evil\r\nMAIL FROM:<evil@x.test>\r\n")
    assert t.tls_started_with is not None
    assert t.value() == b"220 2.0.0 Ready to start TLS\r\n"
    assert [n for n, _ in h.events] == ["on_hello", "on_starttls_request", "on_starttls"]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side of a TLS test connection."""

    def __init__(self, cert, key):
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate_file(str(cert))
        self.context.use_privatekey_file(str(key))

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


def test_implicit_tls_greets_once_the_handshake_is_done(tmp_path):
    """The TLS layer holds the greeting until its handshake is done, and pauses
    us meanwhile; the handshake needs the client's bytes, so they are still read."""
    cert, key = self_signed(tmp_path, "mx.test")
    ctx = ServerTLS(cert, key)
    clock = Clock()
    factory = SMTPServerFactory.single(reactor=clock, server_config=ServerConfig(hostname="mx.test"),
                                handler_factory=Handler, tls_context=ctx)
    server = TLSMemoryBIOFactory(ctx, False, factory, clock=clock).buildProtocol(None)
    t = TLSStringTransport()
    server.makeConnection(t)
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    unread, greeting = b"", b""
    for _ in range(10):          # reactor turns: each side's bytes to the other, if it reads
        clock.advance(0)         # the TLS layer sends small writes a turn later
        try:
            client.do_handshake()
            greeting += client.recv(4096)
        except SSL.WantReadError:
            pass
        try:
            unread += client.bio_read(65536)
        except SSL.WantReadError:
            pass
        if unread and t.producerState == "producing":
            server.dataReceived(unread)
            unread = b""
        if t.value():
            client.bio_write(t.value())
            t.clear()
    assert greeting.startswith(b"220 mx.test ESMTP")
    assert server.wrappedProtocol.conn.tls_active          # the transport is TLS: so is the session


def test_a_plain_listener_never_claims_tls():
    clock, factory, proto, t, _ = make(tls_context=object())
    assert not proto.conn.tls_active
    proto.dataReceived(b"EHLO c.example\r\n")
    assert b"250-STARTTLS" in t.value() or b"250 STARTTLS" in t.value()


def test_a_peer_that_does_not_read_our_last_reply_is_cut_off_whoever_closes():
    for answers, command in (({}, b"QUIT\r\n"),
                             ({"on_hello": CloseAfter(Reply(554, "5.7.1", "go away"))}, b"EHLO c\r\n")):
        clock, factory, proto, t, _ = make(answers)
        aborted = []
        t.abortConnection = lambda: aborted.append(True)
        proto.dataReceived(command)
        assert t.disconnecting and t.producer is None      # Twisted closes only without a producer
        clock.advance(ABORT_GRACE - 0.1)
        assert not aborted
        clock.advance(0.2)
        assert aborted, command


@pytest.mark.parametrize("vouched", [True, False])
def test_the_pregreet_wait_ends_once_the_connect_checks_vouch_for_the_client(vouched):
    connect = defer.Deferred()

    class Checked(Handler):
        vouched_for = vouched            # as EngineSession's: a DNS allowlist said so

        def on_connect(self):
            return connect

    clock, factory, proto, t, _ = make(handler_factory=Checked, greet_wait=6)
    assert t.value() == b"220-mx.test ESMTP\r\n"
    clock.advance(1)
    connect.callback(None)                                  # the checks answered: greet
    assert lines(t)[1].startswith("220 mx.test") is vouched
    if not vouched:
        proto.dataReceived(b"EHLO early.test\r\n")          # still inside the wait: refused
        assert lines(t)[1].startswith("554 5.5.1 ") and t.disconnecting
        return
    proto.dataReceived(b"EHLO vouched.test\r\n")
    assert lines(t)[2].startswith("250-mx.test")
    clock.advance(5)                                        # where the wait would have ended: nothing
    assert [line[:4] for line in lines(t)].count("220 ") == 1


def test_the_tarpit_holds_error_replies_past_the_soft_limit():
    """Past soft_error_limit each error reply waits error_sleep seconds (smtpd_error_sleep_time),
    and nothing pipelined behind it is read or answered meanwhile."""
    clock, factory, proto, t, [h] = make(soft_error_limit=2, error_sleep=1.5,
                                         server_config=ServerConfig(hostname="mx.test", hard_error_limit=6))
    t.clear()
    proto.dataReceived(b"EHLO c.test\r\n")
    for _ in range(2):                                    # within the soft limit: answered at once
        t.clear()
        proto.dataReceived(b"BOGUS\r\n")
        assert lines(t)[0] == "500 5.5.2 Error: command not recognized"
    t.clear()
    proto.dataReceived(b"BOGUS\r\n")                      # the third error: held back
    assert t.value() == b""
    assert t.producerState == "paused"                    # and no reading meanwhile
    proto.dataReceived(b"NOOP\r\n")                       # (already in flight) waits too
    clock.advance(1.4)
    assert t.value() == b""
    clock.advance(0.2)
    assert lines(t)[:2] == ["500 5.5.2 Error: command not recognized", "250 2.0.0 Ok"]
    assert t.producerState == "producing"


def test_no_tarpit_for_an_upstream_tier():
    clock, factory, proto, t, [h] = make(soft_error_limit=1, error_sleep=5, upstream_hosts=UPSTREAM)
    proto.dataReceived(b"EHLO c.test\r\n")
    t.clear()
    proto.dataReceived(b"BOGUS\r\nBOGUS\r\nBOGUS\r\n")
    assert lines(t)[:3] == ["500 5.5.2 Error: command not recognized"] * 3
