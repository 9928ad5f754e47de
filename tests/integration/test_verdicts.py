"""Verdicts of the downstream tiers reach the original client at the edge; the
filter's queue, bounces and loop protection, on real processes."""
from __future__ import annotations

import re
import signal
import time

import pytest

from tests.integration.helpers import (DOMAIN, QID, Client, message, parse_mail, queued_id, transaction,
                                       wait_until)

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
NOBODY = f"nosuchuser@{DOMAIN}"
NO_VERIFY = {"verify": {"recipients": False}}


def _rcpt_reply(port: int, rcpt: str, sender: str = "sender@example.net"):
    with Client(port) as c:
        c.ehlo()
        r = c.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 250, r
        return c.cmd(f"RCPT TO:<{rcpt}>")


# -- verdicts at RCPT ------------------------------------------------------------------------

def test_unknown_user_is_refused_at_the_edges_rcpt(shared_pipeline):
    r = _rcpt_reply(shared_pipeline.edge.port, NOBODY)
    assert (r.code, r.enhanced) == (550, "5.1.1"), r
    assert NOBODY in r.text
    # The edge logged the refusal, the filter asked the domain tier.
    assert any(NOBODY in ln and "550 5.1.1" in ln for ln in shared_pipeline.edge.log_lines("reject: RCPT"))


def test_relay_to_another_domain_is_refused(shared_pipeline):
    r = _rcpt_reply(shared_pipeline.edge.port, "someone@elsewhere.example")
    assert (r.code, r.enhanced) == (554, "5.7.1"), r


def test_filter_not_started_gives_451_at_the_edge(make_pipeline):
    p = make_pipeline(start=("domain", "edge"))
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("filter down"))
    assert (replies[0].code, replies[0].enhanced[:4]) == (451, "4.4."), replies
    assert all(r.code != 250 for r in replies), replies


