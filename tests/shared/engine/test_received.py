import email.utils
import re

from shared.engine.received import HEADER_SCAN_LIMIT, HeaderScanner, received_header, with_protocol


def scan(chunks):
    h = HeaderScanner()
    for c in chunks:
        h.feed(c)
    return h


def test_counts_only_the_header_section_across_chunk_splits():
    msg = b"Received: a\r\nX: 1\r\nRECEIVED : b\r\n\r\nReceived: in the body\r\n"
    for i in range(len(msg)):
        h = scan([msg[:i], msg[i:]])
        assert h.done and h.received_count() == 2, i


def test_folded_and_lookalike_lines():
    h = scan([b"X-Received: no\r\n\tReceived: folded continuation\r\nReceived: yes\r\n\r\n"])
    assert h.received_count() == 1


def test_no_header_section():
    h = scan([b"\r\nReceived: body only\r\n"])
    assert h.done and h.received_count() == 0


def test_scan_is_bounded():
    h = scan([b"Received: x\r\n" * (HEADER_SCAN_LIMIT // 13 + 10)])
    assert h.done and len(h.buf) <= HEADER_SCAN_LIMIT
    h.feed(b"Received: more\r\n")
    assert len(h.buf) <= HEADER_SCAN_LIMIT


def test_received_header_shape():
    one = received_header(helo="mx.example.net", client_name=None, client_addr="2001:db8::1",
                          hostname="edge.example.org", protocol=with_protocol(True, True, False, False),
                          queue_id="QID", recipients=["a@example.org"], now=0).decode()
    assert one.startswith("Received: from mx.example.net (unknown [IPv6:2001:db8::1])\r\n"
                          "\tby edge.example.org (smarthost) with ESMTPS id QID\r\n"
                          "\tfor <a@example.org>; ")
    date = one.split("; ", 1)[1].rstrip("\r\n")
    assert email.utils.parsedate_to_datetime(date).timestamp() == 0
    assert re.fullmatch(r".* [+-]\d{4}", date) and not date.endswith("-0000")    # the real offset
    two = received_header(helo=None, client_name="c.example", client_addr="192.0.2.1", hostname="h",
                          protocol="SMTP", queue_id="Q", recipients=["a@x", "b@x"], now=0).decode()
    assert "for <" not in two and "with SMTP id Q;\r\n\t" in two
    assert with_protocol(True, True, True, True) == "UTF8SMTPSA"


def test_pipeline_hops_counts_only_leading_smarthost_headers():
    ours = (b"Received: from a (b [192.0.2.1])\r\n\tby filter.example (smarthost) with ESMTP id Q;\r\n"
            b"\tMon, 1 Jan 2026 00:00:00 -0000\r\n")
    theirs = b"Received: from x by mx.example.net (Postfix) with ESMTP id Z\r\n"
    h = scan([ours, ours, theirs, ours, b"Subject: s\r\n\r\n"])
    assert h.received_count() == 4
    assert h.pipeline_hops() == 2
    assert scan([theirs, ours, b"\r\n"]).pipeline_hops() == 0


def test_received_header_lines_stay_under_the_line_limit_whatever_the_helo():
    """A HELO may take most of a 2048-octet command line; the tiers behind this one refuse
    lines over 1000 octets, so the trace line must never carry it whole."""
    helo = "h" * 2000
    name = "\u00e9" * 600                    # 1200 octets in UTF-8
    header = received_header(helo=helo, client_name=name, client_addr="192.0.2.1",
                             hostname="edge.example.org", protocol="ESMTP", queue_id="QID",
                             recipients=["a@example.org"], now=0)
    lines = header.split(b"\r\n")
    assert max(len(line) for line in lines) < 998, [len(line) for line in lines]
    first = lines[0].decode("utf-8")          # cut on a character boundary
    assert first.startswith("Received: from " + "h" * 255 + "... (")
    assert received_header(helo="mx.example.net", client_name=None, client_addr=None, hostname="h",
                           protocol="SMTP", queue_id="Q", recipients=[], now=0).startswith(
        b"Received: from mx.example.net (unknown [unknown])")


def test_message_id_is_found_once_folded_or_not_and_only_printable():
    h = HeaderScanner()
    h.feed(b"Subject: x\r\nMessage-ID:\r\n <abc.123@example.net>\r\nX-Message-ID: <other@x>\r\n\r\nbody\r\n")
    assert h.message_id() == "<abc.123@example.net>"
    h = HeaderScanner()
    h.feed(b"message-id: <a\x01b@x>\r\n\r\n")
    assert h.message_id() is None
    h = HeaderScanner()
    h.feed(b"Subject: none\r\n\r\nMessage-ID: <in-the-body@x>\r\n")
    assert h.message_id() is None


def test_pipeline_hops_look_past_the_filters_result_fields():
    ours = (b"Received: from a (b [192.0.2.1])\r\n\tby filter.example (smarthost) with ESMTP id Q;\r\n"
            b"\tMon, 1 Jan 2026 00:00:00 -0000\r\n")
    theirs = b"Received: from x by mx.example.net (Postfix) with ESMTP id Z\r\n"
    results = (b"Authentication-Results: filter.example;\r\n\tspf=pass smtp.mailfrom=a@b.example\r\n"
               b"Received-SPF: pass (filter.example: ...) client-ip=192.0.2.1;\r\n"
               b"X-Spam-Score: 0.00\r\nX-Spam-Status: No, score=0.00\r\n\ttests=none\r\n")
    assert scan([ours, results, ours, theirs, ours, b"\r\n"]).pipeline_hops() == 2
    assert scan([results, ours, b"From: a@b\r\n", ours, b"\r\n"]).pipeline_hops() == 1
