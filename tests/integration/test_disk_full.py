"""A full disk is a temporary problem of one transaction: 452 4.3.1 at end of data,
one log line, no traceback, and the session goes on.

The spool and the Maildir root live on a 1 MiB tmpfs mounted for the test (root is
needed to mount; `tests/run` runs as root in CI), so the disk really is full: no
write is faked.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import DOMAIN, Client, dot_stuff, message

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
BIG = message("too big for the disk", body=("z" * 998 + "\r\n") * 2500)      # 2.5 MB


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _send(port: int, data: bytes, c: Client):
    assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(dot_stuff(data) + b".\r\n")
    return c.reply()


def test_domain_tier_with_a_full_disk_answers_452_and_keeps_the_session(make_pipeline, small_disk):
    p = make_pipeline(domain={"mailboxes": {"maildir_root": str(small_disk / "mail")}}, start=("domain",))
    with Client(p.domain.port) as c:          # 127.0.0.1 is the domain tier's upstream host
        c.ehlo("filter.example.test")
        r = _send(p.domain.port, BIG, c)
        assert (r.code, r.enhanced) == (452, "4.3.1"), r
        assert c.cmd("NOOP").code == 250      # the session goes on
        r = _send(p.domain.port, message("small enough"), c)
        assert r.code == 250, r               # the space of the failed message was given back
    log = p.domain.log_text()
    assert "Traceback" not in log and "Internal error" not in log
    assert len([ln for ln in log.splitlines() if "No space left on device" in ln]) == 1, log
    [path] = (small_disk / "mail" / DOMAIN / "alice" / "Maildir" / "new").iterdir()
    assert b"Subject: small enough" in path.read_bytes()


def test_filter_with_a_full_spool_answers_452_at_the_edge(make_pipeline, small_disk):
    p = make_pipeline(filter={"queue": {"directory": str(small_disk / "spool")},
                              "verify": {"recipients": False}})
    with Client(p.edge.port) as c:
        c.ehlo()
        r = _send(p.edge.port, BIG, c)
        assert (r.code, r.enhanced) == (452, "4.3.1"), r
        assert c.cmd("NOOP").code == 250
    log = p.filter.log_text()
    assert "Traceback" not in log, log
    assert [ln for ln in log.splitlines() if "No space left on device" in ln], log