def test_filter_killed_in_the_middle_of_data_gives_451_never_250(pipeline):
    data = message("filter killed", body="line\r\n" * 2000)
    with Client(pipeline.edge.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(data[:len(data) // 2])
        pipeline.filter.kill()
        c.send(data[len(data) // 2:] + b".\r\n")
        r = c.reply()
        assert (r.code, r.enhanced[:4]) == (451, "4.4."), r
        # The next transaction on the same session: still no next hop, still 451.
        r = c.cmd("MAIL FROM:<sender@example.net>")
        assert (r.code, r.enhanced[:4]) == (451, "4.4."), r
    time.sleep(0.5)
    assert pipeline.messages(ALICE) == []


def test_domain_down_with_verification_tempfails_rcpt(make_pipeline):
    p = make_pipeline(start=("filter", "edge"))
    r = _rcpt_reply(p.edge.port, ALICE)
    assert (r.code, r.enhanced) == (450, "4.1.1"), r


def test_domain_down_without_verification_queues_then_flush_delivers(make_pipeline):
    p = make_pipeline(filter=NO_VERIFY, start=("filter", "edge"))
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("queued while down"))
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    listing = wait_until(lambda: (out := p.filter.queue("list")).returncode == 0
                         and re.search(r"deferred", out.stdout) and out.stdout, 10, "the message to be deferred")
    assert f"<{ALICE}>" in listing and "<sender@example.net>" in listing
    assert "1 deferred" in listing
    p.domain.start()
    time.sleep(0.5)
    assert p.messages(ALICE) == [], "delivered before the flush: retry_min is 60 s"
    out = p.filter.queue("flush")
    assert out.returncode == 0 and "1 deferred message(s) made due now" in out.stdout, out
    [path] = p.wait_messages(ALICE, 1, timeout=5)
    assert b"Subject: queued while down" in path.read_bytes()
    wait_until(lambda: "Queue is empty" in p.filter.queue("list").stdout, 5, "the queue to be empty")


# -- bounces ------------------------------------------------------------------------------------

def test_unknown_user_without_verification_bounces_to_the_sender(make_pipeline):
    p = make_pipeline(filter=NO_VERIFY)
    replies = transaction(p.edge.port, ALICE, [NOBODY], message("to nobody", sender=ALICE, to=NOBODY))
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    [path] = p.wait_messages(ALICE, 1)
    bounce = parse_mail(path)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["Return-Path"].strip() == "<>"
    parts = {part.get_content_type(): part for part in bounce.get_payload()}
    assert "message/delivery-status" in parts, list(parts)
    status_text = parts["message/delivery-status"].as_string()
    assert re.search(r"^Status: 5\.1\.1\s*$", status_text, re.M), status_text
    assert re.search(rf"^Final-Recipient: rfc822; ?{re.escape(NOBODY)}\s*$", status_text, re.M), status_text
    assert re.search(r"^Action: failed\s*$", status_text, re.M), status_text
    returned = parts.get("text/rfc822-headers") or parts.get("message/rfc822")
    assert returned is not None and "Subject: to nobody" in returned.as_string()


def test_null_sender_to_unknown_user_goes_to_the_postmaster_as_a_double_bounce(make_pipeline):
    """Mail with the null sender cannot be returned; it is not dropped either: the
    postmaster (here an alias of alice) gets the report with the message attached."""
    p = make_pipeline(filter=NO_VERIFY)
    replies = transaction(p.edge.port, "", [NOBODY], message("null sender", sender="MAILER-DAEMON@example.net",
                                                             to=NOBODY))
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    edge_qid = queued_id(replies[-1])
    m = p.filter.wait_log(rf"({QID}): to=<{re.escape(NOBODY)}>[^\n]*upstream={edge_qid}[^\n]*"
                          rf"status=bounced \(550 5\.1\.1")
    fqid = m.group(1)
    p.filter.wait_log(rf"{fqid}: undeliverable mail with the null sender; postmaster notification "
                      rf"\(double bounce\) to <postmaster>: {QID}")
    [path] = p.wait_messages(ALICE, 1)
    report = parse_mail(path)
    assert report["To"] == "<postmaster>" and report["Return-Path"].strip() == "<>"
    assert report.get_content_type() == "multipart/report"
    assert "Subject: null sender" in report.get_payload()[2].as_string()
    assert "non-delivery notification" not in p.filter.log_text()


def test_a_bounce_with_no_route_waits_in_the_queue_saying_why(make_pipeline):
    """A recipient that disappeared from the domain tier after the filter's verification
    cache learned it: 250 at the edge, 550 at the domain tier, and the bounce is for an
    outside sender whom no next hop serves. It is deferred, never offered to a hop that
    must refuse it, and `queue list` says why."""
    p = make_pipeline(filter={"verify": {"positive_ttl": 3600}})
    bob = f"bob@{DOMAIN}"
    assert _rcpt_reply(p.edge.port, bob).code == 250              # now in the filter's cache
    users = [u for u in p.domain.sections["mailboxes"]["users"] if u != bob]
    p.domain.write_config({"mailboxes": {"users": users}})
    p.domain.signal(signal.SIGHUP)
    p.domain.wait_log("configuration reloaded")
    replies = transaction(p.edge.port, "someone@outside.example", [bob], message("to bob", to=bob))
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    p.filter.wait_log(rf"to=<{re.escape(bob)}>[^\n]*status=bounced \(550 5\.1\.1")
    m = p.filter.wait_log(rf"({QID}): to=<someone@outside\.example>[^\n]*status=deferred "
                          rf"\(451 4\.4\.4 no route to outside\.example")
    listing = p.filter.queue("list").stdout
    assert m.group(1) in listing and "451 4.4.4 no route to outside.example" in listing, listing
    assert "outside.example" not in p.domain.log_text()            # never offered to the domain tier


# -- loop protection ------------------------------------------------------------------------------

def _with_received(n: int, subject: str) -> bytes:
    hops = [f"Received: from hop{i}.example.net (hop{i}.example.net [192.0.2.{i % 250 + 1}])\r\n"
            f"\tby relay{i}.example.net with ESMTP id H{i}; Mon, 23 Nov 2026 10:00:00 +0000" for i in range(n)]
    return message(subject, extra_headers=hops)


def test_51_received_headers_are_refused_at_end_of_data(shared_pipeline):
    p = shared_pipeline
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], _with_received(51, "loop 51"))
    assert [r.code for r in replies[:3]] == [250, 250, 354], replies
    assert (replies[-1].code, replies[-1].enhanced) == (554, "5.4.6"), replies
    # The edge refuses it itself: the filter never queues it.
    assert any("51 Received headers" in ln for ln in p.edge.log_lines("reject: END-OF-MESSAGE"))
    assert "loop 51" not in "".join(path.read_text(errors="replace") for path in p.messages(ALICE))


@pytest.mark.parametrize("hops", [49, 50])
def test_up_to_50_received_headers_are_delivered(shared_pipeline, hops):
    """The limit is on what the client sent: the tiers' own headers (edge, filter) do
    not push a message that the edge accepted over the limit further down."""
    p = shared_pipeline
    before = len(p.messages(ALICE))
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], _with_received(hops, f"loop {hops}"))
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    edge_qid = queued_id(replies[-1])
    m = p.filter.wait_log(rf"to=<{re.escape(ALICE)}>[^\n]*upstream={edge_qid}, status=(\w+) \(([^\n]*)\)")
    assert m.group(1) == "sent", f"the filter could not deliver what the edge accepted: {m.group(0)}"
    paths = p.wait_messages(ALICE, before + 1)
    assert f"Subject: loop {hops}".encode() in paths[-1].read_bytes()
