"""Following one message through the three logs, and whom each tier trusts with XCLIENT."""
from __future__ import annotations

import email
import email.policy
import re
import signal
import socket

import pytest

from tests.integration.helpers import (DOMAIN, QID, Client, message, queued_id, received_by,
                                       transaction)

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


def test_queue_ids_chain_edge_filter_domain(shared_pipeline):
    p = shared_pipeline
    replies = transaction(p.edge.port, "tracer@example.net", [ALICE], message("trace me", sender="tracer@example.net"))
    eqid = queued_id(replies[-1])

    # edge: "EQID: relay=..., status=sent (250 ... queued as FQID)"
    m = p.edge.wait_log(rf"{eqid}: to=<[^>]+>, relay=127\.0\.0\.1[^\n]*status=sent \(250 [^\n]*queued as ({QID})\)")
    fqid = m.group(1)
    assert fqid != eqid

    # filter: every line of FQID's life names the edge's id as upstream.
    m = p.filter.wait_log(rf"{fqid}: to=<{re.escape(ALICE)}>[^\n]*status=sent \(250 [^\n]*delivered as ({QID})\)")
    dqid = m.group(1)
    assert len({eqid, fqid, dqid}) == 3
    lines = p.filter.log_lines(f"{fqid}: ")
    assert len(lines) >= 3, lines              # accepted, picked up, delivered (and removed)
    for line in lines:
        if line.endswith(f"{fqid}: removed"):
            continue
        assert f"upstream={eqid}" in line, line
    assert any("queued as " + fqid in ln for ln in lines)

    # domain: DQID with upstream=FQID, and the Maildir file it wrote.
    dlines = p.domain.log_lines(f"{dqid}: ")
    assert any(f"delivered as {dqid}" in ln and f"upstream={fqid}" in ln for ln in dlines), dlines
    m = re.search(rf"{dqid}: to=<[^>]+>, relay=maildir, status=sent \(delivered to maildir (\S+)\)",
                  p.domain.log_text())
    assert m, dlines
    raw = open(m.group(1), "rb").read()
    assert b"Subject: trace me" in raw
    # The Received headers carry the same ids, newest first.
    received = email.message_from_bytes(raw, policy=email.policy.compat32).get_all("Received")
    ids = [re.search(r" id (\S+)", " ".join(r.split())).group(1) for r in received[:3]]
    assert ids == [dqid, fqid, eqid], received[:3]


def test_filter_records_the_original_client_from_a_trusted_edge(shared_pipeline):
    p = shared_pipeline
    helo = "unique-helo-4711.client.example"
    before = len(p.messages(ALICE))
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("original client"), helo=helo)
    assert replies[-1].code == 250, replies
    path = p.wait_messages(ALICE, before + 1)[-1]
    assert b"Subject: original client" in path.read_bytes()
    assert received_by(path, "edge").startswith(f"from {helo} (unknown [127.0.0.1])")
    filt = received_by(path, "filter")
    assert filt.startswith(f"from {helo} (unknown [127.0.0.1])"), filt
    assert "from edge.example.test" not in filt
    assert any(f"helo={helo}" in ln for ln in p.filter.log_lines("xclient from 127.0.0.1"))


def _can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def test_inner_tiers_refuse_clients_outside_upstream_hosts_and_mynetworks(make_pipeline):
    """Nobody skips the edge: the filter and the domain tier greet only their upstream tiers
    (and mynetworks); anyone else gets 554 5.7.1 instead of a greeting."""
    p = make_pipeline(filter={"server": {"upstream_hosts": ["127.0.0.2"]}},
                      domain={"server": {"upstream_hosts": ["127.0.0.2"]}})
    for tier in (p.filter, p.domain):
        with socket.create_connection(("127.0.0.1", tier.port), timeout=5) as s:
            greeting = s.recv(1000)
            assert greeting.startswith(b"554 5.7.1 "), greeting
            assert b"[127.0.0.1]" in greeting, greeting
            assert s.recv(1000) == b""           # and the connection is closed
    # The edge (on 127.0.0.1, not an upstream host) cannot reach the filter either: the
    # client's transaction is refused, not accepted and lost.
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("via untrusted edge"))
    assert replies[0].code >= 400, replies
    # mynetworks is let in (a local submission host), and so is everybody with allow_any_client.
    p.filter.write_config({"relay": {"mynetworks": ["127.0.0.0/8"]}})
    p.filter.signal(signal.SIGHUP)
    p.filter.wait_log("configuration reloaded")
    with Client(p.filter.port) as c:
        assert c.ehlo().code == 250
    p.domain.write_config({"server": {"allow_any_client": True}})
    p.domain.signal(signal.SIGHUP)
    p.domain.wait_log("configuration reloaded")
    with Client(p.domain.port) as c:
        assert c.ehlo().code == 250


