"""Process life of the tiers: SIGTERM, SIGHUP reloads and configuration errors."""
from __future__ import annotations

import signal
import time

import pytest

from tests.integration.helpers import (DOMAIN, OTHER_DOMAIN, Client, message, port_accepts, queued_id,
                                       smarthost, transaction, wait_until)

pytestmark = pytest.mark.slow


# -- SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_stops_each_tier_with_exit_0(pipeline):
    for tier in (pipeline.edge, pipeline.filter, pipeline.domain):
        started = time.monotonic()
        assert tier.stop(timeout=10) == 0, tier.log_tail()
        assert time.monotonic() - started < 5, f"{tier.name}: an idle tier took long to stop"
        last = tier.log_text().splitlines()
        assert any(ln.endswith(f"{tier.name}[{tier.pid}]: stopped") for ln in last), tier.log_tail()
        assert not port_accepts(tier.port), f"{tier.name} still listens after exiting"


def test_sigterm_gives_idle_session_421_and_exits_0(pipeline):
    with Client(pipeline.edge.port) as c:
        c.ehlo()
        pipeline.edge.signal(signal.SIGTERM)
        r = c.reply()
        assert (r.code, r.enhanced) == (421, "4.3.2"), r
        assert c.closed_by_server()
    assert pipeline.edge.wait_exit(10) == 0
    assert "stopped" in pipeline.edge.log_text()


def test_sigterm_lets_open_data_finish(pipeline):
    """Half the message, SIGTERM, the other half: 250, then the edge closes and exits 0."""
    data = message("shutdown in the middle", body="first half\r\n" * 50 + "second half\r\n" * 50)
    half = len(data) // 2
    with Client(pipeline.edge.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(data[:half])
        mark = pipeline.edge.log_size()
        pipeline.edge.signal(signal.SIGTERM)
        pipeline.edge.wait_log("stopping: no new connections", since=mark)
        # No new sessions once stopping, while this one may still finish.
        wait_until(lambda: not port_accepts(pipeline.edge.port), 5, "the edge to stop listening")
        assert pipeline.edge.running
        assert c.pending(0.3) == b"", "the edge spoke out of turn in the middle of DATA"
        c.send(data[half:] + b".\r\n")
        r = c.reply()
        assert r.code == 250, r
        queued_id(r)
        assert c.closed_by_server(), "the edge kept the session open after its transaction while stopping"
    assert pipeline.edge.wait_exit(10) == 0
    [path] = pipeline.wait_messages(f"alice@{DOMAIN}", 1)
    assert b"second half\r\n" * 50 in path.read_bytes()


def test_sigterm_cuts_data_that_outlasts_shutdown_timeout(make_pipeline):
    """A transaction still open when server.shutdown_timeout ends is cut off with a
    421; the half message is never delivered, and the edge exits 0."""
    p = make_pipeline(edge={"server": {"shutdown_timeout": 1}})
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("never finished", body="part\r\n" * 100))
        started = time.monotonic()
        p.edge.signal(signal.SIGTERM)
        assert p.edge.wait_exit(10) == 0
        assert time.monotonic() - started < 5, "the edge did not stop at shutdown_timeout"
        assert c.closed_by_server(2)
        told = c.buf
    p.filter.wait_log("lost connection from 127.0.0.1 during the transaction")
    time.sleep(0.5)
    assert p.messages(f"alice@{DOMAIN}") == []
    assert "Queue is empty" in p.filter.queue("list").stdout
    assert told.startswith(b"421 4.3.2 "), f"the client was not told why: {told!r}"


# -- SIGHUP -----------------------------------------------------------------------------------

