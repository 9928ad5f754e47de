"""SMTP spot checks against the running edge with raw sockets: pipelining,
end-of-data smuggling, over-long lines, STARTTLS command injection, BDAT
(smtplib has none) relayed with DATA."""
from __future__ import annotations

import time

import pytest

from tests.integration.helpers import DOMAIN, HOSTNAMES, Client, message, parse_mail, queued_id

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def test_pipelined_commands_are_answered_in_order(shared_pipeline):
    p = shared_pipeline
    before = {u: len(p.messages(u)) for u in (ALICE, BOB)}
    with Client(p.edge.port) as c:
        assert "PIPELINING" in c.ehlo().text.splitlines()
        c.send(f"MAIL FROM:<sender@example.net>\r\n"
               f"RCPT TO:<{ALICE}>\r\n"
               f"RCPT TO:<nosuchuser@{DOMAIN}>\r\n"       # refused by the domain tier, via the filter
               f"RCPT TO:<someone@elsewhere.example>\r\n"  # refused by the edge itself
               f"RCPT TO:<{BOB}>\r\n"
               f"DATA\r\n")
        got = [(r.code, r.enhanced) for r in (c.reply() for _ in range(6))]
        assert got == [(250, "2.1.0"), (250, "2.1.5"), (550, "5.1.1"), (554, "5.7.1"), (250, "2.1.5"),
                       (354, None)], got
        c.send(message("pipelined", to=ALICE) + b".\r\nNOOP\r\n")
        final = c.reply()
        assert final.code == 250, final
        queued_id(final)
        assert c.reply().code == 250           # the NOOP, after the end of data
    p.wait_messages(ALICE, before[ALICE] + 1)
    p.wait_messages(BOB, before[BOB] + 1)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"],
                         ids=["LF.LF", "CRLF.LF", "LF.CRLF", "CR.CRLF"])
def test_a_bare_newline_dot_does_not_end_data(shared_pipeline, fake_end):
    p = shared_pipeline
    before = {u: len(p.messages(u)) for u in (ALICE, BOB)}
    smuggled_sender = "smuggler@attacker.example"
    mark = {t: p.tiers[t].log_size() for t in ("edge", "filter")}
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: smuggling\r\n\r\nhello" + fake_end +
               f"MAIL FROM:<{smuggled_sender}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode() +
               b"Subject: smuggled\r\n\r\nsmuggled body\r\n")
        assert c.pending(0.3) == b"", "the server answered inside DATA"
        c.send(b".\r\n")
        final = c.reply()
        # Exactly one answer for the whole DATA, nothing for the smuggled commands.
        assert c.pending(0.5) == b"", f"more replies after the end of data: {c.buf!r}"
        assert final.code in (250, 554), final
        noop = c.cmd("NOOP")
        assert noop.code == 250, noop
        # No transaction is open: a RCPT needs a new MAIL.
        assert c.cmd(f"RCPT TO:<{BOB}>").code == 503
    for t in ("edge", "filter"):
        assert smuggled_sender not in p.tiers[t].log_text()[mark[t]:], f"{t} saw a second transaction"
    if final.code == 554:
        assert final.enhanced == "5.6.0", final
        expected_alice = before[ALICE]
    else:
        expected_alice = before[ALICE] + 1
    time.sleep(0.5)
    assert len(p.messages(BOB)) == before[BOB], "the smuggled message was delivered"
    assert len(p.messages(ALICE)) == expected_alice


def test_an_over_long_data_line_is_answered_once_at_the_end(shared_pipeline):
    p = shared_pipeline
    before = len(p.messages(ALICE))
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: long line\r\n\r\n" + b"x" * 5000 + b"\r\nmore\r\n")
        c.send(b"y" * 3000 + b"\r\n")
        assert c.pending(0.5) == b"", "the server answered inside DATA"
        c.send(b".\r\n")
        r = c.reply()
        assert (r.code, r.enhanced) == (554, "5.6.0"), r
        assert c.pending(0.3) == b"", f"more than one answer: {c.buf!r}"
        assert c.cmd("NOOP").code == 250
        # The session is usable: the next message goes through.
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("after the long line") + b".\r\n")
        assert c.reply().code == 250
    paths = p.wait_messages(ALICE, before + 1)
    assert len(paths) == before + 1
    assert b"Subject: after the long line" in paths[-1].read_bytes()


