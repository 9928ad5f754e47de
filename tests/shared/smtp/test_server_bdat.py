"""BDAT (CHUNKING, RFC 3030) in the server core: framing by count, the same content
checks as DATA, the replies to each chunk, and what a refused chunk leaves behind.

Most tests go through :func:`talk` (tests/shared/smtp/test_server.py), which runs
the input whole and byte by byte and asserts that both give the same events and
replies.
"""
from __future__ import annotations

import random
import time

from shared.smtp import events as ev
from shared.smtp.client import DataEncoder
from shared.smtp.events import NEED_DATA, PAUSED
from shared.smtp.reply import Reply
from shared.smtp.server import ServerConfig, ServerConnection, State
from tests.shared.smtp.test_server import EHLO, HOST, TXN, Peer, talk

BARE = "554 5.6.0 Message contains bare CR or LF"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
LONG = "554 5.6.0 Message line too long"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"


def bdat(*chunks: bytes) -> bytes:
    """`chunks` as BDAT commands, the last one with LAST."""
    out = b""
    for i, c in enumerate(chunks):
        out += b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
    return out


def received(*sizes: int) -> list[str]:
    return [f"250 2.0.0 {n} octets received" for n in sizes]


# -- the message ---------------------------------------------------------------------

def test_a_chunked_message_is_the_message_sent_with_data():
    content = (b"Subject: chunks\r\n\r\n.\r\n.x\r\n..two\r\nline\r\n"
               b"\r\n.\r\nMAIL FROM:<inside@content.test>\r\nend\r\n")
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    by_data = talk(TXN + b"DATA\r\n" + stuffed + b".\r\n")
    rng = random.Random(5)
    cuts = sorted(rng.sample(range(1, len(content)), 6))
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)])]
    by_bdat = talk(TXN + bdat(*pieces) + b"QUIT\r\n")
    assert by_bdat.content == by_data.content == content
    assert by_bdat.of(ev.DataEnd) == by_data.of(ev.DataEnd) == [ev.DataEnd(len(content))]
    assert by_bdat.of(ev.DataStart) == [ev.DataStart(bdat=True)]
    assert by_data.of(ev.DataStart) == [ev.DataStart(bdat=False)]
    assert len(by_bdat.of(ev.MailFrom)) == 1
    assert by_bdat.lines[-9:] == ["250 2.1.5 Ok", *received(*map(len, pieces[:-1])),
                                  "250 2.0.0 Ok: queued as 4ABC", "221 2.0.0 Bye"]
    assert not any(line.startswith("354") for line in by_bdat.lines)
    assert by_bdat.names[-3:] == ["DataChunk", "DataEnd", "Quit"]