def test_xclient_is_refused_from_hosts_not_in_upstream_hosts(make_pipeline):
    p = make_pipeline(filter={"server": {"upstream_hosts": ["127.0.0.2"], "allow_any_client": True}})
    with Client(p.filter.port) as c:
        ehlo = c.ehlo()
        assert "XCLIENT" not in ehlo.text and "XFORWARD" not in ehlo.text, ehlo
        r = c.cmd("XCLIENT ADDR=192.0.2.66 NAME=forged.example HELO=forged.example")
        assert (r.code, r.enhanced) == (550, "5.7.0"), r
        r = c.cmd("XFORWARD IDENT=1K0Y9JJQ0Q9P89C9EJT81")
        assert (r.code, r.enhanced) == (550, "5.7.0"), r
        # The session goes on as the real peer.
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
    assert "192.0.2.66" not in p.filter.log_text()
    assert "forged.example" not in p.filter.log_text()

    if _can_bind("127.0.0.2"):    # Linux routes all of 127/8 to lo: the trusted address works
        with Client(p.filter.port, source="127.0.0.2") as c:
            assert "XCLIENT" in c.ehlo().text
            r = c.cmd("XCLIENT ADDR=192.0.2.66 NAME=[UNAVAILABLE] HELO=trusted.example")
            assert r.code == 220, r
        p.filter.wait_log(r"xclient from 127\.0\.0\.2: client=unknown\[192\.0\.2\.66\] helo=trusted\.example")

    # The edge on 127.0.0.1 is not trusted either: mail still flows, but the filter
    # records the edge itself as its client, not what the edge was told.
    helo = "untrusted-path-helo.client.example"
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("untrusted edge"), helo=helo)
    assert replies[-1].code == 250, replies
    path = p.wait_messages(ALICE, 1)[-1]
    filt = received_by(path, "filter")
    assert filt.startswith("from edge.example.test (unknown [127.0.0.1])"), filt
    assert helo not in filt
    assert "xclient from 127.0.0.1" not in p.filter.log_text()


def test_a_new_ehlo_reaches_the_filter_in_the_same_session(shared_pipeline):
    """The edge's XCLIENT to the filter follows the client's identity within one session."""
    import smtplib
    p = shared_pipeline
    before = len(p.messages(ALICE))
    with smtplib.SMTP("127.0.0.1", p.edge.port, local_hostname="first-4712.example") as s:
        s.ehlo("first-4712.example")
        assert s.mail("sender@example.net")[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        s.rset()
        s.ehlo("second-4712.example")
        s.sendmail("sender@example.net", [ALICE], message("second helo"))
    path = p.wait_messages(ALICE, before + 1)[-1]
    assert received_by(path, "edge").startswith("from second-4712.example ")
    assert received_by(path, "filter").startswith("from second-4712.example "), received_by(path, "filter")


def test_consecutive_clients_share_the_edges_connection_with_their_own_identity(shared_pipeline):
    """A client that leaves hands the edge's filter connection to the next client's session:
    XCLIENT again with the next client's identity, no new connection."""
    p = shared_pipeline
    before = len(p.messages(ALICE))
    connects = len(p.filter.log_lines(": connect from"))
    for n in (1, 2, 3):
        replies = transaction(p.edge.port, "sender@example.net", [ALICE], message(f"client {n}"),
                              helo=f"client-{n}-4713.example")
        assert replies[-1].code == 250, replies
    paths = p.wait_messages(ALICE, before + 3)[-3:]
    for n in (1, 2, 3):
        path = next(x for x in paths if f"Subject: client {n}".encode() in x.read_bytes())
        assert received_by(path, "filter").startswith(f"from client-{n}-4713.example "), path
    helos = [ln for ln in p.filter.log_lines("xclient from 127.0.0.1") if "-4713.example" in ln]
    assert [f"client-{n}-4713.example" in ln for n, ln in zip((1, 2, 3), helos)] == [True] * 3
    # the three clients came one after another within the edge's 2 s cache: one connection at most
    assert len(p.filter.log_lines(": connect from")) - connects <= 1
