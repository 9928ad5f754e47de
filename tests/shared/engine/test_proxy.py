"""The edge's before-queue proxy against a scripted next-hop session."""
import pytest
from twisted.internet import defer

from shared.engine.proxy import ProxySink
from shared.engine.session import Transaction
from shared.envelope import ClientInfo, Envelope, Recipient
from shared.smtp.reply import Reply
from shared.transport.pool import NextHopUnavailable

OK = Reply(250, "2.0.0", "Ok")


class Upstream:
    """Records commands; answers from `replies` (verb -> Reply), pipelining like a real session."""

    def __init__(self, extensions=("PIPELINING", "XFORWARD"), replies=None):
        self.extensions = {e: "" for e in extensions}
        self.replies = replies or {}
        self.log = []
        self.usable = True
        self.aborted = False
        self.protocol = self
        self.transport = self
        self.writable = True
        self.conn = type("Conn", (), {"crlf_checked": False})()

    def abort(self):
        self.aborted = True
        self.usable = False

    def content_checked(self):
        self.conn.crlf_checked = True

    def _cmd(self, verb, *args):
        self.log.append((verb, *args))
        return defer.succeed(self.replies.get(verb, OK))

    def xforward(self, attrs):
        return self._cmd("XFORWARD", dict(attrs))

    def mail(self, sender, **kw):
        return self._cmd("MAIL", sender)

    def rcpt(self, address, **kw):
        return self._cmd("RCPT", address)

    def data(self):
        return self._cmd("DATA")

    def send_data(self, chunk):
        self.log.append(("BYTES", chunk))

    def is_writable(self):
        return self.writable

    def end_data(self):
        return self._cmd("END")

    def rset(self):
        return self._cmd("RSET")

    def close(self):
        self.log.append(("QUIT",))
        return defer.succeed(None)

    relay = "filter[127.0.0.1]:10025"


class RelayClient:
    def __init__(self, upstream=None):
        self.upstream = upstream
        self.opened = []
        self.released = []

    def release(self, session):
        self.released.append(session)

    def open_session(self, client):
        self.opened.append(client)
        if self.upstream is None:
            return defer.fail(NextHopUnavailable(Reply(451, "4.4.1", "connect: refused")))
        return defer.succeed(self.upstream)


class Port:
    """What the proxy may use of the client's session (shared.engine.session.SinkPort)."""
    paused = False

    def __init__(self):
        self.client = ClientInfo(addr="192.0.2.1", helo="c.example")
        self.txn = None

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    @property
    def queue_id(self):
        return self.txn.queue_id if self.txn else None


def result(d):
    """A handler's answer: given at once (a plain value) or by a Deferred that has fired."""
    if not isinstance(d, defer.Deferred):
        return d
    out = []
    d.addBoth(out.append)
    return out[0]


def start(upstream, qid="EQID"):
    engine = Port()
    session = ProxySink(RelayClient(upstream)).session(engine)
    txn = Transaction(qid, Envelope(sender="s@example.net", recipients=[]))
    engine.txn = txn
    return engine, session, txn


def in_data(up=None):
    """A session whose transaction has reached DATA (MAIL, one RCPT, DATA answered 354)."""
    up = up or Upstream(replies={"DATA": Reply(354, None, "go")})
    engine, s, txn = start(up)
    s.begin(txn)
    s.rcpt(txn, Recipient("a@example.org"))
    s.data_start(txn)
    return up, engine, s, txn


def test_mail_travels_with_the_first_rcpt_and_the_reply_names_our_queue_id():
    up = Upstream(replies={"DATA": Reply(354, None, "go"), "END": Reply(250, "2.0.0", "Ok: queued as FQID")})
    engine, s, txn = start(up)
    assert result(s.begin(txn)) is None
    assert up.log == []                                       # nothing sent yet
    assert result(s.rcpt(txn, Recipient("a@example.org"))) is None
    assert up.log == [("XFORWARD", {"IDENT": "EQID"}), ("MAIL", "s@example.net"), ("RCPT", "a@example.org")]
    assert up.conn.crlf_checked          # the edge's core already refused bare CR/LF
    assert result(s.rcpt(txn, Recipient("b@example.org"))) is None
    assert up.log[-1] == ("RCPT", "b@example.org")
    assert result(s.data_start(txn)) is None
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    reply = result(s.data_end(txn))
    assert (reply.code, reply.text) == (250, "Ok: queued as EQID")


def test_a_refused_mail_is_every_rcpts_answer():
    refusal = Reply(550, "5.7.1", "sender rejected")
    up = Upstream(replies={"MAIL": refusal, "RCPT": Reply(503, "5.5.1", "need MAIL")})
    engine, s, txn = start(up)
    s.begin(txn)
    assert result(s.rcpt(txn, Recipient("a@example.org"))) is refusal
    assert result(s.rcpt(txn, Recipient("b@example.org"))) is refusal
    assert [c[0] for c in up.log] == ["XFORWARD", "MAIL", "RCPT"]


def test_without_pipelining_mail_is_answered_at_mail():
    up = Upstream(extensions=(), replies={"MAIL": Reply(451, "4.7.1", "later")})
    engine, s, txn = start(up)
    assert result(s.begin(txn)) == Reply(451, "4.7.1", "later")


