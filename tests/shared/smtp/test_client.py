"""The sans-I/O SMTP client: reply parsing, command sequencing, parameters,
xtext, and the DATA encoder."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from shared.smtp.client import (MAX_LINE, MAX_REPLY_LINES, NEED_DATA, ClientConnection,
                                DataEncoder, LocalProtocolError, RemoteProtocolError, State)
from shared.smtp.reply import Reply
from shared.smtp.syntax import xtext_encode

EHLO_FULL = (b"250-mx.example.org Hello\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
             b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n"
             b"250-STARTTLS\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n"
             b"250 XFORWARD NAME ADDR IDENT\r\n")
EHLO_PLAIN = b"250-mx.example.org\r\n250 ENHANCEDSTATUSCODES\r\n"


def feed(conn: ClientConnection, data: bytes) -> list[Reply]:
    conn.receive_data(data)
    out = []
    while (r := conn.next_reply()) is not NEED_DATA:
        out.append(r)
    return out


def ready(ehlo: bytes = EHLO_FULL) -> ClientConnection:
    conn = ClientConnection()
    assert feed(conn, b"220 mx.example.org ESMTP\r\n")[0].code == 220
    assert conn.state is State.GREETED
    conn.ehlo("relay.example.net")
    [reply] = feed(conn, ehlo)
    assert reply.code == 250 and conn.state is State.READY
    return conn


# ---- reply parsing ---------------------------------------------------------

def test_greeting_then_ehlo_extensions():
    conn = ready()
    assert conn.extensions["SIZE"] == "1000000"
    assert conn.extensions["PIPELINING"] == ""
    assert conn.attributes_offered("XCLIENT") == {"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"}
    assert conn.max_size == 1000000
    assert conn.pipelining


def test_multiline_reply_byte_at_a_time_matches_whole():
    data = b"220 hi\r\n" + b"250-2.1.0 first line\r\n250-2.1.0 second\r\n250 2.1.0 last\r\n"
    whole = ClientConnection()
    whole.receive_data(b"220 hi\r\n")
    whole.next_reply()
    whole.ehlo("a.example")
    whole.receive_data(data[8:])
    expected = whole.next_reply()

    conn = ClientConnection()
    got = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while (r := conn.next_reply()) is not NEED_DATA:
            got.append(r)
            if r.code == 220:
                conn.ehlo("a.example")
    assert got[1] == expected
    assert expected == Reply(250, "2.1.0", "first line\nsecond\nlast")


def test_enhanced_code_and_bare_code_line():
    conn = ready()
    conn.rset()
    assert feed(conn, b"250 2.0.0 Ok\r\n") == [Reply(250, "2.0.0", "Ok")]
    conn.noop()
    assert feed(conn, b"250\r\n") == [Reply(250, None, "")]


def test_lf_only_line_end_is_accepted():
    conn = ClientConnection()
    assert feed(conn, b"220 hi\n")[0].code == 220


@pytest.mark.parametrize("garbage", [
    b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"190 x\r\n", b"620 x\r\n", b"250_x\r\n",
    b"250-a\r\n251 b\r\n",
])
def test_garbage_reply_raises_remote_error(garbage):
    conn = ClientConnection()
    conn.receive_data(garbage)
    with pytest.raises(RemoteProtocolError):
        conn.next_reply()
    with pytest.raises(RemoteProtocolError):     # and stays broken
        conn.next_reply()
    with pytest.raises(LocalProtocolError):
        conn.quit()


def test_overlong_line_is_refused_before_its_end_arrives():
    conn = ClientConnection()
    conn.receive_data(b"220 " + b"x" * (MAX_LINE - 10))
    assert conn.next_reply() is NEED_DATA
    conn.receive_data(b"x" * 20)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        conn.next_reply()


def test_too_many_lines_in_one_reply():
    conn = ClientConnection()
    conn.receive_data(b"220-x\r\n" * (MAX_REPLY_LINES + 1))
    with pytest.raises(RemoteProtocolError, match="lines"):
        conn.next_reply()


def test_unsolicited_reply_is_an_error_but_421_closes():
    conn = ready()
    conn.receive_data(b"250 what\r\n")
    with pytest.raises(RemoteProtocolError, match="no command pending"):
        conn.next_reply()
    conn = ready()
    assert feed(conn, b"421 4.4.2 idle timeout\r\n")[0].code == 421
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.mail("a@example.org")


def test_354_to_anything_but_data_is_an_error():
    conn = ready()
    conn.rset()
    conn.receive_data(b"354 go on\r\n")
    with pytest.raises(RemoteProtocolError, match="intermediate"):
        conn.next_reply()


def test_refused_greeting_allows_only_quit():
    conn = ClientConnection()
    feed(conn, b"554 5.7.1 go away\r\n")
    assert conn.state is State.REFUSED
    with pytest.raises(LocalProtocolError):
        conn.ehlo("a.example")
    assert conn.quit() == b"QUIT\r\n"


def test_nothing_may_be_sent_before_the_greeting():
    conn = ClientConnection()
    for send in (lambda: conn.ehlo("a.example"), conn.noop, conn.quit):
        with pytest.raises(LocalProtocolError):
            send()


# ---- sequencing ---------------------------------------------------------------

def test_state_checks():
    conn = ready()
    with pytest.raises(LocalProtocolError, match="RCPT not allowed"):
        conn.rcpt("b@example.org")
    with pytest.raises(LocalProtocolError, match="DATA not allowed"):
        conn.data()
    with pytest.raises(LocalProtocolError):
        conn.send_data(b"x")
    conn.mail("a@example.org")
    with pytest.raises(LocalProtocolError, match="DATA without any RCPT"):
        conn.data()
    with pytest.raises(LocalProtocolError, match="MAIL not allowed"):
        conn.mail("a@example.org")


def test_without_pipelining_each_command_waits():
    conn = ready(EHLO_PLAIN)
    assert conn.mail("a@example.org") == b"MAIL FROM:<a@example.org>\r\n"
    with pytest.raises(LocalProtocolError, match="must wait"):
        conn.rcpt("b@example.org")
    feed(conn, b"250 2.1.0 Ok\r\n")
    conn.rcpt("b@example.org")
    feed(conn, b"250 2.1.5 Ok\r\n")
    assert conn.data() == b"DATA\r\n"


def test_pipelined_transaction_and_message():
    conn = ready()
    wire = conn.mail("a@example.org") + conn.rcpt("b@example.org") + conn.rcpt("c@example.org")
    wire += conn.data()
    assert wire.count(b"\r\n") == 4
    with pytest.raises(LocalProtocolError, match="must wait"):   # DATA ends the group
        conn.noop()
    replies = feed(conn, b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n250 2.1.5 Ok\r\n354 go\r\n")
    assert [r.code for r in replies] == [250, 550, 250, 354]
    assert conn.state is State.BODY and conn.rcpts_accepted == 1
    out = conn.send_data(b".hidden\r\nline") + conn.end_data()
    assert out == b"..hidden\r\nline\r\n.\r\n"
    with pytest.raises(LocalProtocolError):     # wait for the end-of-data reply
        conn.mail("a@example.org")
    feed(conn, b"250 2.0.0 Ok: queued as ABC\r\n")
    assert conn.state is State.READY and conn.messages_sent == 1


def test_refused_mail_in_pipeline_returns_to_ready():
    conn = ready()
    conn.mail("a@example.org")
    conn.rcpt("b@example.org")
    conn.data()
    feed(conn, b"550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n503 5.5.1 no valid recipients\r\n")
    assert conn.state is State.READY
    conn.mail("a@example.org")          # no RSET needed


def test_refused_recipients_leave_the_transaction_open():
    conn = ready()
    conn.mail("a@example.org")
    conn.rcpt("b@example.org")
    conn.data()
    feed(conn, b"250 ok\r\n550 no\r\n554 5.5.1 no valid recipients\r\n")
    assert conn.state is State.MAIL
    conn.rset()
    feed(conn, b"250 ok\r\n")
    assert conn.state is State.READY


def test_non_pipelined_mail_refused_allows_new_mail():
    conn = ready(EHLO_PLAIN)
    conn.mail("a@example.org")
    feed(conn, b"451 4.3.0 try later\r\n")
    assert conn.state is State.READY


def test_ehlo_refused_then_helo_clears_extensions():
    conn = ClientConnection()
    feed(conn, b"220 hi\r\n")
    conn.ehlo("a.example")
    feed(conn, b"502 5.5.2 no EHLO\r\n")
    assert conn.state is State.GREETED
    conn.helo("a.example")
    feed(conn, b"250 hi\r\n")
    assert conn.state is State.READY and conn.extensions == {}


def test_starttls_clears_extensions_and_refuses_early_plaintext():
    conn = ready()
    assert conn.starttls() == b"STARTTLS\r\n"
    feed(conn, b"220 2.0.0 go ahead\r\n")
    assert conn.tls and conn.extensions == {} and conn.state is State.GREETED
    with pytest.raises(LocalProtocolError):
        conn.mail("a@example.org")
    conn = ready()
    conn.starttls()
    conn.receive_data(b"220 go ahead\r\n250 injected\r\n")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        conn.next_reply()


def test_starttls_needs_offer():
    conn = ready(EHLO_PLAIN)
    with pytest.raises(LocalProtocolError, match="STARTTLS"):
        conn.starttls()


def test_quit_closes():
    conn = ready()
    assert conn.quit() == b"QUIT\r\n"
    assert conn.state is State.CLOSED
    feed(conn, b"221 bye\r\n")
    with pytest.raises(LocalProtocolError):
        conn.noop()


# ---- parameters ----------------------------------------------------------------

def test_parameters_sent_when_offered():
    conn = ready()
    line = conn.mail("ä@example.org", size=123, body="8bitmime", smtputf8=True, ret="hdrs",
                     envid="id+1=x")
    assert line == ("MAIL FROM:<ä@example.org> SIZE=123 BODY=8BITMIME SMTPUTF8 RET=HDRS "
                    "ENVID=id+2B1+3Dx\r\n").encode()
    line = conn.rcpt("b@example.org", notify=("success", "failure"),
                     orcpt="rfc822;b+x@example.org")
    assert line == b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.org\r\n"
    assert conn.rcpt("c@example.org", orcpt="c@example.org").endswith(
        b" ORCPT=rfc822;c@example.org\r\n")


def test_parameters_dropped_when_not_offered():
    conn = ready(EHLO_PLAIN)
    line = conn.mail("a@example.org", size=123, body="8BITMIME", smtputf8=True, ret="FULL",
                     envid="x")
    assert line == b"MAIL FROM:<a@example.org>\r\n"
    feed(conn, b"250 ok\r\n")
    assert conn.rcpt("b@example.org", notify=("NEVER",), orcpt="rfc822;b@example.org") == \
        b"RCPT TO:<b@example.org>\r\n"


def test_null_sender():
    assert ready().mail("") == b"MAIL FROM:<>\r\n"


@pytest.mark.parametrize("kwargs", [dict(ret="ALL"), dict(body="BINARYMIME"), dict(size=-1)])
def test_bad_mail_parameters(kwargs):
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.mail("a@example.org", **kwargs)
    assert conn.state is State.READY and conn.pending == 0      # nothing changed


@pytest.mark.parametrize("notify", [(), ("NEVER", "SUCCESS"), ("SOMETIMES",)])
def test_bad_notify(notify):
    conn = ready()
    conn.mail("a@example.org")
    with pytest.raises(LocalProtocolError, match="NOTIFY"):
        conn.rcpt("b@example.org", notify=notify)


@pytest.mark.parametrize("address", ["a@example.org\r\nRSET", "a\x00@example.org", "a\n"])
def test_command_injection_is_refused(address):
    conn = ready()
    with pytest.raises(LocalProtocolError, match="control"):
        conn.mail(address)
    conn.mail("ok@example.org")
    with pytest.raises(LocalProtocolError, match="control"):
        conn.rcpt(address)
    with pytest.raises(LocalProtocolError):
        ready().ehlo(address)


def test_non_ascii_needs_smtputf8():
    conn = ready(EHLO_PLAIN)
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.mail("ä@example.org", smtputf8=True)
    conn = ready()
    conn.mail("a@example.org")              # SMTPUTF8 offered but not asked for
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.rcpt("ö@example.org")


def test_ehlo_name_must_be_one_word():
    conn = ClientConnection()
    feed(conn, b"220 hi\r\n")
    with pytest.raises(LocalProtocolError):
        conn.ehlo("two words")


# ---- XCLIENT / XFORWARD -----------------------------------------------------------

def test_xclient_sends_only_offered_attributes_xtext_encoded():
    conn = ready()
    line = conn.xclient({"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.1", "HELO": "a b+c",
                         "DESTADDR": "198.51.100.1"})
    assert line == b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1 HELO=a+20b+2Bc\r\n"
    feed(conn, b"220 mx.example.org ESMTP\r\n")
    assert conn.state is State.GREETED      # session reset: EHLO again
    conn.ehlo("relay.example.net")


def test_xclient_refused_keeps_session():
    conn = ready()
    conn.xclient({"ADDR": "192.0.2.1"})
    feed(conn, b"550 5.7.0 not authorized\r\n")
    assert conn.state is State.READY


def test_xclient_needs_offer_and_an_accepted_attribute():
    with pytest.raises(LocalProtocolError):
        ready(EHLO_PLAIN).xclient({"ADDR": "192.0.2.1"})
    with pytest.raises(LocalProtocolError, match="no XCLIENT attribute"):
        ready().xclient({"DESTPORT": "25"})


def test_attribute_groups_fit_command_lines():
    conn = ready()
    attrs = {"NAME": "n" * 200, "ADDR": "a" * 200, "PORT": "25", "HELO": "h" * 200,
             "LOGIN": "\x01" * 1000, "DESTADDR": "x"}
    groups = conn.attribute_groups("XCLIENT", attrs)
    assert len(groups) == 2
    assert [k for g in groups for k in g] == ["NAME", "ADDR", "PORT", "HELO", "LOGIN"]
    assert groups[1]["LOGIN"] == "[UNAVAILABLE]"        # could never fit
    for g in groups:
        line = conn.xclient(g)
        assert len(line) <= 512
        feed(conn, b"220 again\r\n")
    assert ready().attribute_groups("XCLIENT", {"NAME": "x", "ADDR": "y"}) == \
        [{"NAME": "x", "ADDR": "y"}]
    assert ready(EHLO_PLAIN).attribute_groups("XFORWARD", {"IDENT": "Q1"}) == []


def test_xforward_pipelines_with_mail():
    conn = ready()
    wire = conn.xforward({"IDENT": "Q1", "ADDR": "192.0.2.1", "HELO": "x"})
    wire += conn.mail("a@example.org")
    assert wire == b"XFORWARD IDENT=Q1 ADDR=192.0.2.1\r\nMAIL FROM:<a@example.org>\r\n"


@given(st.text(max_size=30))
def test_xtext_is_printable_and_reversible(value):
    encoded = xtext_encode(value)
    assert re.fullmatch(r"[\x21-\x7e]*", encoded)
    assert "=" not in encoded
    decoded = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes.fromhex(m.group(1).decode()),
                     encoded.encode())
    assert decoded.decode("utf-8") == value


# ---- DATA encoding -------------------------------------------------------------------

def test_dot_stuffing_at_start_and_across_chunks():
    enc = DataEncoder()
    out = enc.encode(b".a\r\nb\r") + enc.encode(b"\n.c\r\n") + enc.encode(b".d") + enc.finish()
    assert out == b"..a\r\nb\r\n..c\r\n..d\r\n.\r\n"


def test_empty_message_and_no_extra_crlf():
    assert DataEncoder().finish() == b".\r\n"
    enc = DataEncoder()
    assert enc.encode(b"x\r\n") + enc.finish() == b"x\r\n.\r\n"


def test_bare_line_ends_are_normalised():
    enc = DataEncoder()
    out = enc.encode(b"a\n.\nb\r.\r") + enc.finish()
    assert out == b"a\r\n..\r\nb\r\n..\r\n.\r\n"


# Lines rich in dots; any byte but CR and LF.
line = st.lists(st.sampled_from([b".", b"..", b"a", b" ", b"\xff", b"\x00"]), max_size=6).map(b"".join)
lines = st.lists(line, max_size=12)


def unstuff(wire: bytes) -> bytes:
    end = (b"\r\n" + wire).find(b"\r\n.\r\n")
    assert end >= 0
    content = wire[:end]
    assert end + 3 == len(wire), "terminator must come only at the end"
    return (b"\r\n" + content).replace(b"\r\n..", b"\r\n.")[2:]


@settings(max_examples=300)
@given(lines.map(lambda ls: b"".join(x + b"\r\n" for x in ls)), st.data())
def test_chunking_never_changes_the_wire_and_unstuffing_restores(content, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=6)))
    whole = DataEncoder()
    expected = whole.encode(content) + whole.finish()
    enc = DataEncoder()
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)])]
    got = b"".join(enc.encode(p) for p in pieces) + enc.finish()
    assert got == expected
    assert unstuff(got) == content
    # content already checked for bare CR/LF: the lighter encoder gives the same wire bytes
    checked = DataEncoder(crlf_checked=True)
    assert b"".join(checked.encode(p) for p in pieces) + checked.finish() == expected


@given(st.binary(max_size=60), st.data())
def test_any_bytes_give_one_terminator_and_only_crlf(content, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=4)))
    enc = DataEncoder()
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)])]
    wire = b"".join(enc.encode(p) for p in pieces) + enc.finish()
    unstuff(wire)
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