def test_starttls_discards_pipelined_plaintext(shared_pipeline):
    p = shared_pipeline
    before = len(p.messages(ALICE))
    injected = "injected@attacker.example"
    with Client(p.edge.port) as c:
        assert "STARTTLS" in c.ehlo().text.splitlines()
        c.send(f"STARTTLS\r\nMAIL FROM:<{injected}>\r\nRCPT TO:<{BOB}>\r\n")
        r = c.reply()
        assert r.code == 220, r
        c.starttls()                     # fails if plaintext followed the 220
        ehlo = c.cmd("EHLO tls.client.example")
        # Had the injected MAIL survived, its reply (503, no EHLO yet) would come first.
        assert ehlo.code == 250 and ehlo.text.splitlines()[0] == HOSTNAMES["edge"], ehlo
        assert "STARTTLS" not in ehlo.text.splitlines()
        assert c.pending(0.3) == b""
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250   # not "nested MAIL"
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("over tls") + b".\r\n")
        assert c.reply().code == 250
        c.cmd("QUIT")
    path = p.wait_messages(ALICE, before + 1)[-1]
    edge_received = [f for f in parse_mail(path).get_all("Received") if f" by {HOSTNAMES['edge']} " in " ".join(f.split())]
    assert edge_received and "with ESMTPS" in edge_received[0], edge_received
    assert injected not in p.edge.log_text()


def _trace_removed(raw: bytes) -> bytes:
    """A delivered file without what the tiers put on top: Return-Path and Received fields,
    and the filter's results (Authentication-Results, Received-SPF, X-Spam-*)."""
    while raw.startswith((b"Return-Path:", b"Received:", b"Authentication-Results:", b"Received-SPF:",
                          b"X-Spam-")):
        end = raw.index(b"\r\n")
        while raw[end + 2:end + 3] in (b" ", b"\t"):        # folded continuation lines
            end = raw.index(b"\r\n", end + 2)
        raw = raw[end + 2:]
    return raw


def test_a_message_sent_with_bdat_is_delivered_byte_for_byte(shared_pipeline):
    """BDAT at the edge, DATA (dot-stuffed) to the filter and on to the domain tier:
    lines "." and ".x" arrive unchanged, and an end of data followed by commands
    inside a chunk stays content at every hop."""
    p = shared_pipeline
    before = {u: len(p.messages(u)) for u in (ALICE, BOB)}
    smuggler = "chunk-smuggler@attacker.example"
    mark = {t: p.tiers[t].log_size() for t in ("edge", "filter", "domain")}
    content = (message("bdat", body="first\r\n.\r\n.x\r\n..two dots\r\n") +
               f".\r\nMAIL FROM:<{smuggler}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\nsmuggled\r\n.\r\n".encode() +
               b"last line\r\n")
    cuts = [0, 10, content.index(b"\r\n.\r\n") + 1, content.index(b".x"), len(content) - 1, len(content)]
    chunks = [content[a:b] for a, b in zip(cuts, cuts[1:])]       # one ends between CR and LF
    with Client(p.edge.port) as c:
        assert "CHUNKING" in c.ehlo().text.splitlines()
        c.send(f"MAIL FROM:<sender@example.net>\r\nRCPT TO:<{ALICE}>\r\n".encode() +
               b"".join(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
                        for i, chunk in enumerate(chunks)) + b"NOOP\r\n")
        got = [c.reply() for _ in range(3 + len(chunks))]
        assert [(r.code, r.enhanced) for r in got[:2]] == [(250, "2.1.0"), (250, "2.1.5")], got
        assert [r.text for r in got[2:-2]] == [f"{len(chunk)} octets received" for chunk in chunks[:-1]], got
        queued_id(got[-2])
        assert got[-1].code == 250                              # the NOOP, after the LAST chunk
        assert c.pending(0.3) == b"", f"more replies than commands: {c.buf!r}"
    [path] = p.wait_messages(ALICE, before[ALICE] + 1)[before[ALICE]:]
    assert _trace_removed(path.read_bytes()) == content
    for t in ("edge", "filter", "domain"):
        assert smuggler not in p.tiers[t].log_text()[mark[t]:], f"{t} saw a second transaction"
    time.sleep(0.5)
    assert len(p.messages(BOB)) == before[BOB], "the smuggled message was delivered"