def test_chunking_is_advertised_and_binarymime_is_not():
    t = talk(EHLO + b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n")
    keywords = [line[4:] for line in t.lines[1:-1]]
    assert "CHUNKING" in keywords and not any("BINARYMIME" in k for k in keywords)
    assert t.lines[-1] == "501 5.5.4 Bad BODY parameter"


def test_pipelined_envelope_and_chunks_are_answered_in_order():
    t = talk(EHLO + b"MAIL FROM:<a@s.test>\r\nRCPT TO:<nobody@r.test>\r\nRCPT TO:<b@r.test>\r\n"
             + bdat(b"Subject: p\r\n", b"\r\n", b"body\r\n") + b"NOOP\r\n",
             answers={ev.RcptTo: lambda e: Reply(550, "5.1.1", "unknown") if "nobody" in e.recipient
                      else None})
    assert t.lines[-7:] == ["250 2.1.0 Ok", "550 5.1.1 unknown", "250 2.1.5 Ok", *received(12, 2),
                            "250 2.0.0 Ok: queued as 4ABC", "250 2.0.0 Ok"]
    assert t.content == b"Subject: p\r\n\r\nbody\r\n" and t.conn.state is State.READY


def test_the_application_can_answer_the_first_chunk_slowly():
    conn = ServerConnection(ServerConfig(HOST))
    conn.send_greeting()
    rest = b"ab\r\ncdBDAT 2 LAST\r\n\r\n"
    conn.receive_data(TXN + b"BDAT 6\r\n" + rest)
    for _ in range(3):
        conn.next_event()
        conn.respond(None)
    assert conn.next_event() == ev.DataStart(bdat=True)
    assert conn.next_event() is PAUSED and conn.buffered == len(rest)     # nothing read meanwhile
    conn.data_to_send()
    conn.respond(Reply(354, None, "go ahead"))       # an answer written for DATA is "go on" too
    assert conn.data_to_send() == b""
    assert conn.next_event() == ev.DataChunk(b"ab\r\ncd")
    assert conn.next_event() == ev.DataChunk(b"\r\n")
    assert conn.next_event() == ev.DataEnd(8)
    assert conn.data_to_send() == b"250 2.0.0 6 octets received\r\n"


def test_bdat_0_last_ends_the_message():
    t = talk(TXN + bdat(b"") + b"NOOP\r\n")
    assert t.of(ev.DataEnd) == [ev.DataEnd(0)] and t.of(ev.DataChunk) == []
    assert t.lines[-2:] == ["250 2.0.0 Ok: queued as 4ABC", "250 2.0.0 Ok"]
    t = talk(TXN + b"BDAT 4\r\nhi\r\nBDAT 0\r\nBDAT 0 LAST\r\n")
    assert t.content == b"hi\r\n" and t.lines[-3:] == [*received(4, 0), "250 2.0.0 Ok: queued as 4ABC"]


def test_a_message_gets_its_last_line_end():
    t = talk(TXN + bdat(b"Subject: x\r\n\r\nno line end"))
    assert t.content == b"Subject: x\r\n\r\nno line end\r\n" and t.of(ev.DataEnd) == [ev.DataEnd(27)]
    t = talk(TXN + bdat(b"Subject: x\r", b"\n\r\nsplit CRLF\r", b"\n"))   # CRLF across chunks is fine
    assert t.content == b"Subject: x\r\n\r\nsplit CRLF\r\n" and t.names[-1] == "DataEnd"


def test_chunk_octets_split_anyhow_give_the_same_message():
    body = b"".join(b"line %d .\r\n.%d\r\n" % (i, i) for i in range(300))
    session = TXN + bdat(body[:1000], body[1000:1001], body[1001:5000], body[5000:])
    expected = None
    for seed in range(5):
        rng = random.Random(seed)
        p = Peer()
        i = 0
        while i < len(session):
            n = rng.choice([1, 2, 3, 7, 100, 4096])
            p.send(session[i:i + n])
            i += n
        content = b"".join(e.data for e in p.events if isinstance(e, ev.DataChunk))
        assert content == body
        assert expected is None or bytes(p.out) == expected
        expected = bytes(p.out)
    tail = [*received(1000, 1, 3999), "250 2.0.0 Ok: queued as 4ABC"]
    assert expected.endswith(b"".join(line.encode() + b"\r\n" for line in tail))


def test_a_huge_chunk_streams_without_being_buffered():
    piece = (b"z" * 998 + b"\r\n") * 1024        # about 1 MB: a few reads' worth
    size = 100 * len(piece)
    conn = ServerConnection(ServerConfig(HOST, max_message_size=0))
    conn.send_greeting()
    conn.receive_data(TXN + b"BDAT %d LAST\r\n" % size)
    for _ in range(4):                           # Hello, MailFrom, RcptTo, DataStart
        conn.next_event()
        conn.respond(None)
    assert conn.state is State.CHUNK and conn.chunk_ahead == size
    got, ends = 0, []
    started = time.perf_counter()
    for _ in range(100):
        conn.receive_data(piece)
        while (e := conn.next_event()) is not NEED_DATA and e is not PAUSED:
            if isinstance(e, ev.DataEnd):
                ends.append(e)
                continue
            assert isinstance(e, ev.DataChunk) and len(e.data) <= len(piece)
            got += len(e.data)
        assert conn.buffered == 0                # handed out as it came, never held
    elapsed = time.perf_counter() - started
    assert got == size and ends == [ev.DataEnd(size)] and conn.chunk_ahead == 0
    assert elapsed < 20          # generous; typically well under a second


# -- sequence ---------------------------------------------------------------------------

def test_bdat_before_mail_skips_its_octets_even_when_they_look_like_commands():
    inside = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n"
    t = talk(EHLO + bdat(inside) + b"NOOP\r\n")
    assert t.names == ["Hello"]
    assert t.lines[-2:] == [NEED_RCPT, "250 2.0.0 Ok"]
    t = talk(bdat(b"EHLO evil\r\n") + b"NOOP\r\n")        # before HELO too
    assert t.events == [] and t.lines == [NEED_RCPT, "250 2.0.0 Ok"]
    t = talk(TXN + bdat(b"hi\r\n") + bdat(b"RSET\r\n") + b"NOOP\r\n")   # after the LAST
    assert t.lines[-3:] == ["250 2.0.0 Ok: queued as 4ABC", NEED_RCPT, "250 2.0.0 Ok"]
    assert "Reset" not in t.names


def test_bdat_without_a_valid_recipient():
    refuse = {ev.RcptTo: Reply(550, "5.1.1", "User unknown")}
    t = talk(TXN + bdat(b"RSET\r\n") + b"NOOP\r\n", answers=refuse)
    assert t.lines[-3:] == ["550 5.1.1 User unknown", "554 5.5.1 No valid recipients", "250 2.0.0 Ok"]
    assert "DataStart" not in t.names and "Reset" not in t.names
    t = talk(EHLO + b"MAIL FROM:<a@b.test>\r\n" + bdat(b"QUIT\r\n") + b"NOOP\r\n")
    assert t.lines[-2:] == [NEED_RCPT, "250 2.0.0 Ok"] and t.conn.state is State.MAIL


def test_data_or_rcpt_after_bdat_is_503():
    t = talk(TXN + b"BDAT 5\r\none\r\nDATA\r\nRCPT TO:<c@rcpt.test>\r\nBDAT 5 LAST\r\ntwo\r\n")
    assert t.lines[-4:] == [*received(5), "503 5.5.1 Error: DATA after BDAT", "503 5.5.1 Error: RCPT after BDAT",
                            "250 2.0.0 Ok: queued as 4ABC"]
    assert t.content == b"one\r\ntwo\r\n" and len(t.of(ev.RcptTo)) == 1


def test_rset_ehlo_and_quit_between_chunks():
    t = talk(TXN + b"BDAT 5\r\none\r\nRSET\r\n" + bdat(b"two\r\n") + b"NOOP\r\n")
    assert t.names[-2:] == ["DataChunk", "Reset"] and "DataEnd" not in t.names
    assert t.lines[-4:] == [*received(5), "250 2.0.0 Ok", NEED_RCPT, "250 2.0.0 Ok"]
    assert t.conn.state is State.READY
    t = talk(TXN + b"BDAT 5\r\none\r\nEHLO again.test\r\nMAIL FROM:<x@y.test>\r\n")
    assert t.names[-3:] == ["Reset", "Hello", "MailFrom"] and t.conn.state is State.MAIL
    t = talk(TXN + b"BDAT 5\r\none\r\nQUIT\r\n")
    assert t.names[-1] == "Quit" and t.lines[-1] == "221 2.0.0 Bye" and t.conn.closing


def test_commands_that_need_no_transaction_are_refused_between_chunks():
    t = talk(TXN + b"BDAT 5\r\none\r\nMAIL FROM:<x@y.test>\r\nXCLIENT ADDR=192.0.2.1\r\nSTARTTLS\r\n"
             b"NOOP\r\n" + bdat(b"two\r\n"), tls_available=True, xclient_allowed=True)
    assert t.lines[-6:] == [*received(5), "503 5.5.1 Error: nested MAIL command",
                            "503 5.5.1 Error: MAIL transaction in progress",
                            "503 5.5.1 Error: MAIL transaction in progress", "250 2.0.0 Ok",
                            "250 2.0.0 Ok: queued as 4ABC"]
    assert t.content == b"one\r\ntwo\r\n" and "StartTLS" not in t.names


def test_bad_bdat_syntax_is_501():
    t = talk(TXN + b"BDAT\r\nBDAT x\r\nBDAT -1\r\nBDAT 123456789012345678901\r\nNOOP\r\n")
    assert t.lines[-5:] == ["501 5.5.4 Syntax: BDAT size [LAST]"] * 4 + ["250 2.0.0 Ok"]
    # A size that can be read keeps the framing: the octets are skipped.
    t = talk(TXN + b"BDAT 6 FIRST\r\nRSET\r\nNOOP\r\n" + bdat(b"ok\r\n"))
    assert t.lines[-3:] == ["501 5.5.4 Syntax: BDAT size [LAST]", "250 2.0.0 Ok", "250 2.0.0 Ok: queued as 4ABC"]
    assert "Reset" not in t.names
    t = talk(TXN + b"bdat 4 last\r\nok\r\n")                 # case does not matter
    assert t.content == b"ok\r\n" and t.names[-1] == "DataEnd"


# -- a refused chunk ----------------------------------------------------------------------

def test_a_refused_first_chunk_and_its_followers_are_skipped_and_answered_alike():
    later = Reply(451, "4.3.0", "try later")
    inside = b"RCPT TO:<evil@x.test>\r\n"
    t = talk(TXN + b"BDAT %d\r\n" % len(inside) + inside + b"BDAT 6\r\nQUIT\r\n" + b"BDAT 6 LAST\r\nRSET\r\n"
             + b"NOOP\r\nDATA\r\n", answers={ev.DataStart: later}, hard_error_limit=3)
    assert t.lines[-5:] == ["451 4.3.0 try later"] * 3 + ["250 2.0.0 Ok", "503 5.5.1 Error: DATA after BDAT"]
    assert t.names[-1] == "DataStart" and len(t.of(ev.RcptTo)) == 1
    assert not t.conn.closing and t.conn.state is State.RCPT        # open, as after a refused DATA
    # After the refused message's LAST, a new message may be tried in the open transaction.
    answers = iter([later, None])
    p = Peer({ev.DataStart: lambda e: next(answers)})
    p.send(TXN + bdat(b"one\r\n", b"two\r\n") + bdat(b"three\r\n"))
    assert p.out.decode().split("\r\n")[-4:] == ["451 4.3.0 try later"] * 2 + ["250 2.0.0 Ok: queued as 4ABC", ""]
    assert [e for e in p.events if isinstance(e, ev.DataChunk)] == [ev.DataChunk(b"three\r\n")]


def test_a_refusal_to_the_first_chunk_is_not_followed_by_a_354():
    t = talk(TXN + bdat(b"x\r\n"), answers={ev.DataStart: Reply(554, "5.7.1", "no mail from you")})
    assert t.lines[-1] == "554 5.7.1 no mail from you"
    t = talk(TXN + bdat(b"x\r\n"), answers={ev.DataStart: Reply(421, "4.3.2", "going down")})
    assert t.lines[-1] == "421 4.3.2 going down" and t.conn.closing


# -- content checks ------------------------------------------------------------------------

def test_bare_lf_is_answered_at_its_chunk_and_the_rest_is_skipped():
    t = talk(TXN + bdat(b"Subject: x\r\n", b"bare\nlf\r\n", b"RCPT TO:<x@y.test>\r\n", b"QUIT\r\n")
             + b"NOOP\r\n", hard_error_limit=2)
    assert t.lines[-5:] == [*received(12), BARE, BARE, BARE, "250 2.0.0 Ok"]
    assert t.of(ev.DataAborted) == [ev.DataAborted(Reply(554, "5.6.0", "Message contains bare CR or LF"))]
    assert "DataEnd" not in t.names and "Quit" not in t.names and len(t.of(ev.RcptTo)) == 1
    assert not t.conn.closing and t.conn.state is State.READY       # counted once
    # the transaction is over: a new one may start at once
    t = talk(TXN + bdat(b"a\rb\r\n") + TXN[len(EHLO):] + bdat(b"good\r\n"))
    assert t.lines[-4:] == [BARE, "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued as 4ABC"]
    assert t.of(ev.DataEnd) == [ev.DataEnd(6)]


def test_a_lone_cr_at_the_very_end_is_bare():
    t = talk(TXN + bdat(b"text\r"))
    assert t.lines[-1] == BARE and t.names[-1] == "DataAborted"
    t = talk(TXN + bdat(b"text\r", b""))
    assert t.lines[-2:] == [*received(5), BARE]


def test_size_limit_across_chunks():
    t = talk(TXN + bdat(b"12345\r\n", b"89\r\n"), max_message_size=11)
    assert t.of(ev.DataEnd) == [ev.DataEnd(11)]
    t = talk(TXN + bdat(b"12345\r\n", b"89\r\n", b"x\r\n", b"y\r\n") + b"NOOP\r\n", max_message_size=10)
    assert t.lines[-5:] == [*received(7), TOO_BIG, TOO_BIG, TOO_BIG, "250 2.0.0 Ok"]
    assert t.names.count("DataAborted") == 1 and "DataEnd" not in t.names
    # the added final CRLF counts: the message as stored is what is measured
    t = talk(TXN + bdat(b"1234567890"), max_message_size=11)
    assert t.lines[-1] == TOO_BIG


def test_line_length_limit_across_chunks():
    t = talk(TXN + bdat(b"x" * 500, b"x" * 498 + b"\r\n"))
    assert t.names[-1] == "DataEnd"
    t = talk(TXN + bdat(b"x" * 500, b"x" * 499 + b"\r\n"))
    assert t.lines[-2:] == [*received(500), LONG] and t.names[-1] == "DataAborted"
    t = talk(TXN + bdat(b"y" * 999))                          # the CRLF added at the end counts
    assert t.lines[-1] == LONG


def test_bare_newline_wins_over_other_problems_in_one_chunk():
    t = talk(TXN + bdat(b"y" * 2000 + b"\r\nbare\nlf\r\n"), max_message_size=100)
    assert t.lines[-1] == BARE


def test_empty_chunks_count_as_junk():
    t = talk(TXN + b"BDAT 0\r\n" * 4, junk_command_limit=2, hard_error_limit=2)
    assert t.lines[-3:] == [*received(0, 0), "421 4.7.0 mx.test Error: too many errors"]
    assert t.names[-1] == "TooManyErrors"


# -- the next hop ------------------------------------------------------------------------------

def test_content_relayed_with_data_arrives_unchanged_and_commands_stay_content():
    """BDAT content handed to the client's DATA encoder, as the edge's proxy and the
    filter's delivery do, and read by a second server: the same octets, one transaction."""
    content = (b"Subject: relay\r\n\r\n.\r\n.x\r\n..\r\nhi\r\n.\r\nMAIL FROM:<evil@x.test>\r\n"
               b"RCPT TO:<victim@y.test>\r\nDATA\r\n.\r\n")
    first = talk(TXN + bdat(content[:20], content[20:21], content[21:]))
    assert first.content == content
    encoder = DataEncoder(crlf_checked=True)
    wire = b"".join(encoder.encode(e.data) for e in first.of(ev.DataChunk)) + encoder.finish()
    second = talk(TXN + b"DATA\r\n" + wire + b"QUIT\r\n")
    assert second.content == content and second.of(ev.DataEnd) == [ev.DataEnd(len(content))]
    assert len(second.of(ev.MailFrom)) == 1 and second.names[-1] == "Quit"