def test_unreachable_next_hop_is_a_tempfail_at_mail():
    engine, s, txn = start(None)
    reply = result(s.begin(txn))
    assert (reply.code, reply.enhanced) == (451, "4.4.1")


def test_abort_in_data_drops_the_connection_instead_of_finishing_the_message():
    up, engine, s, txn = in_data()
    s.write(b"half a message")
    s.abort(txn)
    assert up.aborted and ("END",) not in up.log
    # the next transaction opens a new connection
    s.begin(Transaction("EQID2", Envelope(sender="", recipients=[])))
    assert len(s.sink.relay_client.opened) == 2


def test_full_next_hop_buffer_pauses_the_client():
    up = Upstream(replies={"DATA": Reply(354, None, "go")})
    waiter = defer.Deferred()
    up.wait_writable = lambda: waiter
    up, engine, s, txn = in_data(up)
    s.write(b"Received: ...\r\n")
    up.writable = False
    s.write(b"x" * 100)
    assert engine.paused
    waiter.callback(None)
    assert not engine.paused


def test_received_header_goes_out_with_the_first_bytes_or_at_the_end():
    up, engine, s, txn = in_data()
    s.write(b"Received: x\r\n")
    assert [c for c in up.log if c[0] == "BYTES"] == []
    s.write(b"Subject: y\r\n\r\n")
    s.write(b"body\r\n")
    assert [c[1] for c in up.log if c[0] == "BYTES"] == [b"Received: x\r\nSubject: y\r\n\r\n", b"body\r\n"]
    # an empty message: the header alone goes at end of data
    up2, engine, s, txn = in_data()
    s.write(b"Received: x\r\n")
    result(s.data_end(txn))
    assert [c for c in up2.log if c[0] in ("BYTES", "END")] == [("BYTES", b"Received: x\r\n"), ("END",)]


class Lost(Upstream):
    """An upstream whose connection breaks at a given command."""

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at = at

    def _cmd(self, verb, *args):
        self.log.append((verb, *args))
        if verb == self.at:
            self.usable = False
            return defer.fail(ConnectionError("connection lost"))
        return defer.succeed(self.replies.get(verb, OK))


@pytest.mark.parametrize("at, step", [("MAIL", "rcpt"), ("RCPT", "rcpt"), ("DATA", "data_start"),
                                      ("END", "data_end")])
def test_a_connection_lost_mid_transaction_is_451_and_dropped(at, step):
    from twisted.logger import capturedLogs
    up = Lost(at, replies={"DATA": Reply(354, None, "go")})
    engine, s, txn = start(up)
    with capturedLogs() as events:
        s.begin(txn)
        reply = result(s.rcpt(txn, Recipient("a@example.org")))
        if step != "rcpt":
            assert reply is None
            reply = result(s.data_start(txn))
        if step == "data_end":
            assert reply is None
            s.write(b"Subject: x\r\n\r\nhi\r\n")
            reply = result(s.data_end(txn))
    assert (reply.code, reply.enhanced) == (451, "4.4.2")
    assert up.aborted and s.upstream is None and s.failed
    assert [e["what"] for e in events if "what" in e] == [{"rcpt": "RCPT"}.get(step, {
        "data_start": "DATA", "data_end": "end of data"}.get(step))]
    # the next transaction gets a new connection
    assert result(s.begin(txn)) is None and len(s.sink.relay_client.opened) == 2


def test_the_connection_goes_back_to_the_relay_client_between_transactions():
    up = Upstream(replies={"DATA": Reply(354, None, "go")})
    engine, s, txn = start(up)
    relay = s.sink.relay_client
    s.begin(txn)
    s.rcpt(txn, Recipient("a@example.org"))
    engine.client = ClientInfo(addr="192.0.2.1", helo="new.example")    # a second EHLO
    s.begin(txn)                  # the next transaction: the new identity is announced
    assert relay.released == [up] and relay.opened[-1].helo == "new.example"
    s.close()
    assert relay.released == [up, up] and not up.aborted
    _, _, s2, _ = in_data()
    s2.close()                    # gone in the middle of DATA: never reused
    assert s2.sink.relay_client.released == [] and s2.sink.relay_client.upstream.aborted


@pytest.mark.parametrize("asked,named", [("quarantine", "quarantine"), ("edits", "header edits")])
def test_what_the_edge_cannot_do_with_a_streamed_message_is_451_and_no_final_dot(asked, named):
    """Quarantine and header edits need the message held: the edge refuses, never delivers
    it without what the check asked, and says in its log where the check belongs."""
    from twisted.logger import capturedLogs, formatEvent

    from shared.message import HeaderEdits
    up, engine, s, txn = in_data()
    s.write(b"Subject: x\r\n\r\nhi\r\n")
    if asked == "quarantine":
        txn.quarantine = "test"
    else:
        txn.edits = HeaderEdits(add=(("X-Test", "yes"),))
    with capturedLogs() as events:
        reply = result(s.data_end(txn))
    assert (reply.code, reply.enhanced) == (451, "4.3.0") and "configuration" in reply.text
    assert ("END",) not in up.log and up.aborted
    [line] = [formatEvent(e) for e in events]
    assert line.startswith(f"EQID: an end_of_data check asked for {named}, ")
    assert line.endswith("run that check at the filter")
