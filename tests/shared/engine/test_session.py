"""The engine session between the adapter and a sink: what a failing sink leaves behind."""
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from shared.checks.core import Chain
from shared.checks.relay import relay_policy
from shared.engine.session import EngineConfig, EngineSession
from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory


class Sink:
    """A sink session whose answers the test sets; records aborts."""

    def __init__(self, begin=None, data_end=None):
        self.answers = {"begin": begin, "data_end": data_end}
        self.aborted = 0

    def session(self, engine_session):
        return self

    def begin(self, txn):
        return self.answers["begin"]

    def rcpt(self, txn, recipient):
        return None

    def data_start(self, txn):
        return None

    def write(self, chunk):
        pass

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
