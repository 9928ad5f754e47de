"""`smarthost demo` end to end: real clients (swaks, smtplib) against the three tiers.

The demo runs as an administrator would run it, as a subprocess; the tests read
its demo.json, send through the edge and find each message in the Maildir byte
for byte, apart from the trace fields the tiers put on top.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e import smtp_send
from tests.e2e.harness import (DOMAIN, PYTHON, REPO, check_delivered, child_env, children_of, compose,
                               find_by_message_id, free_port_block, pid_alive, received_by, split_trace, swaks,
                               swaks_replies, tail, wait_for_message, wait_until)

pytestmark = pytest.mark.slow

SENDER = "sender@example.net"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


class Demo:
    def __init__(self, root: Path, proc: subprocess.Popen, info: dict) -> None:
        self.root, self.proc, self.info = root, proc, info
        host, port = info["tiers"]["edge"]["smtp"].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.cert = root / "tls" / "cert.pem"

    def maildir(self, user: str) -> Path:
        return Path(self.info["mailboxes"][user])

    def child_pids(self) -> dict[str, int]:
        return {t: v["pid"] for t, v in self.info["tiers"].items()}

    def describe(self) -> str:
        logs = "\n".join(f"--- {t} log ---\n{tail(self.root / 'log' / f'{t}.log')}"
                         for t in ("edge", "filter", "domain"))
        return f"--- demo output ---\n{tail(self.root / 'demo.out')}\n{logs}"


def _ours(pid: int, config: str) -> bool:
    """`pid` is still the tier we started (not a recycled pid)."""
    try:
        return config.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@contextlib.contextmanager
def running_demo(root: Path, *, argv=None, cwd: Path = REPO):
    """Start `smarthost demo` on a free block of ports; stop it and its children on exit.

    ``argv(base_port)`` is the command (default: ``smarthost demo --dir ROOT``), run in ``cwd``.
    """
    root.mkdir(parents=True, exist_ok=True)
    argv = argv or (lambda base: [PYTHON, "-m", "shared.cli", "demo", "--dir", str(root),
                                  "--base-port", str(base)])
    proc = demo = None
    try:
        for _ in range(3):                       # another process may take the ports meanwhile
            base = free_port_block(8)           # mx, filter, domain, submission, submissions, dns, clamd, redis
            with open(root / "demo.out", "ab") as out:
                proc = subprocess.Popen(argv(base), cwd=cwd, env=child_env(),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            ready = root / "demo.json"
            wait_until(lambda: ready.exists() or proc.poll() is not None, 30, "demo.json")
            if ready.exists():
                break
            if b"port in use" not in (root / "demo.out").read_bytes():
                raise AssertionError(f"demo exited with {proc.returncode}\n{tail(root / 'demo.out')}")
        else:
            raise AssertionError(f"demo could not find free ports\n{tail(root / 'demo.out')}")
        wait_until(lambda: _json(ready), 5, "complete demo.json")
        demo = Demo(root, proc, _json(ready))
        yield demo
    finally:
        tiers: dict[int, str] = {}          # pid -> its config file, to recognise it later
        if demo is not None:
            tiers = {v["pid"]: v["config"] for v in demo.info["tiers"].values()}
        if proc is not None and proc.poll() is None:
            tiers.update({pid: str(root) for pid in children_of(proc.pid)})
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, config in tiers.items():   # whatever the demo left behind
            if pid_alive(pid) and _ours(pid, config):
                os.kill(pid, signal.SIGKILL)
        print(demo.describe() if demo else tail(root / "demo.out"))


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with running_demo(tmp_path_factory.mktemp("demo")) as d:
        yield d


def test_demo_json_describes_three_tiers(demo):
    assert set(demo.info["tiers"]) == {"edge", "filter", "domain"}
    assert demo.info["domain"] == DOMAIN
    assert set(demo.info["mailboxes"]) >= {ALICE, BOB}
    for tier, pid in demo.child_pids().items():
        assert pid_alive(pid), f"{tier} (pid {pid}) is not running"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_swaks_message_arrives_intact(demo, tmp_path, tls):
    tag = f"demo-swaks-{'tls' if tls else 'plain'}-{os.getpid()}"
    message = compose(tag, SENDER, ALICE)
    data = tmp_path / "message.eml"
    data.write_bytes(message[:-2])               # swaks adds the final CRLF itself
    r = swaks(demo.host, demo.port, SENDER, ALICE, data, tls=tls, ca_file=demo.cert if tls else None)
    assert r.returncode == 0, f"swaks failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    in_tls, end_of_data = swaks_replies(r.stdout)[-2]      # the last reply is QUIT's 221
    assert end_of_data.startswith("250"), r.stdout
    assert in_tls == tls, r.stdout

    fields = check_delivered(wait_for_message(demo.maildir(ALICE), f"<{tag}@e2e.test>"), message, SENDER)
    edge = received_by(fields, "edge")
    assert "[127.0.0.1]" in edge and "client.e2e.test" in edge, edge
    assert (" with ESMTPS " in edge) == tls and " with ESMTP" in edge, edge


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_smtplib_message_arrives_intact(demo, tls):
    tag = f"demo-smtplib-{'tls' if tls else 'plain'}-{os.getpid()}"
    message = compose(tag, SENDER, BOB)
    # The demo's certificate names edge.example.test; we connect to 127.0.0.1,
    # so verify the chain against it but not the name.
    r = smtp_send.send(demo.host, demo.port, SENDER, [BOB], message, starttls=tls,
                       cafile=str(demo.cert), check_hostname=False)
    assert r["starttls_offered"] is True, r
    if tls:
        assert r["tls"] and r["tls"].startswith("TLS"), r
        assert r["starttls_offered_after"] is False, "STARTTLS offered again inside TLS (RFC 3207 4.2)"
    assert r["mail"][0] == 250 and [c for c, _ in r["rcpt"]] == [250], r
    assert r["data"][0] == 250, r

    fields = check_delivered(wait_for_message(demo.maildir(BOB), f"<{tag}@e2e.test>"), message, SENDER)
    edge = received_by(fields, "edge")
    assert (" with ESMTPS " in edge) == tls, edge
    assert not find_by_message_id(demo.maildir(ALICE), f"<{tag}@e2e.test>"), "bob's message reached alice"


def test_unknown_user_is_refused_at_rcpt_and_the_rest_delivered(demo):
    tag = f"demo-unknown-{os.getpid()}"
    message = compose(tag, SENDER, ALICE)
    r = smtp_send.send(demo.host, demo.port, SENDER, [f"nobody@{DOMAIN}", ALICE], message)
    (code_unknown, text_unknown), (code_alice, _) = r["rcpt"]
    assert code_unknown == 550 and text_unknown.startswith("5.1.1"), r
    assert code_alice == 250, r
    assert r["data"][0] == 250, r
    check_delivered(wait_for_message(demo.maildir(ALICE), f"<{tag}@e2e.test>"), message, SENDER)
    assert not (demo.root / "mail" / DOMAIN / "nobody").exists()


def test_relay_to_another_domain_is_denied(demo):
    r = smtp_send.send(demo.host, demo.port, SENDER, ["someone@elsewhere.example"],
                       compose("relay", SENDER, "someone@elsewhere.example"))
    assert r["mail"][0] == 250, r
    [(code, text)] = r["rcpt"]
    assert code == 554 and text.startswith("5.7.1"), r
    assert r["data"] is None


def test_sigint_stops_the_demo_and_its_tiers(tmp_path):
    with running_demo(tmp_path / "demo") as demo:
        tag = f"demo-sigint-{os.getpid()}"
        message = compose(tag, SENDER, ALICE)
        r = smtp_send.send(demo.host, demo.port, SENDER, [ALICE], message)
        assert r["data"][0] == 250, r
        check_delivered(wait_for_message(demo.maildir(ALICE), f"<{tag}@e2e.test>"), message, SENDER)

        children = demo.child_pids()
        demo.proc.send_signal(signal.SIGINT)
        try:
            status = demo.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo still running 30 s after SIGINT\n{demo.describe()}")
        assert status == 0, f"demo exited with {status}\n{demo.describe()}"
        still = {t: pid for t, pid in children.items() if pid_alive(pid)}
        assert not still, f"tiers still running after the demo stopped: {still}"
        out = (demo.root / "demo.out").read_text(errors="replace")
        assert "Traceback" not in out, out
        for tier in children:
            log = (demo.root / "log" / f"{tier}.log").read_text(errors="replace")
            assert "Traceback" not in log, f"{tier} log:\n{log[-3000:]}"


def test_compose_demo_puts_a_relative_dir_where_it_is_run(tmp_path):
    """`bash compose/demo DIR` from another directory: DIR is relative to that directory."""
    script = str(REPO / "compose" / "demo")
    with running_demo(tmp_path / "here", argv=lambda base: ["bash", script, "here", str(base)],
                      cwd=tmp_path) as demo:
        assert demo.info["tiers"]["edge"]["config"] == str(tmp_path / "here" / "edge.toml")
        tag = f"demo-relative-{os.getpid()}"
        message = compose(tag, SENDER, ALICE)
        r = smtp_send.send(demo.host, demo.port, SENDER, [ALICE], message)
        assert r["data"][0] == 250, r
        wait_for_message(demo.maildir(ALICE), f"<{tag}@e2e.test>")
    assert not (REPO / "here").exists()


def test_demo_runs_the_three_listener_roles_with_its_users(demo):
    listeners = demo.info["tiers"]["edge"]["listeners"]
    assert set(listeners) == {"mx", "submission", "submissions"}
    assert listeners["mx"] == demo.info["tiers"]["edge"]["smtp"]
    users = demo.info["users"]
    assert set(users) == {ALICE, BOB} and all(len(p) >= 12 for p in users.values())
    assert users[ALICE] != users[BOB]
    assert os.stat(demo.root / "users.json").st_mode & 0o077 == 0
    out = (demo.root / "demo.out").read_text()
    assert out.count(users[ALICE]) == 1          # printed once, on the first run of the directory


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("role, tls", [("submission", "--tls"), ("submissions", "--tlsc")])
def test_swaks_submits_with_auth(demo, role, tls, mechanism):
    host, port = demo.info["tiers"]["edge"]["listeners"][role].rsplit(":", 1)
    tag = f"demo-auth-{role}-{mechanism}-{os.getpid()}"
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", tls, "--auth", mechanism, "--auth-user", BOB,
                        "--auth-password", demo.info["users"][BOB], "--from", BOB, "--to", ALICE,
                        "--header", f"Message-Id: <{tag}@example.net>"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    found = wait_for_message(demo.maildir(ALICE), f"<{tag}@example.net>")
    edge = [f for f in split_trace(found)[0] if b"by edge.example.test" in f]
    assert len(edge) == 1 and b"with ESMTPSA" in edge[0], edge


def test_demo_submission_needs_auth_and_tls(demo):
    host, port = demo.info["tiers"]["edge"]["listeners"]["submission"].rsplit(":", 1)
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", "--from", BOB, "--to", ALICE,
                        "--quit-after", "MAIL"], capture_output=True, text=True, timeout=60)
    assert "530 5.7.0 Must issue a STARTTLS command first" in r.stdout
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", "--tls", "--from", BOB, "--to", ALICE,
                        "--quit-after", "MAIL"], capture_output=True, text=True, timeout=60)
    assert "530 5.7.0 Authentication required" in r.stdout


def test_a_second_run_keeps_the_passwords(tmp_path):
    with running_demo(tmp_path / "again") as first:
        users = first.info["users"]
    with running_demo(tmp_path / "again") as second:
        assert second.info["users"] == users
    assert (tmp_path / "again" / "demo.out").read_text().count(users[ALICE]) == 1


def _demo_txt(demo):
    """dkimpy's key lookup, asked of the demo's own DNS server."""
    import dns.resolver
    host, port = demo.info["dns"].rsplit(":", 1)
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port = [host], int(port)

    def lookup(name, timeout=5):
        answer = r.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(answer[0].strings)
    return lookup


def test_demo_signs_submission_and_refuses_a_forged_sender(demo):
    import dkim
    assert demo.info["tiers"]["filter"]["checks"]["end_of_data"] == [
        "antivirus", "spf", "dkim", "arc", "dmarc", "auth_results", "actions", "greylist",
        "dkim_sign"]
    host, port = demo.info["tiers"]["edge"]["listeners"]["submissions"].rsplit(":", 1)
    tag = f"demo-signed-{os.getpid()}"
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", "--tlsc", "--auth", "PLAIN", "--auth-user", BOB,
                        "--auth-password", demo.info["users"][BOB], "--from", BOB, "--to", ALICE,
                        "--header", f"Message-Id: <{tag}@example.test>"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    found = wait_for_message(demo.maildir(ALICE), f"<{tag}@example.test>")
    assert b"d=example.test" in found and b"s=demo" in found
    assert dkim.verify(found, dnsfunc=_demo_txt(demo)), "the demo's signature does not verify with its DNS record"
    assert b"auth=pass smtp.auth=" + BOB.encode() in found
    # The hosted domain publishes p=reject and no SPF host: a forged sender is refused in the session.
    host, port = demo.info["tiers"]["edge"]["smtp"].rsplit(":", 1)
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", "--from", f"forger@{demo.info['domain']}",
                        "--to", ALICE], capture_output=True, text=True, timeout=60)
    assert "550 5.7.1" in r.stdout and "DMARC" in r.stdout, r.stdout


def test_demo_runs_its_clamd_and_refuses_eicar(demo, tmp_path):
    from tests.clamd import EICAR
    assert demo.info["services"]["clamd"].startswith("127.0.0.1:")
    eicar = tmp_path / "eicar.com"
    eicar.write_bytes(EICAR)
    host, port = demo.info["tiers"]["edge"]["smtp"].rsplit(":", 1)
    r = subprocess.run(["swaks", "--server", f"{host}:{port}", "--to", ALICE, "--attach", str(eicar)],
                       capture_output=True, text=True, timeout=60)
    assert "554 5.7.1 Virus found: Eicar-Test-Signature" in r.stdout, r.stdout


def test_demo_greylists_mail_that_scores_in_its_redis_and_delivers_the_retry(demo):
    import time
    import redis
    address = demo.info["services"]["redis"]
    assert address.startswith("127.0.0.1:")
    assert demo.info["greylist"] == {"delay": 10, "min_score": 1.0}
    assert "greylist" in demo.info["tiers"]["filter"]["checks"]["end_of_data"]
    host, port = demo.info["tiers"]["edge"]["smtp"].rsplit(":", 1)
    tag = f"demo-greylist-{os.getpid()}"

    def send(sender, mid):
        return subprocess.run(["swaks", "--server", f"{host}:{port}", "--from", sender, "--to", BOB,
                               "--header", f"Message-Id: <{mid}@{DOMAIN}>"], capture_output=True, text=True,
                              timeout=60)
    plain = send(f"plain-{os.getpid()}@example.net", f"{tag}-plain")        # scores 0: never delayed
    assert "queued as" in plain.stdout, plain.stdout
    first = send(f"you-{os.getpid()}@softfail.{DOMAIN}", f"{tag}-first")    # SPF softfail: greylisted
    assert "451 4.7.1 Greylisted: please try again in 10 seconds" in first.stdout, first.stdout
    r_host, r_port = address.rsplit(":", 1)
    assert redis.Redis(host=r_host, port=int(r_port), socket_timeout=2).keys("smarthost:grey:t:*"), \
        "the triplet is not in the demo's redis"
    time.sleep(10.5)
    retry = send(f"you-{os.getpid()}@softfail.{DOMAIN}", f"{tag}-retry")
    assert "queued as" in retry.stdout, retry.stdout
    wait_for_message(demo.maildir(BOB), f"<{tag}-plain@{DOMAIN}>")
    delivered = wait_for_message(demo.maildir(BOB), f"<{tag}-retry@{DOMAIN}>")
    assert b"SPF_SOFTFAIL" in delivered
    assert not find_by_message_id(demo.maildir(BOB), f"<{tag}-first@{DOMAIN}>")
