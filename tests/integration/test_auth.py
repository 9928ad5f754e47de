"""SMTP AUTH at the edge, end to end: the three listener roles, AUTH over TLS only,
PLAIN, LOGIN and CRAM-MD5 with a real client (swaks), the embedded user store and its
command, sender = login, brute-force blocking, and the login carried downstream."""
from __future__ import annotations

import base64
import ssl
import subprocess

import pytest

from tests.dovecot import dovecot  # noqa: F401  (the fixture)
from tests.integration.helpers import (DOMAIN, PYTHON, REPO, Client, child_env, free_port, received_by,
                                       smarthost)

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORDS = {ALICE: "alice-Secret-1", BOB: "bob-Secret-2"}


def add_user(config, name: str, password: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "shared.cli", "user", "add", name, "--password-stdin", *extra,
                           "--config", str(config)], cwd=REPO, env=child_env(), input=password + "\n",
                          capture_output=True, text=True, timeout=30)


def roles(p, **auth) -> dict:
    ports = {"submission": free_port(), "submissions": free_port()}
    p.auth_ports = ports
    return {"server": {"listen": None},
            "listeners": {"mx": {"endpoint": f"tcp:port={p.edge.port}:interface=127.0.0.1"},
                          **{role: {"endpoint": f"tcp:port={port}:interface=127.0.0.1", "role": role}
                             for role, port in ports.items()}},
            "auth": {"users_file": str(p.root / "users"), **auth}}


@pytest.fixture
def auth_pipeline(make_pipeline):
    def make(**auth):
        p = make_pipeline(start=())
        p.edge.write_config(roles(p, **auth))
        for name, password in PASSWORDS.items():
            out = add_user(p.edge.config_path, name, password, *(["--cram-md5"] if name == ALICE else []))
            assert out.returncode == 0, out.stderr
        p.start()
        return p
    return make


def swaks(port: int, tls: str, mechanism: str, user: str, password: str, to: str, *extra: str):
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", tls, "--auth", mechanism,
                           "--auth-user", user, "--auth-password", password, "--from", user, "--to", to,
                           "--header", f"Subject: {mechanism} {tls}", *extra],
                          capture_output=True, text=True, timeout=60)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def tls_client(port: int) -> Client:
    """A Client on an implicit-TLS port (465)."""
    c = Client.__new__(Client)
    import socket
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))
    c.buf, c.timeout = b"", 20
    c.greeting = c.reply()
    return c


def test_swaks_authenticates_with_each_mechanism_on_587_and_465(auth_pipeline):
    p = auth_pipeline()
    sent = 0
    for role, tls in (("submission", "--tls"), ("submissions", "--tlsc")):
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            out = swaks(p.auth_ports[role], tls, mechanism, ALICE, PASSWORDS[ALICE], BOB)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "235 2.7.0 Authentication successful" in out.stdout
            sent += 1
    delivered = p.wait_messages(BOB, sent)
    edge = received_by(delivered[0], "edge")
    assert "with ESMTPSA" in edge, edge                  # RFC 3848: ESMTP + TLS + AUTH
    assert "(using TLSv1." in edge
    # the login travels downstream in XCLIENT LOGIN: the filter's log line has it
    p.filter.wait_log(rf"from=<{ALICE}>, size=\d+, nrcpt=1, message-id=<[^>]+>, login=<{ALICE}>, .*: 250 ")
    assert len(p.edge.log_lines(f"auth: client=unknown[127.0.0.1] mechanism=CRAM-MD5 user=<{ALICE}>")) == 2


def test_cram_md5_needs_a_stored_secret(auth_pipeline):
    p = auth_pipeline()
    out = swaks(p.auth_ports["submission"], "--tls", "CRAM-MD5", BOB, PASSWORDS[BOB], ALICE)
    assert out.returncode != 0 and "535 5.7.8" in out.stdout


def test_auth_over_tls_only_and_mail_needs_tls_then_auth(auth_pipeline):
    p = auth_pipeline()
    with Client(p.auth_ports["submission"]) as c:
        ehlo = c.ehlo()
        assert "STARTTLS" in ehlo.text and "AUTH" not in ehlo.text
        r = c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")
        assert (r.code, r.enhanced) == (538, "5.7.11"), r
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.enhanced, r.text) == (530, "5.7.0", "Must issue a STARTTLS command first"), r
        assert c.cmd("STARTTLS").code == 220
        c.starttls()
        assert "AUTH PLAIN LOGIN CRAM-MD5" in c.ehlo().text
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.enhanced, r.text) == (530, "5.7.0", "Authentication required"), r
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235
        assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 250
    # the mx listener takes no AUTH, even over TLS
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        c.starttls()
        assert "AUTH" not in c.ehlo().text
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 502
    # 465: TLS from the first byte, AUTH before MAIL
    c = tls_client(p.auth_ports["submissions"])
    try:
        assert "AUTH PLAIN LOGIN CRAM-MD5" in c.ehlo().text
        assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 530
    finally:
        c.close()


