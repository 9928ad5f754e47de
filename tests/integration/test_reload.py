"""Reload by rebuild: `smarthost reload --config FILE` and SIGHUP build the whole new
configuration and swap it in, or change nothing and say why; certificates are read again,
the log file is reopened, and settings that need a restart are named."""
from __future__ import annotations

import socket
import ssl

from tests.integration.helpers import (DOMAIN, OTHER_DOMAIN, Client, HOSTNAMES, free_port, self_signed,
                                       smarthost, wait_until)


def _rcpt(port: int, address: str):
    with Client(port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        return c.cmd(f"RCPT TO:<{address}>")


def _served_certificate(port: int) -> bytes:
    """The DER certificate the edge presents on STARTTLS now."""
    with Client(port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = ctx.wrap_socket(c.sock)
        try:
            return tls.getpeercert(binary_form=True)
        finally:
            tls.close()


def _reload(tier):
    return smarthost("reload", "--config", str(tier.config_path))


def with_pid_file(p, tier):
    t = getattr(p, tier)
    t.write_config({"server": {"pid_file": str(p.root / f"{tier}.pid")}})
    return t


def test_reload_command_reports_what_the_tier_did(make_pipeline):
    p = make_pipeline(filter={"relay": {"relay_domains": [DOMAIN, OTHER_DOMAIN]}}, start=())
    edge = with_pid_file(p, "edge")
    p.start()
    carol = f"carol@{OTHER_DOMAIN}"
    assert _rcpt(edge.port, carol).code == 554
    # A file that does not validate: refused by the command itself; the tier is not signalled.
    good = edge.config_path.read_text()
    edge.config_path.write_text(good + "\n[queue]\ndirectory = \"/tmp/x\"\n")
    mark = edge.log_size()
    out = _reload(edge)
    assert out.returncode == 2
    assert f"{edge.config_path}: queue: not a section of the edge tier: a setting of the filter tier" in out.stderr
    assert "reload" not in edge.log_text()[mark:]
    # A valid change: in use when the command returns.
    edge.config_path.write_text(good)
    edge.write_config({"relay": {"relay_domains": [DOMAIN, OTHER_DOMAIN]}})
    out = _reload(edge)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"reloaded: configuration reloaded from {edge.config_path}")
    assert _rcpt(edge.port, carol).code == 250
    # A file that validates but whose new configuration cannot be built (the certificate is not
    # PEM): nothing changes, and the command says why.
    bad = p.root / "not-a-cert.pem"
    bad.write_text("not a certificate\n")
    before = _served_certificate(edge.port)
    edge.write_config({"server": {"tls_cert": str(bad)}, "relay": {"relay_domains": [DOMAIN]}})
    out = _reload(edge)
    assert out.returncode == 1
    assert f"reload refused: {edge.config_path}: server.tls_cert: no PEM certificate in {bad}" in out.stderr
    assert _rcpt(edge.port, carol).code == 250          # the refused file's relay_domains did not apply
    assert _served_certificate(edge.port) == before
    assert edge.running


def test_certificates_are_read_again_and_sessions_keep_theirs(make_pipeline):
    p = make_pipeline(start=())
    edge = with_pid_file(p, "edge")
    p.start()
    old = _served_certificate(edge.port)
    held = Client(edge.port)          # a session open across the reload
    held.ehlo()
    cert, key = self_signed(p.root / "newtls", HOSTNAMES["edge"])
    edge.write_config({"server": {"tls_cert": str(cert), "tls_key": str(key)}})
    out = _reload(edge)
    assert out.returncode == 0, out.stderr
    new = _served_certificate(edge.port)
    assert new != old and new == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert held.cmd("NOOP").code == 250             # not dropped
    held.close()


def test_sighup_reopens_the_log_and_names_what_needs_a_restart(make_pipeline):
    p = make_pipeline(start=())
    filt = with_pid_file(p, "filter")
    p.start()
    rotated = filt.log_path.with_name("filter.log.1")
    filt.log_path.rename(rotated)                  # logrotate without copytruncate
    new_port = free_port()
    filt.write_config({"server": {"listen": [f"127.0.0.1:{new_port}"]},
                       "queue": {"directory": str(p.root / "spool2")}})
    out = _reload(filt)
    assert out.returncode == 0, out.stderr
    assert "restart needed for: listeners.smtp, queue.directory" in out.stdout
    line = filt.wait_log(r"configuration reloaded from \S+; restart needed for: listeners\.smtp, "
                         r"queue\.directory").group(0)
    assert line in filt.log_path.read_text()        # the new file
    assert "configuration reloaded" not in rotated.read_text()
    with socket.socket() as s:                      # still on the old port until a restart
        assert s.connect_ex(("127.0.0.1", new_port)) != 0
    assert _rcpt(p.edge.port, f"alice@{DOMAIN}").code == 250


def test_reload_without_a_pid_file_says_so(make_pipeline):
    p = make_pipeline(start=())
    out = _reload(p.edge)
    assert out.returncode == 1
    assert "server.pid_file is not set: cannot find the running tier" in out.stderr


def test_repeated_reloads_keep_recipient_verification_working(make_pipeline):
    """Each reload retires the old verifier (its probe sessions and their slots)."""
    p = make_pipeline(start=())
    filt = with_pid_file(p, "filter")
    p.start()
    for _ in range(6):
        out = _reload(filt)
        assert out.returncode == 0, out.stderr
    wait_until(lambda: _rcpt(p.edge.port, f"nobody@{DOMAIN}").code == 550, 10, "verification to answer")
    assert _rcpt(p.edge.port, f"bob@{DOMAIN}").code == 250
