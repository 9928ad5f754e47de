"""The engine session between the adapter and a sink: what a failing sink leaves behind,
a message by BDAT reaching the sink as one by DATA does, and STARTTLS refused by a check."""
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from shared.checks.core import CONTINUE, Chain, Check, tempfail
from shared.checks.relay import relay_policy
from shared.engine.session import EngineConfig, EngineSession
from shared.smtp.reply import Reply
from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory


class Sink:
    """A sink session whose answers the test sets; records what is written, and aborts."""

    def __init__(self, begin=None, data_end=None, data_start=None):
        self.answers = {"begin": begin, "data_end": data_end, "data_start": data_start}
        self.aborted = 0
        self.written = b""

    def session(self, engine_session):
        return self

    def begin(self, txn):
        return self.answers["begin"]

    def rcpt(self, txn, recipient):
        return None

    def data_start(self, txn):
        return self.answers["data_start"]

    def write(self, chunk):
        self.written += chunk

    def data_end(self, txn):
        return self.answers["data_end"]

    def abort(self, txn):
        self.aborted += 1

    def close(self):
        pass


def connect(sink):
    clock = Clock()
    factory = SMTPServerFactory.single(
        reactor=clock, server_config=ServerConfig(hostname="mx.test"),
        handler_factory=lambda proto: EngineSession(
            proto, config=EngineConfig("mx.test"), chain=Chain([], reactor=clock),
            relay=relay_policy(["example.org"], []), sink=sink, reactor=clock))
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    proto.makeConnection(transport)
    return proto, transport


def test_a_failed_sink_answer_to_mail_ends_the_transaction():
    sink = Sink(begin=defer.fail(RuntimeError("sink bug")))
    proto, t = connect(sink)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n")
    assert t.value().endswith(b"451 4.3.0 Temporary local problem, try again later\r\n")
    assert not proto.in_transaction and proto.handler.txn is None and sink.aborted == 1
    sink.answers["begin"] = None                      # the session goes on, with a new transaction
    proto.dataReceived(b"MAIL FROM:<a@example.net>\r\n")
    assert t.value().endswith(b"250 2.1.0 Ok\r\n") and proto.in_transaction


def test_a_failed_sink_answer_to_end_of_data_ends_the_transaction():
    sink = Sink(data_end=defer.fail(ConnectionError("next hop lost")))
    proto, t = connect(sink)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
                       b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert t.value().endswith(b"451 4.3.0 Temporary local problem, try again later\r\n")
    assert not proto.in_transaction and proto.handler.txn is None and sink.aborted == 1


def test_a_message_by_bdat_reaches_the_sink_as_one_by_data():
    content = b"Subject: chunks\r\n\r\n.\r\n.x\r\nend\r\n"
    envelope = b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
    queued = Reply(250, "2.0.0", "Ok: queued as X")
    by_data, by_bdat = Sink(data_end=queued), Sink(data_end=queued)
    proto, t = connect(by_data)
    proto.dataReceived(envelope + b"DATA\r\n" + content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    proto, t = connect(by_bdat)
    proto.dataReceived(envelope + b"BDAT 20\r\n" + content[:20] + b"BDAT %d LAST\r\n" % (len(content) - 20)
                       + content[20:])
    assert t.value().endswith(b"250 2.1.5 Ok\r\n250 2.0.0 20 octets received\r\n250 2.0.0 Ok: queued as X\r\n")
    assert by_bdat.written.startswith(b"Received: from c.example") and by_bdat.written.endswith(content)
    def message(sink):                                   # what follows our Received header
        return sink.written[sink.written.index(b"\r\nSubject:") + 2:]
    assert message(by_bdat) == message(by_data) == content
    assert not proto.in_transaction


def test_a_sink_refusing_a_bdat_message_sees_none_of_it():
    sink = Sink(data_start=Reply(451, "4.4.1", "Next hop not reachable, try again later"))
    proto, t = connect(sink)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
                       b"BDAT 6\r\nRSET\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert t.value().endswith(b"250 2.1.5 Ok\r\n" + b"451 4.4.1 Next hop not reachable, try again later\r\n" * 2
                              + b"250 2.0.0 Ok\r\n")
    assert sink.written == b"" and sink.aborted == 0 and proto.in_transaction
    proto.dataReceived(b"RSET\r\n")
    assert sink.aborted == 1 and not proto.in_transaction


def test_a_starttls_check_refuses_454_and_the_session_goes_on_in_plaintext():
    clock, asked = Clock(), []

    def limit(request):
        """One new TLS session, then 454 (as rate_limits' tls_rate = 1)."""
        asked.append(request.phase)
        return tempfail(454, "4.7.0", "Error: too many new TLS sessions from 192.0.2.1") if len(asked) > 1 \
            else CONTINUE

    class Transport(StringTransport):
        started = None

        def startTLS(self, ctx):
            self.started = ctx
    chain = Chain([Check("tls_limit", "starttls", limit)], reactor=clock)
    factory = SMTPServerFactory.single(
        reactor=clock, server_config=ServerConfig(hostname="mx.test"), tls_context="the context",
        handler_factory=lambda proto: EngineSession(
            proto, config=EngineConfig("mx.test"), chain=chain, relay=relay_policy(["example.org"], []),
            sink=Sink(), reactor=clock))
    sessions = []
    for _ in range(2):
        proto = factory.buildProtocol(None)
        t = Transport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        proto.makeConnection(t)
        proto.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
        sessions.append((proto, t))
    (first, t1), (second, t2) = sessions
    assert t1.value().endswith(b"220 2.0.0 Ready to start TLS\r\n") and t1.started == "the context"
    assert t2.value().endswith(b"454 4.7.0 Error: too many new TLS sessions from 192.0.2.1\r\n")
    assert t2.started is None and not second.conn.tls_active
    second.dataReceived(b"MAIL FROM:<a@example.net>\r\n")
    assert t2.value().endswith(b"250 2.1.0 Ok\r\n")
    assert asked == ["starttls", "starttls"]
