"""`smarthost check-config` and the daemons agree: what a tier would refuse at
start-up, check-config refuses first, with the same one-line message (file, key,
reason), exit code 2 and no traceback; warnings go to check-config's stderr and
to the daemon's log, at start and on reload.

Both are run through the installed entry point, as an administrator runs them.
"""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import PYTHON, DOMAIN, Tier, child_env, self_signed

SMARTHOST = str(Path(PYTHON).with_name("smarthost"))


def smarthost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SMARTHOST, *args], env=child_env(), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def a_file(root: Path) -> str:
    path = root / "a-file"
    path.write_text("")
    return str(path)


def other_key(root: Path) -> str:
    return str(self_signed(root / "other-tls", "other.example.test")[1])


CASES = [
    ("edge", lambda root: {"server": {"hostname": "edge example.test"}}, "server.hostname", "whitespace"),
    ("edge", lambda root: {"next_hop": {"helo_name": "edge.example.test\r\nRSET"}}, "next_hop.helo_name",
     "whitespace"),
    ("filter", lambda root: {"log": {"file": str(root / "no-such-dir" / "filter.log")}}, "log.file",
     "does not exist"),
    ("edge", None, None, "not UTF-8"),
    ("edge", lambda root: {"server": {"tls_cert": str(root)}}, "server.tls_cert", "not a regular file"),
    ("edge", lambda root: {"server": {"tls_key": other_key(root)}}, "server.tls_key", "does not go with"),
    ("filter", lambda root: {"queue": {"directory": a_file(root) + "/spool"}}, "queue.directory",
     "is not a directory"),
    ("domain", lambda root: {"mailboxes": {"maildir_root": a_file(root) + "/mail"}}, "mailboxes.maildir_root",
     "is not a directory"),
    ("filter", lambda root: {"server": {"user": "no-such-user-smarthost"}}, "server.user", "no such user"),
    ("edge", lambda root: {"server": {"max_message_size": 2 ** 63 - 1}}, "server.max_message_size", "1 TiB"),
    ("domain", lambda root: {"mailboxes": {"users": [f"../../../tmp/x@{DOMAIN}"]}}, "mailboxes.users",
     "directory under mailboxes.maildir_root"),
    ("edge", lambda root: {"relay": {"mynetworks": ["0.0.0.0/0"]}}, "relay.mynetworks",
     "set relay.allow_public_mynetworks = true"),
    ("filter", lambda root: {"server": {"upstream_hosts": ["::/0"]}}, "server.upstream_hosts",
     "set server.allow_public_upstream_hosts = true"),
]


@pytest.mark.parametrize("tier_name,edit,key,reason", CASES,
                         ids=[f"{c[0]}-{c[2] or 'encoding'}" for c in CASES])
def test_check_config_refuses_what_the_daemon_refuses_with_the_same_line(make_pipeline, tier_name, edit, key,
                                                                          reason):
    tier: Tier = make_pipeline(start=()).tiers[tier_name]
    if edit is None:
        tier.config_path.write_bytes(tier.config_path.read_bytes() + b'# caf\xe9\n')
    else:
        tier.write_config(edit(tier.root))
    check = smarthost("check-config", str(tier.config_path))
    daemon = smarthost(tier_name, "--config", str(tier.config_path))
    for run in (check, daemon):
        assert run.returncode == 2, run
        assert run.stdout == "", run
        assert "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.splitlines()) == 1, run.stderr
    check_prefix, daemon_prefix = "smarthost check-config: ", f"smarthost {tier_name}: configuration error: "
    assert check.stderr.startswith(check_prefix) and daemon.stderr.startswith(daemon_prefix)
    message = check.stderr[len(check_prefix):]
    assert daemon.stderr[len(daemon_prefix):] == message
    assert message.startswith(f"{tier.config_path}: {key}: " if key else f"{tier.config_path}: "), message
    assert reason in message


def test_warnings_go_to_check_config_and_to_the_log_at_start_and_reload(make_pipeline):
    p = make_pipeline(start=())
    p.edge.write_config({"relay": {"relay_domains": []}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith(f"smarthost check-config: warning: {p.edge.config_path}: relay.relay_domains: ")

    filt = p.filter
    filt.write_config({"queue": {"fsync": False}, "relay": {"mynetworks": ["10.0.0.1/8"]}})
    out = smarthost("check-config", str(filt.config_path))
    assert out.returncode == 0, out.stderr
    prefix = "smarthost check-config: warning: "
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(prefix) for line in lines), out.stderr
    warnings = [line[len(prefix):] for line in lines]
    assert warnings[0].startswith(f"{filt.config_path}: relay.mynetworks: 10.0.0.1/8 has host bits set")
    assert warnings[1].startswith(f"{filt.config_path}: queue.fsync: ")

    filt.start()
    started = filt.log_text(since_start=True)
    for w in warnings:
        assert f"warn: {w}\n" in started, started
    mark = filt.log_size()
    filt.signal(signal.SIGHUP)
    filt.wait_log("configuration reloaded", since=mark)
    reloaded = filt.log_text()[mark:]
    for w in warnings:
        assert f"warn: {w}\n" in reloaded, reloaded