def test_authenticated_users_relay_anywhere_as_themselves_only(auth_pipeline):
    p = auth_pipeline()
    c = tls_client(p.auth_ports["submissions"])
    try:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}").code == 235
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.enhanced) == (553, "5.7.1") and "not owned by user" in r.text, r
        assert c.cmd(f"MAIL FROM:<{BOB.upper()}>").code == 250          # their own, any case
        r = c.cmd("RCPT TO:<someone@remote.example.net>")
        assert r.code == 250, r            # relayed: the filter trusts the edge's XCLIENT LOGIN
    finally:
        c.close()
    # without AUTH, the mx listener is no relay
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{BOB}>").code == 250
        r = c.cmd("RCPT TO:<someone@remote.example.net>")
        assert (r.code, r.enhanced) == (554, "5.7.1"), r


def test_brute_force_is_blocked_with_a_fail2ban_line(auth_pipeline):
    p = auth_pipeline(client_failure_limit=3, block_time=60)
    c = tls_client(p.auth_ports["submissions"])
    try:
        c.ehlo()
        codes = [c.cmd(f"AUTH PLAIN {plain(ALICE, f'guess{i}')}").code for i in range(3)]
        assert codes == [535, 535, 421]
        assert c.closed_by_server()
    finally:
        c.close()
    c = tls_client(p.auth_ports["submissions"])
    try:
        c.ehlo()
        r = c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")   # even the right password
        assert (r.code, r.enhanced) == (421, "4.7.0") and "too many failed authentications" in r.text, r
    finally:
        c.close()
    failed = p.edge.log_lines("auth failed: client=unknown[127.0.0.1] mechanism=PLAIN user=<alice@example.test>")
    assert len(failed) == 3
    p.edge.wait_log(r"auth blocked: client=\[127\.0\.0\.1\] after 3 failures in 900s; blocked for 60s")
    # the fail2ban filter of docs/edge.md matches each failure and the block, naming the client
    failregex = fail2ban_regexes()
    hits = [m.group("host") for line in p.edge.log_text().splitlines() for rx in failregex
            if (m := rx.search(line))]
    assert hits == ["127.0.0.1"] * 4


def fail2ban_regexes() -> list:
    """The failregex lines of docs/edge.md, with fail2ban's <HOST> as an address group."""
    import re
    text = (REPO / "docs" / "edge.md").read_text()
    block = text.split("failregex = ", 1)[1].split("```", 1)[0]
    return [re.compile(line.strip().replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))
            for line in block.splitlines() if line.strip()]


def test_user_command(make_pipeline, tmp_path):
    p = make_pipeline(start=())
    p.edge.write_config(roles(p))
    config = str(p.edge.config_path)
    assert add_user(config, ALICE, "pw-1").returncode == 0
    again = add_user(config, ALICE, "pw-2")
    assert again.returncode == 1 and "already a user" in again.stderr
    assert add_user(config, "bad name", "pw").returncode == 1
    listed = smarthost("user", "list", "--config", config)
    assert listed.returncode == 0 and listed.stdout == f"{ALICE}\n"
    gone = smarthost("user", "delete", ALICE, "--config", config)
    assert gone.returncode == 0 and smarthost("user", "list", "--config", config).stdout == ""
    assert smarthost("user", "delete", ALICE, "--config", config).returncode == 1
    # a filter has no users
    refused = smarthost("user", "list", "--config", str(p.filter.config_path))
    assert refused.returncode == 2 and "users are the edge's" in refused.stderr


