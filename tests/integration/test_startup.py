"""Starting a tier as an administrator does: as root with ``server.user`` set, and
failures to start that must reach the terminal (systemd's journal) with ``log.file`` set.

A tier started as root binds its listeners, becomes ``server.user``, and only
then creates what it writes (the filter's spool and its pid lock, the domain
tier's Maildir spool and reserve files), so that all of it belongs to that user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.integration.helpers import (DOMAIN, Tier, default_sections, free_port, merge, message,
                                       queued_id, smarthost, transaction, wait_until)

USER = "nobody"


def account() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("a tier gives up root for server.user only when started as root: run the tests as root")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} on this host")


@pytest.fixture
def base():
    """A temporary directory that server.user can reach (pytest's own is mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="smarthost-user-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def tiers(base):
    """The domain tier and the filter, started as root with server.user = nobody; each
    writes under ``base/home`` (owned by nobody), where nothing exists yet."""
    pw = account()
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    ports = {t: free_port() for t in ("edge", "filter", "domain")}
    overrides = {"filter": {"server": {"user": USER}, "queue": {"directory": str(home / "spool")}},
                 "domain": {"server": {"user": USER}, "mailboxes": {"maildir_root": str(home / "mail")}}}
    made = {t: Tier(t, base, ports[t], merge(default_sections(t, base, ports, None), overrides[t]))
            for t in ("domain", "filter")}
    yield home, made
    for t in made.values():
        if t.running:
            t.stop(timeout=10)


def owners(root: Path) -> dict[str, int]:
    """Every path under `root` (itself included) -> its owner's uid."""
    found = {str(root): root.stat().st_uid}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[path] = os.lstat(path).st_uid
    return found


def test_a_tier_started_as_root_writes_its_spool_and_maildir_as_server_user(tiers):
    home, t = tiers
    uid = pwd.getpwnam(USER).pw_uid
    t["domain"].start()
    t["filter"].start()
    replies = transaction(t["filter"].port, "sender@example.net", [f"alice@{DOMAIN}"], message("as nobody"))
    qid = queued_id(replies[-1])
    new = home / "mail" / DOMAIN / "alice" / "Maildir" / "new"
    delivered = wait_until(lambda: new.is_dir() and list(new.iterdir()), 15, "the message in alice's Maildir")
    assert len(delivered) == 1 and b"Subject: as nobody" in delivered[0].read_bytes()
    t["filter"].wait_log(rf"{qid}: .*status=sent")
    spool, maildir_spool = home / "spool", home / "mail" / ".tmp" / socket.gethostname()
    assert (spool / "pid").is_file() and (spool / "tmp").is_dir() and maildir_spool.is_dir()
    for path, owner in {**owners(spool), **owners(home / "mail")}.items():
        assert owner == uid, f"{path} is owned by uid {owner}, not by {USER}"
    for tier in t.values():
        assert f"running as {USER}" in tier.log_text()
        assert tier.stop() == 0


@pytest.mark.parametrize("tier, key, made_by_root", [
    ("filter", "queue.directory", "spool/tmp"),
    ("domain", "mailboxes.maildir_root", f"mail/.tmp/{socket.gethostname()}"),
])
def test_a_directory_left_owned_by_root_stops_the_start_naming_key_and_path(tiers, tier, key, made_by_root):
    """What an earlier version, which made these as root, left behind: refused at start,
    not a tier that runs and answers 451 to every message."""
    home, t = tiers
    path = home / made_by_root
    path.mkdir(parents=True)
    pw = pwd.getpwnam(USER)
    for parent in path.relative_to(home).parents:     # the parents are nobody's: only `path` is root's
        os.chown(home / parent, pw.pw_uid, pw.pw_gid)
    path.chmod(0o755)
    t[tier].start(wait=False)
    assert t[tier].wait_exit(15) == 1
    out = t[tier].output_text()
    assert f"{key}: {path} is not writable by user {USER}" in out, out
    assert "started:" not in t[tier].log_text()


def test_a_start_failure_reaches_stderr_when_the_log_goes_to_a_file(tmp_path):
    """With log.file set the reason is in the log and, for the terminal or the journal, on stderr."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"edge": free_port(), "filter": free_port(), "domain": port}
        domain = Tier("domain", tmp_path, port, default_sections("domain", tmp_path, ports, None))
        out = smarthost("domain", "--config", str(domain.config_path))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smarthost domain: cannot start: "), out.stderr
    assert str(port) in lines[0] and "Address already in use" in lines[0], out.stderr
    assert "cannot start: " in domain.log_text() and str(port) in domain.log_text()


def _free_privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def test_every_listener_is_bound_before_privileges_are_dropped_and_reload_still_works(base):
    """As root with server.user: a privileged port and a PROXY-protocol listener are bound
    first, then the edge is nobody; a reload (run as nobody) rebuilds what it may."""
    pw = account()
    ports = {t: free_port() for t in ("edge", "filter", "domain")}
    low = _free_privileged_port()
    run = base / "run"
    run.mkdir()
    sections = merge(default_sections("edge", base, ports, None), {
        "server": {"user": USER, "listen": None, "pid_file": str(run / "edge.pid")},
        "listeners": {"mx": {"endpoint": f"tcp:port={ports['edge']}:interface=127.0.0.1"},
                      "low": {"endpoint": f"haproxy:tcp:port={low}:interface=127.0.0.1", "proxy_hosts": ["127.0.0.1"]}}})
    edge = Tier("edge", base, ports["edge"], sections)
    try:
        edge.start()
        status = Path(f"/proc/{edge.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(pw.pw_uid)}, status
        assert f"listening on 127.0.0.1:{low} (low: mx, policy default" in edge.log_text()
        with socket.create_connection(("127.0.0.1", low), timeout=5) as s:
            s.sendall(b"PROXY TCP4 198.51.100.4 127.0.0.1 1234 25\r\n")
            assert s.makefile("rb").readline().startswith(b"220 ")
        edge.wait_log(r"connect from unknown\[198\.51\.100\.4\]")
        edge.write_config({"relay": {"relay_domains": [DOMAIN, "example.net"]}})
        out = smarthost("reload", "--config", str(edge.config_path))
        assert out.returncode == 0, out.stderr + edge.log_tail()
        assert edge.stop() == 0
    finally:
        if edge.running:
            edge.stop(timeout=10)
