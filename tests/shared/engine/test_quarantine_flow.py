"""A quarantine through a real session: an end_of_data check's Verdict(quarantine=...) reaches
the filter's queue sink, which keeps the message in quarantine/ (the client is told 250 as
for any message) until an administrator releases it; then the queue manager delivers it
with the checks' header edits, without running them again.  The domain tier's sink, which
cannot hold a message back, refuses it."""
from __future__ import annotations

import io

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from domain.maildir import Mailboxes, MaildirSink
from shared.blocking import InlinePool
from shared.checks.core import Action, Chain, Check, Verdict, note
from shared.checks.relay import relay_policy
from shared.engine.queued import QueueSink
from shared.engine.session import EngineConfig, EngineSession
from shared.message import HeaderEdits
from shared.queue import admin
from shared.queue.store import Spool
from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory
from tests.shared.queue.helpers import T0, FakeDeliver, make_manager, messages, sync_runner

MESSAGE = b"Subject: hello\r\nX-Spam-Flag: YES\r\n\r\nbody line\r\n"


def quarantining(calls: list):
    def at_end(req):
        calls.append(req.message.get("subject"))
        return Verdict(Action.CONTINUE, quarantine="test: subject hello",
                       edits=HeaderEdits(add=(("X-Quarantined", "test"),), remove=frozenset({"x-spam-flag"})))
    return Check("quarantiner", "end_of_data", at_end)


def connect(sink, checks, clock, domains=("example.org",)):
    factory = SMTPServerFactory.single(
        reactor=clock, server_config=ServerConfig(hostname="filter.test"),
        handler_factory=lambda proto: EngineSession(
            proto, config=EngineConfig("filter.test"), chain=Chain(checks, reactor=clock),
            relay=relay_policy(list(domains), []), sink=sink, reactor=clock, listener="mx"))
    proto = factory.buildProtocol(None)
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    proto.makeConnection(t)
    return proto, t


def send(proto, t, body=MESSAGE, rcpt="alice@example.org") -> str:
    t.clear()
    proto.dataReceived(b"EHLO client.example\r\nMAIL FROM:<s@example.net>\r\n"
                       + f"RCPT TO:<{rcpt}>\r\n".encode() + b"DATA\r\n")
    proto.dataReceived(body + b".\r\n")
    return t.value().decode()


def test_a_quarantined_message_waits_for_release_then_goes_out_with_its_edits(tmp_path):
    clock = Clock()
    clock.advance(T0)
    spool = Spool(tmp_path / "spool", reactor=clock, fsync=False, runner=sync_runner)
    deliver = FakeDeliver()
    manager = make_manager(spool, deliver, clock)
    manager.start()
    calls: list = []
    proto, t = connect(QueueSink(spool, manager), [quarantining(calls), Check("later", "end_of_data",
                                                                               lambda req: note("ran"))], clock)
    with capturedLogs() as events:
        reply = send(proto, t)
        clock.advance(0)
    [qid] = spool.list("quarantine")
    assert f"250 2.0.0 Ok: queued as {qid}" in reply and "quarantin" not in reply.lower()
    lines = messages(events)
    assert f"{qid}: quarantined: test: subject hello" in lines, lines
    assert any(line.startswith(f"{qid}: from=<s@example.net>") and "quarantine=<test: subject hello>" in line
               for line in lines), lines
    clock.advance(400)                              # request polls and a rescan: never scheduled
    assert deliver.calls == [] and calls == ["hello"]

    out = io.StringIO()
    assert admin.quarantine_main(spool.root, "release", [qid], out) == 0
    with capturedLogs() as events:
        clock.advance(1)
        clock.advance(0)
    assert f"test: {qid}: released from quarantine by admin command" in messages(events)
    [[(sent_qid, env, data)]] = deliver.calls
    assert sent_qid == qid and calls == ["hello"]  # delivered, the checks not run again
    assert env.quarantine == "test: subject hello"
    assert env.header_edits.add == (("X-Quarantined", "test"),) and env.header_edits.remove == {"x-spam-flag"}
    assert data.endswith(MESSAGE)                   # as received; the edits are applied when sent
    assert spool.locate(qid) is None


def test_the_domain_tiers_sink_refuses_a_quarantine_and_delivers_nothing(tmp_path):
    clock = Clock()
    boxes = Mailboxes(str(tmp_path / "mail"), ["example.org"], ["alice@example.org"], {})
    proto, t = connect(MaildirSink(boxes, pool=InlinePool(), hostname="mx"), [quarantining([])], clock)
    with capturedLogs() as events:
        reply = send(proto, t)
    assert "451 4.3.0 Error: local configuration error" in reply, reply
    assert not any((tmp_path / "mail").rglob("new/*"))
    assert any("asked for quarantine" in line and "run that check at the filter" in line
               for line in messages(events))