def _rcpt(port: int, address: str):
    with Client(port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        return c.cmd(f"RCPT TO:<{address}>")


def test_sighup_applies_an_edited_config_without_restart(pipeline):
    carol = f"carol@{OTHER_DOMAIN}"
    r = _rcpt(pipeline.edge.port, carol)
    assert (r.code, r.enhanced) == (554, "5.7.1"), r
    pids = {t.name: t.pid for t in (pipeline.edge, pipeline.filter)}
    for tier in (pipeline.edge, pipeline.filter):
        mark = tier.log_size()
        tier.write_config({"relay": {"relay_domains": [DOMAIN, OTHER_DOMAIN]}})
        tier.signal(signal.SIGHUP)
        tier.wait_log("configuration reloaded from", since=mark)
    r = _rcpt(pipeline.edge.port, carol)
    assert r.code == 250, r
    assert {t.name: t.pid for t in (pipeline.edge, pipeline.filter)} == pids
    assert pipeline.edge.running and pipeline.filter.running
    # And the mail goes through.
    replies = transaction(pipeline.edge.port, "sender@example.net", [carol], message("after reload", to=carol))
    assert replies[-1].code == 250, replies
    pipeline.wait_messages(carol, 1)


def test_sighup_on_the_domain_tier_adds_a_user(make_pipeline):
    p = make_pipeline(start=("domain",))
    dave = f"dave@{DOMAIN}"
    r = _rcpt(p.domain.port, dave)
    assert (r.code, r.enhanced) == (550, "5.1.1"), r
    mark = p.domain.log_size()
    p.domain.write_config({"mailboxes": {"users": [f"alice@{DOMAIN}", f"bob@{DOMAIN}", dave,
                                                   f"carol@{OTHER_DOMAIN}"]}})
    p.domain.signal(signal.SIGHUP)
    p.domain.wait_log("configuration reloaded from", since=mark)
    assert _rcpt(p.domain.port, dave).code == 250
    replies = transaction(p.domain.port, "sender@example.net", [dave], message("new user", to=dave))
    assert replies[-1].code == 250, replies
    p.wait_messages(dave, 1)


@pytest.mark.parametrize("broken, key, reason", [
    ({"relay": {"relay_domain": [OTHER_DOMAIN]}}, "relay.relay_domain", "unknown key"),
    ({"server": {"max_errors": -3}}, "server.max_errors", "must be greater than 0"),
    ("not = [valid toml", None, "not valid TOML"),
])
def test_sighup_with_broken_config_keeps_the_running_one(pipeline, broken, key, reason):
    edge = pipeline.edge
    good_text = edge.config_path.read_text()
    if isinstance(broken, str):
        edge.config_path.write_text(good_text + "\n" + broken + "\n")
    else:
        edge.write_config(broken)
        # A valid-looking edit that must NOT take effect with the rest of the file refused.
        edge.config_path.write_text(edge.config_path.read_text().replace(
            f'relay_domains = ["{DOMAIN}"]', f'relay_domains = ["{DOMAIN}", "{OTHER_DOMAIN}"]'))
    mark = edge.log_size()
    edge.signal(signal.SIGHUP)
    m = edge.wait_log(r"reload refused[^\n]*", since=mark)
    line = m.group(0)
    assert str(edge.config_path) in line, line
    if key:
        assert key in line, line
    assert reason in line, line
    assert edge.running
    assert "configuration reloaded" not in edge.log_text()[mark:]
    # The old settings still work: hosted domain accepted, the other still refused.
    assert _rcpt(edge.port, f"alice@{DOMAIN}").code == 250
    r = _rcpt(edge.port, f"carol@{OTHER_DOMAIN}")
    assert (r.code, r.enhanced) == (554, "5.7.1"), r


# -- configuration errors ---------------------------------------------------------------------

def test_check_config_prints_effective_settings(make_pipeline):
    p = make_pipeline(start=())
    for tier in (p.edge, p.filter, p.domain):
        out = smarthost("check-config", str(tier.config_path))
        assert out.returncode == 0, out.stderr
        assert f'tier = "{tier.name}"' in out.stdout
        assert str(tier.config_path) in out.stdout
        # A key the file sets (server.listen, written as the listener it stands for) and a
        # default it does not.
        assert f"[listeners.smtp]\n# " in out.stdout
        assert f'endpoint = "tcp:port={tier.port}:interface=127.0.0.1"' in out.stdout
        assert "max_received_headers = 50" in out.stdout
        assert f"#   listener smtp: tcp:port={tier.port}:interface=127.0.0.1 (mx; tls starttls; auth off), policy default" \
            in out.stdout
        # Only the tier's own sections.
        assert ("[queue]" in out.stdout) == (tier.name == "filter")
        assert ("[mailboxes]" in out.stdout) == (tier.name == "domain")
        assert ("[next_hop]" in out.stdout) == (tier.name != "domain")
    out = smarthost("check-config", str(p.filter.config_path))
    assert "#     rcpt         1. route " in out.stdout and "#     rcpt         2. verify " in out.stdout


@pytest.mark.parametrize("edit, key, reason", [
    ({"server": {"hostnme": "typo.example"}}, "server.hostnme", "unknown key"),
    ({"server": {"max_errors": 0}}, "server.max_errors", "must be greater than 0"),
    ({"next_hop": {"tls": "sometimes"}}, "next_hop.tls", "must be one of"),
    ({"relay": {"mynetworks": ["not-a-network"]}}, "relay.mynetworks", "not an IP address or CIDR network"),
    ({"queue": {"retry_min": 10, "retry_max": 5}}, "queue.retry_max", "smaller than queue.retry_min"),
])
def test_bad_config_is_refused_with_file_key_and_reason(make_pipeline, edit, key, reason):
    p = make_pipeline(start=())
    filt = p.filter
    filt.write_config(edit)
    out = smarthost("check-config", str(filt.config_path))
    assert out.returncode != 0
    assert out.stdout == ""
    for part in (str(filt.config_path), key, reason):
        assert part in out.stderr, out.stderr
    # The daemon with that file: refuses to start with the same message, never listens.
    filt.start(wait=False)
    code = filt.wait_exit(10)
    assert code != 0
    for part in (str(filt.config_path), key, reason):
        assert part in filt.output_text(), filt.output_text()
    assert not port_accepts(filt.port)


def test_tier_with_missing_required_key_does_not_start(make_pipeline):
    p = make_pipeline(start=())
    edge = p.edge
    edge.write_config({"next_hop": {"hosts": None}})
    edge.start(wait=False)
    assert edge.wait_exit(10) != 0
    out = edge.output_text()
    assert str(edge.config_path) in out and "next_hop.hosts" in out and "required" in out, out
    assert not port_accepts(edge.port)
