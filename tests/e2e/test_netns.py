"""The three tiers on three "machines": network namespaces joined by a bridge.

Layout (all of it inside namespaces this module creates and deletes)::

    client 10.203.7.1 ─┐
    edge   10.203.7.2 ─┤ br0 in PREFIX-lan
    filter 10.203.7.3 ─┤
    domain 10.203.7.4 ─┘

Every tier listens on port 25 of its own address.  The filter accepts XCLIENT
from the edge's address only, the domain tier from the filter's only.  Real
clients (swaks, smtplib) run inside the client namespace; the messages must
arrive byte for byte, and the filter must have seen the client's address, not
the edge's: that is XCLIENT at work across machines.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (CLIENT_HELO, DOMAIN, HOSTNAMES, PYTHON, NetnsLab, Pipeline, check_delivered,
                               compose, netns_unavailable, received_by, self_signed, swaks, swaks_replies,
                               wait_for_message, write_pipeline_configs)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TIERS = ("edge", "filter", "domain")
SENDER = "sender@example.net"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


@dataclass
class Lab:
    net: NetnsLab
    pipeline: Pipeline
    cert: Path

    @property
    def client(self) -> str:
        return self.net.addr["client"]

    @property
    def edge(self) -> str:
        return self.net.addr["edge"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("netns")
    net = NetnsLab(f"sh-{os.getpid()}", ["client", *TIERS])
    net.up()
    pipeline = None
    codes: dict = {}
    try:
        listen = {t: (net.addr[t], 25) for t in TIERS}
        cert, key = self_signed(root / "tls", HOSTNAMES["edge"], [net.addr["edge"]])
        configs = write_pipeline_configs(root, listen, tls=(cert, key))
        pipeline = Pipeline(root, listen, configs, netns={t: net.ns[t] for t in TIERS})
        pipeline.start()
        yield Lab(net, pipeline, cert)
    finally:
        if pipeline is not None:
            codes = pipeline.stop()
            print(pipeline.describe())
        errors = net.down()
    assert not errors, errors
    assert all(c == 0 for c in codes.values()), f"tiers did not exit 0 on SIGTERM: {codes}"


def client_python(lab: Lab, code: str) -> str:
    r = lab.net.run("client", [PYTHON, "-c", code], timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode()


def check_client_seen_by_filter(lab: Lab, fields: list[str]) -> None:
    """The filter knows the original client (XCLIENT from the edge), not the edge."""
    edge = received_by(fields, "edge")
    assert f"[{lab.client}]" in edge and CLIENT_HELO in edge, edge
    filt = received_by(fields, "filter")
    assert f"[{lab.client}]" in filt, f"filter's Received does not name the client {lab.client}: {filt}"
    assert f"[{lab.edge}]" not in filt, f"filter's Received names the edge, XCLIENT was not used: {filt}"
    assert lab.client in lab.pipeline["filter"].log(), "the filter never logged the client's address"


def test_client_reaches_the_edge_across_the_bridge(lab):
    banner = client_python(lab, f"""
import socket
s = socket.create_connection(({lab.edge!r}, 25), timeout=10)
print(s.recv(512).decode())
""")
    assert banner.startswith("220 "), banner
    assert lab.client not in lab.net.run("edge", ["ip", "-4", "addr"]).stdout.decode()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_swaks_from_the_client_namespace(lab, tmp_path, tls):
    tag = f"netns-swaks-{'tls' if tls else 'plain'}-{os.getpid()}"
    message = compose(tag, SENDER, ALICE)
    data = tmp_path / "message.eml"
    data.write_bytes(message[:-2])               # swaks adds the final CRLF itself
    r = swaks(lab.edge, 25, SENDER, ALICE, data, tls=tls, ca_file=lab.cert if tls else None,
              prefix=lab.net.exec_argv("client", []))
    assert r.returncode == 0, f"swaks failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    in_tls, end_of_data = swaks_replies(r.stdout)[-2]      # the last reply is QUIT's 221
    assert end_of_data.startswith("250"), r.stdout
    assert in_tls == tls, r.stdout

    fields = check_delivered(wait_for_message(lab.pipeline.maildir(ALICE), f"<{tag}@e2e.test>"),
                             message, SENDER)
    check_client_seen_by_filter(lab, fields)
    assert (" with ESMTPS " in received_by(fields, "edge")) == tls, fields


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_smtplib_from_the_client_namespace(lab, tmp_path, tls):
    tag = f"netns-smtplib-{'tls' if tls else 'plain'}-{os.getpid()}"
    message = compose(tag, SENDER, BOB)
    data = tmp_path / "message.eml"
    data.write_bytes(message)
    argv = [PYTHON, "-m", "tests.e2e.smtp_send", "--host", lab.edge, "--port", "25", "--from", SENDER,
            "--to", BOB, "--file", str(data)]
    if tls:
        argv += ["--starttls", "--ca", str(lab.cert)]    # the certificate names the edge's address
    r = lab.net.run("client", argv)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    result = json.loads(r.stdout)
    assert result["data"] and result["data"][0] == 250, result
    if tls:
        assert result["tls"] and result["tls"].startswith("TLS"), result

    fields = check_delivered(wait_for_message(lab.pipeline.maildir(BOB), f"<{tag}@e2e.test>"),
                             message, SENDER)
    check_client_seen_by_filter(lab, fields)
    assert (" with ESMTPS " in received_by(fields, "edge")) == tls, fields


def test_inner_tiers_refuse_the_client_namespace_at_connect(lab):
    """Nobody skips the edge: the filter and the domain tier greet only their upstream
    tier, so a client that reaches them directly gets 554 5.7.1 (and no chance to forge
    an identity with XCLIENT)."""
    out = client_python(lab, f"""
import json, smtplib
replies = []
for addr in ({lab.net.addr['filter']!r}, {lab.net.addr['domain']!r}):
    try:
        smtplib.SMTP(addr, 25, local_hostname="client.e2e.test", timeout=10)
        replies.append([220, ""])
    except smtplib.SMTPConnectError as e:
        replies.append([e.smtp_code, e.smtp_error.decode()])
print(json.dumps(replies))
""")
    for code, text in json.loads(out):
        assert code == 554 and text.startswith("5.7.1 "), (code, text)
