"""The sans-I/O SMTP server core: sequence, syntax, framing, limits.

Most tests go through :func:`talk`, which runs the same client input twice —
each send delivered whole, then byte by byte — and asserts that both runs give
the same events (consecutive DataChunks merged) and the same reply octets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from shared.smtp import events as ev
from shared.smtp.events import NEED_DATA, PAUSED, LocalProtocolError
from shared.smtp.reply import Reply
from shared.smtp.server import ServerConfig, ServerConnection, State

HOST = "mx.test"
QUEUED = Reply(250, "2.0.0", "Ok: queued as 4ABC")
EOF = object()          # a "send" meaning: the client closes the connection


def default_answer(event: ev.Event) -> Reply | None:
    return QUEUED if isinstance(event, ev.DataEnd) else None


class Peer:
    """Plays the adapter: feeds input, takes events, answers decisions at once."""

    def __init__(self, answers: dict | None = None, *, tls_available=False, tls_active=False,
                 xclient_allowed=False, greeting: Reply | None = None, **config) -> None:
        self.conn = ServerConnection(ServerConfig(HOST, **config), tls_available=tls_available,
                                     tls_active=tls_active, xclient_allowed=xclient_allowed)
        self.answers = answers or {}
        self.events: list[ev.Event] = []
        self.conn.send_greeting(greeting)
        self.greeting = self.conn.data_to_send()
        self.out = bytearray()

    def answer(self, event: ev.Event) -> Reply | None:
        a = self.answers.get(type(event), default_answer)
        return a(event) if callable(a) else a

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            self.events.append(event)
            if isinstance(event, ev.StartTLS):
                self.conn.tls_started()
            if event.needs_reply:
                self.conn.respond(self.answer(event))
        self.out += self.conn.data_to_send()

    def send(self, data: bytes, split: int | None = None) -> None:
        if data is EOF:
            self.conn.receive_data(b"")
            self.pump()
            return
        step = split or max(len(data), 1)
        for i in range(0, len(data), step):
            self.conn.receive_data(data[i:i + step])
            self.pump()


def merge_chunks(events: list[ev.Event]) -> list[ev.Event]:
    """Join consecutive DataChunks, and drop those of a message that was then aborted.

    How much content is handed out before a problem shows depends on how the input
    was split; the application throws it away at DataAborted in any case.
    """
    merged: list[ev.Event] = []
    for e in events:
        if isinstance(e, ev.DataChunk) and merged and isinstance(merged[-1], ev.DataChunk):
            merged[-1] = ev.DataChunk(merged[-1].data + e.data)
        elif isinstance(e, ev.DataAborted) and merged and isinstance(merged[-1], ev.DataChunk):
            merged[-1] = e
        else:
            merged.append(e)
    return merged


@dataclass
class Transcript:
    events: list[ev.Event]
    out: bytes
    conn: ServerConnection = field(repr=False)
    streamed: bytes = b""          # all DataChunk content of the byte-by-byte run, unfiltered

    @property
    def lines(self) -> list[str]:
        return self.out.decode("utf-8").split("\r\n")[:-1]

    @property
    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    @property
    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, ev.DataChunk))

    def of(self, kind: type) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


def talk(*sends: bytes, answers: dict | None = None, **kw) -> Transcript:
    """Run the sends whole and byte by byte; both must agree.  Returns the transcript."""
    runs = []
    for split in (None, 1):
        peer = Peer(answers, **kw)
        for data in sends:
            peer.send(data, split)
        streamed = b"".join(e.data for e in peer.events if isinstance(e, ev.DataChunk))
        runs.append(Transcript(merge_chunks(peer.events), bytes(peer.out), peer.conn, streamed))
    whole, by_byte = runs
    assert whole.events == by_byte.events
    assert whole.out == by_byte.out
    assert whole.conn.state == by_byte.conn.state
    return whole


EHLO = b"EHLO client.test\r\n"
TXN = EHLO + b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\n"


def message(body: bytes) -> bytes:
    return TXN + b"DATA\r\n" + body


# -- greeting and EHLO --------------------------------------------------------

def test_default_greeting_and_refusal_greeting():
    assert Peer().greeting == b"220 mx.test ESMTP\r\n"
    p = Peer(greeting=Reply(554, "5.7.1", "go away"))
    assert p.greeting == b"554 5.7.1 go away\r\n" and p.conn.closing
    p.send(EHLO)
    assert p.events == [] and p.out == b"" and p.conn.next_event() is PAUSED


def test_input_before_greeting_waits_for_it():
    conn = ServerConnection(ServerConfig(HOST))
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is PAUSED and conn.data_to_send() == b""
    conn.send_greeting()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"220 mx.test ESMTP\r\n250 2.0.0 Ok\r\n"


def test_greeting_misuse_is_a_local_error():
    conn = ServerConnection(ServerConfig(HOST))
    with pytest.raises(LocalProtocolError):
        conn.send_greeting(Reply(250, None, "hi"))
    conn.send_greeting()
    with pytest.raises(LocalProtocolError):
        conn.send_greeting()


def test_ehlo_lists_extensions_by_what_is_available():
    t = talk(EHLO, tls_available=True, xclient_allowed=True)
    assert t.events == [ev.Hello("EHLO", "client.test")]
    assert t.lines == [
        "250-mx.test", "250-PIPELINING", "250-SIZE 10240000", "250-8BITMIME", "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES", "250-DSN", "250-CHUNKING", "250-STARTTLS",
        "250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT TLS",
        "250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
    ]
    t = talk(EHLO, tls_available=True, tls_active=True, smtputf8=False, max_message_size=0)
    assert t.lines == ["250-mx.test", "250-PIPELINING", "250-SIZE", "250-8BITMIME",
                       "250-ENHANCEDSTATUSCODES", "250-DSN", "250 CHUNKING"]
    assert t.conn.esmtp and t.conn.helo == "client.test" and t.conn.state is State.READY


def test_helo_reply_and_syntax():
    t = talk(b"HELO client.test\r\n")
    assert t.lines == ["250 mx.test"] and not t.conn.esmtp
    t = talk(b"HELO\r\nEHLO two words\r\n")
    assert t.lines == ["501 5.5.4 Syntax: HELO hostname", "501 5.5.4 Syntax: EHLO hostname"]
    assert t.events == []


def test_rejected_hello_leaves_session_without_helo():
    t = talk(EHLO + b"MAIL FROM:<a@b.test>\r\n",
             answers={ev.Hello: Reply(550, "5.7.1", "bad HELO")})
    assert t.lines == ["550 5.7.1 bad HELO", "503 5.5.1 Error: send HELO/EHLO first"]
    assert t.conn.helo is None


def test_app_reply_to_ehlo_is_written_as_is():
    t = talk(EHLO, answers={ev.Hello: Reply(250, None, "custom\nPIPELINING")})
    assert t.lines == ["250-custom", "250 PIPELINING"] and t.conn.esmtp


# -- sequence -------------------------------------------------------------------

def test_out_of_sequence_commands():
    t = talk(b"MAIL FROM:<a@b.test>\r\n" + EHLO + b"RCPT TO:<a@b.test>\r\nDATA\r\n"
             b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n")
    assert t.lines[0] == "503 5.5.1 Error: send HELO/EHLO first"
    assert t.lines[-5:] == ["503 5.5.1 Error: need MAIL command", "503 5.5.1 Error: need RCPT command",
                            "250 2.1.0 Ok", "503 5.5.1 Error: nested MAIL command",
                            "503 5.5.1 Error: need RCPT command"]
    assert "DataStart" not in t.names


def test_data_after_all_recipients_refused_is_554_without_event():
    refuse = {ev.RcptTo: Reply(550, "5.1.1", "User unknown")}
    t = talk(TXN + b"DATA\r\nQUIT\r\n", answers=refuse)
    assert t.lines[-3:] == ["550 5.1.1 User unknown", "554 5.5.1 No valid recipients", "221 2.0.0 Bye"]
    assert "DataStart" not in t.names


def test_commands_are_case_insensitive_and_space_after_colon_is_tolerated():
    t = talk(b"ehlo client.test\r\nmail from: <a@b.test> size=10 body=8bitmime\r\n"
             b"rcpt To:<c@d.test> notify=success,delay\r\ndata\r\n.\r\n")
    assert t.of(ev.MailFrom) == [ev.MailFrom("a@b.test", size=10, body="8BITMIME")]
    assert t.of(ev.RcptTo) == [ev.RcptTo("c@d.test", notify=("SUCCESS", "DELAY"))]
    assert t.of(ev.DataEnd) == [ev.DataEnd(0)]


def test_rset_and_ehlo_reset_the_transaction():
    t = talk(TXN + b"RSET\r\nRCPT TO:<b@rcpt.test>\r\n")
    assert t.names[-1] == "Reset" and t.lines[-2:] == ["250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"]
    t = talk(TXN + b"EHLO again.test\r\nRCPT TO:<b@rcpt.test>\r\n")
    assert t.names[-2:] == ["Reset", "Hello"]
    assert t.lines[-1] == "503 5.5.1 Error: need MAIL command"
    t = talk(b"RSET x\r\n")
    assert t.lines == ["501 5.5.4 Syntax: RSET"]


def test_core_owned_commands():
    t = talk(b"NOOP\r\nNOOP with args\r\nVRFY root\r\nVRFY\r\nEXPN staff\r\nHELP\r\n"
             b"AUTH PLAIN AGFhAGI=\r\nFOO\r\n\r\n   \r\n")
    assert t.lines == [
        "250 2.0.0 Ok", "250 2.0.0 Ok",
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
        "501 5.5.4 Syntax: VRFY address", "502 5.5.1 Error: command not implemented",
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS",
        "502 5.5.1 Error: authentication not enabled",
        "500 5.5.2 Error: command not recognized", "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: bad syntax",
    ]
    assert t.events == []


def test_quit_closes_and_ignores_the_rest():
    t = talk(b"QUIT\r\nNOOP\r\n")
    assert t.lines == ["221 2.0.0 Bye"] and t.events == [ev.Quit()]
    assert t.conn.closing and t.conn.next_event() is PAUSED and t.conn.buffered == 0


def test_http_request_is_refused_and_closed():
    t = talk(b"POST / HTTP/1.1\r\nHost: mx.test\r\n\r\nMAIL FROM:<a@b.test>\r\n")
    assert t.lines == ["221 2.7.0 Error: this is an SMTP server, not an HTTP server"]
    assert t.conn.closing and t.events == []


# -- MAIL and RCPT ----------------------------------------------------------------

def test_mail_parameters_are_decoded():
    t = talk(EHLO + b"MAIL FROM:<a@b.test> SIZE=1000 BODY=7bit SMTPUTF8 RET=hdrs ENVID=QQ+2Bx+3D1\r\n")
    assert t.of(ev.MailFrom) == [ev.MailFrom("a@b.test", size=1000, body="7BIT", smtputf8=True,
                                             ret="HDRS", envid="QQ+x=1")]


@pytest.mark.parametrize("params, reply", [
    (b"FOO=1", "555 5.5.4 Unsupported parameter FOO"),
    (b"AUTH=<>", "555 5.5.4 Unsupported parameter AUTH"),
    (b"SIZE=1 SIZE=2", "501 5.5.4 Bad parameter syntax"),
    (b"size=1 SIZE=2", "501 5.5.4 Bad parameter syntax"),
    (b"SIZE=abc", "501 5.5.4 Bad SIZE parameter"),
    (b"SIZE", "501 5.5.4 Bad SIZE parameter"),
    (b"SIZE=10240001", "552 5.3.4 Message size exceeds fixed limit"),
    (b"BODY=BINARYMIME", "501 5.5.4 Bad BODY parameter"),
    (b"RET=ALL", "501 5.5.4 Bad RET parameter"),
    (b"SMTPUTF8=yes", "501 5.5.4 Bad SMTPUTF8 parameter"),
    (b"ENVID=" + b"x" * 101, "501 5.5.4 Bad ENVID parameter"),
    (b"ENVID=a+0Db", "501 5.5.4 Bad ENVID parameter"),
    (b"ENVID=a+zz", "501 5.5.4 Bad ENVID parameter"),
    (b"=1", "501 5.5.4 Bad parameter syntax"),
])
def test_bad_mail_parameters(params, reply):
    t = talk(EHLO + b"MAIL FROM:<a@b.test> " + params + b"\r\n")
    assert t.lines[-1] == reply and "MailFrom" not in t.names


def test_parameters_after_helo_and_smtputf8_disabled():
    t = talk(b"HELO c.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\n")
    assert t.lines[-1] == "555 5.5.4 Parameters not allowed after HELO, use EHLO"
    t = talk(EHLO + b"MAIL FROM:<a@b.test> SMTPUTF8\r\n", smtputf8=False)
    assert t.lines[-1] == "555 5.5.4 Unsupported parameter SMTPUTF8"


def test_unicode_addresses_need_smtputf8():
    sender = "jöran@bücher.test".encode()
    t = talk(EHLO + b"MAIL FROM:<" + sender + b">\r\n")
    assert t.lines[-1] == "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
    t = talk(EHLO + b"MAIL FROM:<" + sender + b"> SMTPUTF8\r\nRCPT TO:<" + sender + b">\r\n")
    assert t.of(ev.MailFrom)[0].sender == "jöran@bücher.test"
    assert t.of(ev.RcptTo)[0].recipient == "jöran@bücher.test"
    t = talk(TXN + b"RCPT TO:<" + sender + b">\r\n")
    assert t.lines[-1] == "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
    t = talk(EHLO + b"MAIL FROM:<" + sender + b">\r\n", smtputf8=False)
    assert t.lines[-1] == "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


def test_sender_forms():
    t = talk(EHLO + b"MAIL FROM:<>\r\nRSET\r\nMAIL FROM:<@relay.test,@r2.test:a@b.test>\r\nRSET\r\n"
             b"MAIL FROM:<\"john doe\"@b.test>\r\n")
    assert [e.sender for e in t.of(ev.MailFrom)] == ["", "a@b.test", '"john doe"@b.test']


@pytest.mark.parametrize("arg", [b"FROM:a@b.test", b"FROM:<a@b.test", b"FROM:<a@@b.test>", b"FROM:<a b@c.test>",
                                 b"FROM:<a@b.test>SIZE=1", b"FROM:<a@-b.test>", b"FROM:<" + b"a" * 65 + b"@b.test>"])
def test_bad_sender_syntax(arg):
    t = talk(EHLO + b"MAIL " + arg + b"\r\n")
    assert t.lines[-1] == "501 5.1.7 Bad sender address syntax"


def test_mail_without_from():
    t = talk(EHLO + b"MAIL TO:<a@b.test>\r\nMAIL\r\n")
    assert t.lines[-2:] == ["501 5.5.4 Syntax: MAIL FROM:<address>"] * 2


def test_rcpt_parameters_and_forms():
    t = talk(TXN + b"RCPT TO:<c@d.test> NOTIFY=NEVER ORCPT=rfc822;c+40d.test\r\n"
             b"RCPT TO:<Postmaster>\r\nRCPT TO:<[192.0.2.1]@x.test>\r\nRCPT TO:<u@[IPv6:2001:db8::1]>\r\n")
    assert t.of(ev.RcptTo)[1:] == [ev.RcptTo("c@d.test", notify=("NEVER",), orcpt="rfc822;c@d.test"),
                                   ev.RcptTo("Postmaster"), ev.RcptTo("u@[IPv6:2001:db8::1]")]
    assert t.lines[-2:] == ["501 5.1.3 Bad recipient address syntax", "250 2.1.5 Ok"]


@pytest.mark.parametrize("line, reply", [
    (b"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<c@d.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter"),
    (b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Bad NOTIFY parameter"),
    (b"RCPT TO:<c@d.test> NOTIFY", "501 5.5.4 Bad NOTIFY parameter"),
    (b"RCPT TO:<c@d.test> ORCPT=c@d.test", "501 5.5.4 Bad ORCPT parameter"),
    (b"RCPT TO:<c@d.test> SIZE=1", "555 5.5.4 Unsupported parameter SIZE"),
    (b"RCPT FROM:<c@d.test>", "501 5.5.4 Syntax: RCPT TO:<address>"),
])
def test_bad_rcpt(line, reply):
    t = talk(TXN + line + b"\r\n")
    assert t.lines[-1] == reply and len(t.of(ev.RcptTo)) == 1


def test_too_many_recipients_is_flow_control_not_an_error():
    rcpts = b"".join(b"RCPT TO:<u%d@d.test>\r\n" % i for i in range(4))
    t = talk(EHLO + b"MAIL FROM:<a@b.test>\r\n" + rcpts + b"DATA\r\n.\r\n", max_recipients=2,
             hard_error_limit=2)
    assert t.lines[-5:] == ["250 2.1.5 Ok", "452 4.5.3 Too many recipients", "452 4.5.3 Too many recipients",
                            "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as 4ABC"]
    assert len(t.of(ev.RcptTo)) == 2 and not t.conn.closing


# -- pipelining -------------------------------------------------------------------

def test_pipelined_commands_wait_for_each_decision():
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    conn.data_to_send()
    conn.receive_data(TXN + b"NOOP\r\n")
    assert conn.next_event() == ev.Hello("EHLO", "client.test")
    assert conn.next_event() is PAUSED and conn.data_to_send() == b""
    assert conn.buffered == len(TXN) + 6 - len(EHLO)
    conn.respond(None)
    assert conn.next_event() == ev.MailFrom("a@sender.test")
    assert conn.next_event() is PAUSED
    conn.respond(Reply(451, "4.7.1", "try later"))
    # RCPT is now answered by the core (no MAIL), then NOOP, all in order
    assert conn.next_event() is NEED_DATA
    lines = conn.data_to_send().split(b"\r\n")
    assert lines[0] == b"250-mx.test" and lines[-4:] == [
        b"451 4.7.1 try later", b"503 5.5.1 Error: need MAIL command", b"250 2.0.0 Ok", b""]


def test_respond_misuse():
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    with pytest.raises(LocalProtocolError):
        conn.respond(None)
    conn.receive_data(TXN + b"DATA\r\n.\r\n")
    assert isinstance(conn.next_event(), ev.Hello)
    conn.respond(None)
    assert isinstance(conn.next_event(), ev.MailFrom)
    with pytest.raises(LocalProtocolError):
        conn.respond(Reply(354, None, "go"))
    with pytest.raises(LocalProtocolError):
        conn.respond("250 ok")
    conn.respond(None)
    assert isinstance(conn.next_event(), ev.RcptTo)
    conn.respond(None)
    assert conn.next_event() == ev.DataStart()
    with pytest.raises(LocalProtocolError):
        conn.respond(Reply(250, "2.0.0", "Ok"))
    conn.respond(None)
    assert conn.next_event() == ev.DataEnd(0)
    with pytest.raises(LocalProtocolError):
        conn.respond(None)
    conn.respond(QUEUED)
    assert conn.next_event() is NEED_DATA


# -- DATA ---------------------------------------------------------------------------

def test_simple_message_and_dot_unstuffing():
    body = b"..first\r\nSubject: x\r\n\r\n..dot\r\n.lead\r\n...\r\nend.\r\n.\r\nQUIT\r\n"
    t = talk(message(body))
    assert t.content == b".first\r\nSubject: x\r\n\r\n.dot\r\nlead\r\n..\r\nend.\r\n"
    assert t.of(ev.DataEnd) == [ev.DataEnd(len(t.content))]
    assert t.lines[-3:] == ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as 4ABC",
                            "221 2.0.0 Bye"]
    assert t.names[-3:] == ["DataChunk", "DataEnd", "Quit"]


def test_empty_message():
    t = talk(message(b".\r\nNOOP\r\n"))
    assert t.of(ev.DataChunk) == [] and t.of(ev.DataEnd) == [ev.DataEnd(0)]
    assert t.lines[-1] == "250 2.0.0 Ok" and t.conn.state is State.READY


def test_message_split_across_sends():
    t = talk(message(b"line one\r"), b"\n.", b".", b"x\r", b"\nline two\r\n.", b"\r", b"\n")
    assert t.content == b"line one\r\n.x\r\nline two\r\n"
    assert t.of(ev.DataEnd) == [ev.DataEnd(24)]


def test_second_message_in_same_session():
    t = talk(message(b"one\r\n.\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\ntwo\r\n.\r\n"))
    assert [e.size for e in t.of(ev.DataEnd)] == [5, 5]
    assert [e.data for e in t.events if isinstance(e, ev.DataChunk)] == [b"one\r\n", b"two\r\n"]


def test_data_rejected_by_app_keeps_command_mode():
    t = talk(message(b"NOOP\r\n"), answers={ev.DataStart: Reply(451, "4.3.0", "later")})
    assert t.lines[-2:] == ["451 4.3.0 later", "250 2.0.0 Ok"] and t.conn.state is State.RCPT


def test_data_with_argument():
    t = talk(TXN + b"DATA now\r\n")
    assert t.lines[-1] == "501 5.5.4 Syntax: DATA"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
                                      b"\r\n.\rX\r\n", b"\n\r.\r\n", b"\r\n\n.\r\n"])
def test_smuggled_end_of_data_never_ends_the_message(fake_end):
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nforged\r\n"
    t = talk(message(b"Subject: hi\r\n\r\ntext" + fake_end + smuggled + b".\r\nNOOP\r\n"))
    assert len(t.of(ev.MailFrom)) == 1 and len(t.of(ev.RcptTo)) == 1
    assert t.of(ev.DataAborted) == [ev.DataAborted(Reply(554, "5.6.0", "Message contains bare CR or LF"))]
    assert t.lines[-2:] == ["554 5.6.0 Message contains bare CR or LF", "250 2.0.0 Ok"]
    assert b"evil" not in t.streamed and "DataEnd" not in t.names


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"\n", b"\r\r\n", b"ab\r", b"a\r\n\r"])
def test_bare_cr_or_lf_anywhere_aborts(body):
    t = talk(message(body + b"\r\n.\r\n"))
    assert t.names[-1] == "DataAborted" and t.lines[-1] == "554 5.6.0 Message contains bare CR or LF"


def test_long_data_line_answered_once_at_the_end():
    ok_line = b"x" * 998 + b"\r\n"
    t = talk(message(ok_line * 3 + b".\r\n"))
    assert t.content == ok_line * 3 and t.names[-1] == "DataEnd"
    long_line = b"y" * 999 + b"\r\n"
    t = talk(message(ok_line + long_line + ok_line * 70 + b".\r\nNOOP\r\n"))
    assert t.lines[-2:] == ["554 5.6.0 Message line too long", "250 2.0.0 Ok"]
    assert t.of(ev.DataAborted) == [ev.DataAborted(Reply(554, "5.6.0", "Message line too long"))]
    assert b"y" * 999 not in t.streamed and t.names.count("DataAborted") == 1


def test_data_line_limit_counts_stuffing_and_can_be_disabled():
    t = talk(message(b"." + b"x" * 998 + b"\r\n.\r\n"))
    assert t.names[-1] == "DataAborted"
    t = talk(message(b"z" * 5000 + b"\r\n.\r\n"), max_data_line=0)
    assert t.content == b"z" * 5000 + b"\r\n"


def test_message_size_limit():
    t = talk(message(b"12345678\r\n.\r\n"), max_message_size=10)
    assert t.of(ev.DataEnd) == [ev.DataEnd(10)]
    t = talk(message(b"123456789\r\n.\r\nNOOP\r\n"), max_message_size=10)
    assert t.lines[-2:] == ["552 5.3.4 Message size exceeds fixed limit", "250 2.0.0 Ok"]
    assert t.names[-1] == "DataAborted"
    t = talk(message(b"..345678\r\n.\r\n"), max_message_size=9)     # counted after unstuffing
    assert t.of(ev.DataEnd) == [ev.DataEnd(9)]


def test_bare_newline_wins_over_other_problems_whatever_the_split():
    t = talk(message(b"y" * 2000 + b"\r\nbare\nlf\r\n.\r\n"), max_message_size=100)
    assert t.lines[-1] == "554 5.6.0 Message contains bare CR or LF"


def test_big_message_gives_few_chunks():
    line = b"m" * 998 + b"\r\n"
    body = line * 5000                       # 5 MB
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    conn.receive_data(message(b""))
    for _ in range(4):                       # Hello, MailFrom, RcptTo, DataStart
        conn.next_event()
        conn.respond(None)
    assert conn.state is State.DATA
    chunks = []
    stream = body + b".\r\n"
    started = time.perf_counter()
    for i in range(0, len(stream), 65536):
        conn.receive_data(stream[i:i + 65536])
        while (e := conn.next_event()) is not NEED_DATA:
            assert isinstance(e, (ev.DataChunk, ev.DataEnd)), e
            if isinstance(e, ev.DataChunk):
                chunks.append(e.data)
            else:
                conn.respond(QUEUED)
                assert e.size == len(body)
    elapsed = time.perf_counter() - started
    assert len(chunks) <= 200
    assert b"".join(chunks) == body
    assert elapsed < 5          # generous; typically a few tens of milliseconds


# -- command lines --------------------------------------------------------------------

def test_command_line_length_limit():
    fits = b"NOOP " + b"x" * (2048 - 7) + b"\r\n"
    assert len(fits) == 2048
    t = talk(fits + b"NOOP " + b"x" * (2048 - 6) + b"\r\nNOOP\r\n")
    assert t.lines == ["250 2.0.0 Ok", "500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_unterminated_long_line_is_cut_and_buffer_stays_bounded():
    p = Peer()
    for _ in range(100):
        p.send(b"A" * 1000)
        assert p.conn.buffered < 2048
    p.send(b"still the same line\r\nNOOP\r\n")
    assert p.out.decode().split("\r\n")[:-1] == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_bare_lf_ends_commands_but_bare_cr_does_not():
    t = talk(b"NOOP\nNOOP\rNOOP\r\nNOOP\r\r\n")
    assert t.lines == ["250 2.0.0 Ok", "500 5.5.2 Error: bad syntax", "500 5.5.2 Error: bad syntax"]


def test_control_characters_and_bad_utf8_in_commands():
    t = talk(b"NOOP\x00\r\nMAIL FROM:<\xff@x.test>\r\n")
    assert t.lines == ["500 5.5.2 Error: bad syntax", "500 5.5.2 Error: bad UTF-8 syntax"]


# -- STARTTLS -------------------------------------------------------------------------

def test_starttls_refusals():
    assert talk(EHLO + b"STARTTLS\r\n").lines[-1] == "502 5.5.1 Error: command not implemented"
    assert talk(EHLO + b"STARTTLS\r\n", tls_available=True, tls_active=True).lines[-1] == \
        "503 5.5.1 Error: TLS already active"
    assert talk(EHLO + b"STARTTLS now\r\n", tls_available=True).lines[-1] == "501 5.5.4 Syntax: STARTTLS"
    assert talk(TXN + b"STARTTLS\r\n", tls_available=True).lines[-1] == \
        "503 5.5.1 Error: MAIL transaction in progress"


def test_starttls_discards_pipelined_plaintext_and_forgets_helo():
    conn = ServerConnection(ServerConfig(HOST), tls_available=True)
    conn.send_greeting()
    conn.receive_data(EHLO)
    conn.next_event()
    conn.respond(None)
    conn.data_to_send()
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert conn.next_event() == ev.StartTLSRequest()          # the application decides
    conn.receive_data(b"RCPT TO:<evil@x.test>\r\n")          # still plaintext: held, not parsed
    assert conn.next_event() is PAUSED and conn.data_to_send() == b""
    conn.respond(None)
    assert conn.next_event() == ev.StartTLS()
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    assert conn.buffered == 0 and conn.state is State.TLS
    conn.receive_data(b"EHLO over.tls\r\n")                 # arrives before the switch: kept, not parsed
    assert conn.next_event() is PAUSED and conn.buffered == 15
    conn.tls_started()
    assert conn.tls_active and conn.helo is None
    assert conn.next_event() == ev.Hello("EHLO", "over.tls")
    conn.respond(None)
    assert b"STARTTLS" not in conn.data_to_send()
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


def test_starttls_refused_by_the_application_stays_in_plaintext():
    t = talk(EHLO, b"STARTTLS\r\nNOOP\r\n", tls_available=True,
             answers={ev.StartTLSRequest: Reply(454, "4.7.0", "Error: too many new TLS sessions")})
    assert t.lines[-2:] == ["454 4.7.0 Error: too many new TLS sessions", "250 2.0.0 Ok"]
    assert not t.conn.tls_active and t.conn.state is State.READY and "StartTLS" not in t.names
    conn = ServerConnection(ServerConfig(HOST), tls_available=True)
    conn.send_greeting()
    conn.receive_data(EHLO + b"STARTTLS\r\n")
    conn.next_event()
    conn.respond(None)
    assert conn.next_event() == ev.StartTLSRequest()
    with pytest.raises(LocalProtocolError, match="must be 220"):
        conn.respond(Reply(250, "2.0.0", "Ok"))


def test_after_starttls_ehlo_is_required_again():
    t = talk(EHLO, b"STARTTLS\r\n", b"MAIL FROM:<a@b.test>\r\n", tls_available=True)
    assert t.lines[-2:] == ["220 2.0.0 Ready to start TLS", "503 5.5.1 Error: send HELO/EHLO first"]
    assert t.conn.tls_active


# -- XCLIENT / XFORWARD -------------------------------------------------------------------

def test_xclient_denied_to_untrusted_peer():
    t = talk(EHLO + b"XCLIENT ADDR=192.0.2.1\r\nXFORWARD NAME=x\r\n")
    assert t.lines[-2:] == ["550 5.7.0 Insufficient authorization"] * 2
    assert t.names == ["Hello"]


def test_xclient_restarts_the_session():
    t = talk(EHLO + b"XCLIENT NAME=mail.example.org addr=192.0.2.1 PORT=4242 HELO=+5Bx+5D LOGIN=\r\n"
                    b"MAIL FROM:<a@b.test>\r\n", xclient_allowed=True)
    assert t.of(ev.XClient) == [ev.XClient({"NAME": "mail.example.org", "ADDR": "192.0.2.1", "PORT": "4242",
                                            "HELO": "[x]", "LOGIN": ""})]
    assert t.lines[-2:] == ["220 mx.test ESMTP", "503 5.5.1 Error: send HELO/EHLO first"]


@pytest.mark.parametrize("line, reply", [
    (b"XCLIENT", "501 5.5.4 Bad XCLIENT syntax: no attributes"),
    (b"XCLIENT FOO=1", "501 5.5.4 Bad XCLIENT syntax: unknown attribute name"),
    (b"XCLIENT NAME", "501 5.5.4 Bad XCLIENT syntax: attribute without value"),
    (b"XCLIENT NAME=a NAME=b", "501 5.5.4 Bad XCLIENT syntax: duplicate attribute NAME"),
    (b"XCLIENT HELO=a+0D+0Ab", "501 5.5.4 Bad XCLIENT syntax: control character in value"),
    (b"XFORWARD LOGIN=x", "501 5.5.4 Bad XFORWARD syntax: unknown attribute name"),
])
def test_bad_xclient(line, reply):
    t = talk(EHLO + line + b"\r\n", xclient_allowed=True)
    assert t.lines[-1] == reply and t.names == ["Hello"]


def test_xclient_in_transaction_and_refused_by_app():
    t = talk(TXN + b"XCLIENT ADDR=1.2.3.4\r\n", xclient_allowed=True)
    assert t.lines[-1] == "503 5.5.1 Error: MAIL transaction in progress"
    t = talk(EHLO + b"XCLIENT ADDR=1.2.3.4\r\nMAIL FROM:<a@b.test>\r\n", xclient_allowed=True,
             answers={ev.XClient: Reply(550, "5.7.0", "no")})
    assert t.lines[-2:] == ["550 5.7.0 no", "250 2.1.0 Ok"]


def test_xforward():
    t = talk(EHLO + b"XFORWARD NAME=spike.porcupine.org ADDR=168.100.189.2 PROTO=ESMTP\r\n"
                    b"XFORWARD IDENT=abc SOURCE=REMOTE\r\n", xclient_allowed=True)
    assert t.of(ev.XForward) == [
        ev.XForward({"NAME": "spike.porcupine.org", "ADDR": "168.100.189.2", "PROTO": "ESMTP"}),
        ev.XForward({"IDENT": "abc", "SOURCE": "REMOTE"})]
    assert t.lines[-2:] == ["250 2.0.0 Ok"] * 2


# -- errors and the end of the connection ------------------------------------------------------

def test_too_many_errors():
    t = talk(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n", hard_error_limit=3)
    assert t.lines == ["500 5.5.2 Error: command not recognized"] * 3 + [
        "421 4.7.0 mx.test Error: too many errors"]
    assert t.events == [ev.TooManyErrors()] and t.conn.closing


def test_app_rejections_count_and_delivery_resets_the_count():
    refuse_bad = {ev.RcptTo: lambda e: Reply(550, "5.1.1", "unknown") if e.recipient.startswith("bad")
                  else None}
    bad = b"RCPT TO:<bad@d.test>\r\n"
    t = talk(TXN + bad + bad + b"DATA\r\n.\r\nMAIL FROM:<a@b.test>\r\n" + bad + bad + b"NOOP\r\n",
             answers=refuse_bad, hard_error_limit=3)
    assert t.lines[-1] == "250 2.0.0 Ok" and not t.conn.closing
    t = talk(TXN + bad + bad + bad + b"NOOP\r\n", answers=refuse_bad, hard_error_limit=3)
    assert t.lines[-2:] == ["550 5.1.1 unknown", "421 4.7.0 mx.test Error: too many errors"]
    assert t.names[-1] == "TooManyErrors"


def test_a_client_that_only_talks_is_closed_after_the_junk_command_limit():
    """NOOP, RSET, VRFY and HELP cost a reply each and move no mail: past the limit
    each one is an error, so a flood of them ends at the error limit."""
    junk = b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n" * 2
    t = talk(EHLO + junk + b"NOOP\r\n" * 3, junk_command_limit=8, hard_error_limit=2)
    assert t.lines[-3:] == ["250 2.0.0 Ok", "250 2.0.0 Ok", "421 4.7.0 mx.test Error: too many errors"]
    assert t.names[-1] == "TooManyErrors"
    # mail delivered starts the count over; 0 is no limit
    t = talk(EHLO + junk + b"DATA\r\n".join([b"MAIL FROM:<a@s.test>\r\nRCPT TO:<b@r.test>\r\n",
                                              b".\r\n"]) + junk + b"QUIT\r\n",
             junk_command_limit=8, hard_error_limit=1)
    assert t.lines[-1].startswith("221") and "TooManyErrors" not in t.names
    t = talk(EHLO + junk * 50 + b"QUIT\r\n", junk_command_limit=0, hard_error_limit=1)
    assert t.lines[-1].startswith("221")


def test_a_421_answer_closes_the_session():
    t = talk(TXN + b"NOOP\r\n", answers={ev.RcptTo: Reply(421, "4.7.0", "mx.test closing")})
    assert t.lines[-1] == "421 4.7.0 mx.test closing" and t.conn.closing
    assert t.names == ["Hello", "MailFrom", "RcptTo"]


def test_aborted_data_counts_as_an_error():
    t = talk(message(b"a\nb\r\n.\r\n"), hard_error_limit=1)
    assert t.names[-2:] == ["DataAborted", "TooManyErrors"]
    assert t.lines[-2:] == ["554 5.6.0 Message contains bare CR or LF", "421 4.7.0 mx.test Error: too many errors"]


def test_eof_in_data_abandons_the_transaction():
    t = talk(message(b"partial\r\n"), EOF)
    assert t.names[-2:] == ["DataChunk", "ConnectionClosed"] and t.conn.closing
    assert t.conn.next_event() is PAUSED


def test_eof_drops_unprocessed_input_but_waits_for_pending_decision():
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    conn.receive_data(EHLO + b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(conn.next_event(), ev.Hello)
    conn.receive_data(b"")
    assert conn.next_event() is PAUSED
    conn.respond(None)
    assert conn.next_event() == ev.ConnectionClosed()
    assert conn.next_event() is PAUSED and conn.buffered == 0
    conn.receive_data(b"NOOP\r\n")
    assert conn.buffered == 0


def test_hold_back_is_at_most_two_octets():
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    conn.receive_data(message(b""))
    for _ in range(4):
        conn.next_event()
        conn.respond(None)
    conn.receive_data(b"abc\r\n.\r")
    assert conn.next_event() == ev.DataChunk(b"abc\r\n")
    assert conn.next_event() is NEED_DATA and conn.buffered == 2
    conn.receive_data(b"\n")
    assert conn.next_event() == ev.DataEnd(5)


def test_config_validation():
    for bad in (dict(hostname=""), dict(hostname="mx test"), dict(hostname="mx\r\n"),
                dict(hostname="mx", max_command_line=100), dict(hostname="mx", max_recipients=-1),
                dict(hostname="mx", banner="a\r\nb")):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