def test_a_listener_with_auth_needs_a_backend_and_tls(make_pipeline):
    p = make_pipeline(start=())
    sections = roles(p)
    sections["auth"] = {"users_file": None}
    p.edge.write_config(sections)
    p.edge.sections["auth"].pop("users_file", None)
    p.edge.write_config()
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 2 and "auth.users_file: required: listener submission takes AUTH" in out.stderr
    p.edge.write_config({"auth": {"users_file": str(p.root / "users")},
                         "server": {"tls_cert": None, "tls_key": None}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 2 and "listeners.submission.tls_cert: listener submission (submission) needs TLS" \
        in out.stderr, out.stderr


# -- the Dovecot backend (smtpd_sasl_type = dovecot) ------------------------------------

def test_the_edge_authenticates_through_a_real_dovecot(make_pipeline, dovecot):
    server = dovecot({ALICE: ("SHA512-CRYPT", "alice-dovecot"), BOB: ("CRAM-MD5", "bob-dovecot")})
    p = make_pipeline(start=())
    sections = roles(p, backend="dovecot", dovecot=server.socket)
    sections["auth"].pop("users_file")
    p.edge.write_config(sections)
    p.start()
    for role, tls, mechanism, user, password in (
            ("submission", "--tls", "PLAIN", ALICE, "alice-dovecot"),
            ("submission", "--tls", "LOGIN", ALICE, "alice-dovecot"),
            ("submissions", "--tlsc", "CRAM-MD5", BOB, "bob-dovecot")):
        out = swaks(p.auth_ports[role], tls, mechanism, user, password, ALICE if user == BOB else BOB)
        assert out.returncode == 0 and "235 2.7.0" in out.stdout, out.stdout + out.stderr
    p.wait_messages(BOB, 2)
    p.wait_messages(ALICE, 1)
    wrong = swaks(p.auth_ports["submission"], "--tls", "PLAIN", ALICE, "nope", BOB)
    assert "535 5.7.8" in wrong.stdout, wrong.stdout
    p.edge.wait_log(r"auth failed: client=unknown\[127\.0\.0\.1\] mechanism=PLAIN user=<alice@example\.test>")
    server.stop()                       # Dovecot down: a temporary failure, never a pass
    down = swaks(p.auth_ports["submission"], "--tls", "PLAIN", ALICE, "alice-dovecot", BOB)
    assert "454 4.7.0 Temporary authentication failure" in down.stdout, down.stdout
    server.start()
    again = swaks(p.auth_ports["submission"], "--tls", "PLAIN", ALICE, "alice-dovecot", BOB)
    assert again.returncode == 0, again.stdout


RELAY_TRICKS = ["someone@remote.example.net", "someone%remote.example.net@example.test",
                '"someone@remote.example.net"@example.test', "@example.test:someone@remote.example.net",
                "someone@remote.example.net@example.test", "someone@[192.0.2.1]", "someone@remote.example.net.",
                "someone@example.test@remote.example.net", "remote.example.net!someone@example.test"]


def test_no_listener_is_an_open_relay(auth_pipeline):
    """The open-relay battery against every listener: without AUTH nothing is relayed
    (refused at RCPT, or MAIL refused until AUTH); no trick of address syntax gets a 250."""
    p = auth_pipeline()
    with Client(p.edge.port) as c:                       # mx: relay refused, tricks refused
        c.ehlo()
        assert c.cmd("MAIL FROM:<spammer@remote.example.net>").code == 250
        for rcpt in RELAY_TRICKS:
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code >= 500, (rcpt, r)
    with Client(p.auth_ports["submission"]) as c:       # submission: no MAIL without TLS and AUTH
        c.ehlo()
        assert c.cmd("MAIL FROM:<spammer@remote.example.net>").code == 530
        assert c.cmd("STARTTLS").code == 220
        c.starttls()
        c.ehlo()
        assert c.cmd("MAIL FROM:<spammer@remote.example.net>").code == 530
        r = c.cmd("RCPT TO:<someone@remote.example.net>")
        assert r.code == 503, r
    c = tls_client(p.auth_ports["submissions"])
    try:
        c.ehlo()
        assert c.cmd("MAIL FROM:<spammer@remote.example.net>").code == 530
        assert c.cmd("RCPT TO:<someone@remote.example.net>").code == 503
    finally:
        c.close()
    assert not p.messages(ALICE) and not p.messages(BOB)


def test_a_user_name_under_attack_is_blocked_even_for_its_password(auth_pipeline):
    p = auth_pipeline(client_failure_limit=0, user_failure_limit=2)
    c = tls_client(p.auth_ports["submissions"])
    try:
        c.ehlo()
        assert [c.cmd(f"AUTH PLAIN {plain(ALICE, f'guess{i}')}").code for i in range(2)] == [535, 535]
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 535     # blocked
        assert c.cmd(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}").code == 235         # others are not
    finally:
        c.close()
    p.edge.wait_log(r"auth blocked: user=<alice@example\.test> after 2 failures")
    p.edge.wait_log(r"user=<alice@example\.test> reason=user alice@example\.test is blocked after too many")
