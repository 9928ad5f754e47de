"""The check contract through a real session: results of earlier checks, the message view at end
of data (headers, the body read through the pool), header edits applied by the sink with CRLF,
the client's TLS state, and the sink's port."""
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from domain.maildir import Mailboxes, MaildirSink
from shared.blocking import InlinePool
from shared.checks.core import CONTINUE, Chain, Check, note, reject
from shared.checks.relay import relay_policy
from shared.engine.queued import QueueSink
from shared.engine.session import EngineConfig, EngineSession, Transaction
from shared.envelope import Envelope, Recipient
from shared.message import HeaderEdits, HeaderRemover, MessageView
from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory
from tests.shared.engine.test_queued import Manager, Spool

MESSAGE = (b"Subject: hello\r\nX-Spam-Flag: YES\r\n  folded on\r\nX-Keep: 1\r\n\r\n"
           b"body line\r\nX-Spam-Flag: in the body stays\r\n")


def session(tmp_path, checks):
    clock = Clock()
    boxes = Mailboxes(str(tmp_path / "mail"), ["example.org"], ["alice@example.org"], {})
    sink = MaildirSink(boxes, pool=InlinePool(), hostname="mx")
    factory = SMTPServerFactory.single(
        reactor=clock, server_config=ServerConfig(hostname="mx.test"),
        handler_factory=lambda proto: EngineSession(
            proto, config=EngineConfig("mx.test"), chain=Chain(checks, reactor=clock),
            relay=relay_policy(["example.org"], []), sink=sink, reactor=clock, listener="mx"))
    proto = factory.buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    proto.makeConnection(t)
    return proto, t


def send(proto, t, body=MESSAGE):
    t.clear()
    proto.dataReceived(b"EHLO client.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
                       b"DATA\r\n")
    proto.dataReceived(body + b".\r\n")
    return t.value().decode()


def delivered(tmp_path):
    new = tmp_path / "mail" / "example.org" / "alice" / "Maildir" / "new"
    files = sorted(new.iterdir())
    assert len(files) == 1
    return files[0].read_bytes()


def test_end_of_data_sees_the_message_and_earlier_results_and_its_edits_reach_the_mailbox(tmp_path):
    seen = {}

    def at_rcpt(req):
        return note({"listed": False})

    def at_data(req):
        return note(add=[("X-Data-Check", "ran")])

    def at_end(req):
        seen["results"] = dict(req.results)
        seen["listener"] = req.listener
        seen["subject"] = req.message.get("subject")
        seen["headers"] = req.message.headers
        d = req.message.read_body()
        d.addCallback(lambda body: seen.__setitem__("body", body))
        return d.addCallback(lambda _: note("scanned", add=[("X-Scan", "clean\n\tfolded by a check with LF")],
                                            remove=["x-spam-flag"]))

    proto, t = session(tmp_path, [Check("lists", "rcpt", at_rcpt), Check("hdr", "data", at_data),
                                  Check("scan", "end_of_data", at_end)])
    reply = send(proto, t)
    assert "250 2.0.0 Ok: delivered as" in reply
    assert seen["results"]["lists"].result == {"listed": False} and "hdr" in seen["results"]
    assert seen["listener"] == "mx"
    assert seen["subject"] == "hello"
    assert ("X-Spam-Flag", "YES  folded on") in seen["headers"]       # RFC 5322 unfolding keeps the WSP
    assert seen["body"].startswith(b"Received: from client.example") and seen["body"].endswith(MESSAGE)
    text = delivered(tmp_path)
    head, _, body = text.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <s@example.net>"
    assert lines[1:3] == [b"X-Scan: clean", b"\tfolded by a check with LF"]     # CRLF, whatever the check wrote
    assert lines[3].startswith(b"Received: from client.example")
    assert b"X-Data-Check: ran" in lines and b"X-Keep: 1" in lines
    assert b"X-Spam-Flag" not in head and b"folded on" not in head
    assert body == b"body line\r\nX-Spam-Flag: in the body stays\r\n"
    assert b"\n" not in text.replace(b"\r\n", b"")


def test_a_rejecting_end_of_data_check_stores_nothing(tmp_path):
    proto, t = session(tmp_path, [Check("virus", "end_of_data",
                                        lambda req: reject(554, "5.7.1", "infected: Eicar-Signature"))])
    assert "554 5.7.1 infected: Eicar-Signature" in send(proto, t)
    assert not (tmp_path / "mail" / "example.org" / "alice" / "Maildir" / "new").exists() or \
        not list((tmp_path / "mail" / "example.org" / "alice" / "Maildir" / "new").iterdir())


def test_results_before_mail_belong_to_the_session_and_after_it_to_the_transaction(tmp_path):
    seen = []
    proto, t = session(tmp_path, [Check("greet", "helo", lambda req: note("greeted")),
                                  Check("look", "rcpt", lambda req: seen.append(dict(req.results)) or CONTINUE)])
    send(proto, t)
    proto.dataReceived(b"MAIL FROM:<t@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert [set(r) for r in seen] == [{"greet"}, {"greet"}]
    assert seen[0]["greet"].result == "greeted"


class Message:
    qid, size, body = "Q1", 0, None

    def __init__(self):
        self.committed = None

    def write(self, data):
        self.size += len(data)

    def commit(self, envelope):
        self.committed = envelope
        return defer.succeed(None)

    def contents(self):
        return defer.succeed(b"Subject: x\r\n\r\nhi\r\n")


def test_the_queue_keeps_the_edits_with_the_envelope_for_delivery_to_apply():
    m, mgr = Message(), Manager()
    s = QueueSink(Spool(m), mgr).session(None)
    txn = Transaction("Q1", Envelope(sender="s@example.net", recipients=[Recipient("a@example.org")]))
    assert s.data_start(txn) is None
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    out = []
    s.body_reader(txn)().addCallback(out.append)
    assert out == [b"Subject: x\r\n\r\nhi\r\n"]
    txn.edits = HeaderEdits(add=(("X-Spam-Score", "1.5"),), remove=frozenset({"X-Spam-Flag"}))
    s.data_end(txn)
    assert m.committed.header_edits == txn.edits and mgr.notified[0][1][0].header_edits == txn.edits
    assert Envelope.from_json(m.committed.to_json()).header_edits == txn.edits


def test_header_remover_works_across_chunk_boundaries():
    r = HeaderRemover(frozenset({"x-a"}))
    message = b"X-A: 1\r\n 2\r\nB: 3\r\nX-a: 4\r\n\r\nX-A: body\r\n"
    out = b"".join(r.feed(message[i:i + 3]) for i in range(0, len(message), 3)) + r.flush()
    assert out == b"B: 3\r\n\r\nX-A: body\r\n"


def test_message_view_parses_folded_fields():
    v = MessageView(b"Subject: a\r\n b\r\nTo: x@example.org\r\n", 0)
    assert v.headers == (("Subject", "a b"), ("To", "x@example.org"))
    assert v.get("SUBJECT") == "a b" and v.get_all("cc") == []


def test_the_auth_phase_runs_its_checks_and_only_then_the_session_is_the_users(tmp_path):
    seen = []

    def per_user(req):
        seen.append((req.phase, req.login, req.mechanism))
        return reject(535, "5.7.8", "Authentication credentials invalid") if req.login == "mallory" else CONTINUE
    proto, t = session(tmp_path, [Check("users", "auth", per_user)])
    engine = proto.handler
    out = []
    engine.authenticated("mallory", "PLAIN").addCallback(out.append)
    assert out[0].reply.code == 535 and engine.client.login is None
    engine.authenticated("alice", "CRAM-MD5").addCallback(out.append)
    assert engine.client.login == "alice"
    assert seen == [("auth", "mallory", "PLAIN"), ("auth", "alice", "CRAM-MD5")]
