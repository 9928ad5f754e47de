"""A real rspamd for tests: Debian's rspamd (3.4) with one normal worker on a free loopback port.

The configuration is the benchmark's (:func:`bench.filter.rspamd_config`: Debian's options,
metric, actions and symbol groups, its SPF, DKIM, DMARC and ARC modules, every file it
writes under its own directory) with the ``normal`` worker, which answers HTTP ``POST
/checkv2``; its DNS is the tests' DNS server.  ``start_rspamd(directory, dns_port)``
returns once the worker listens (rspamd compiles its regular expressions first: up to
half a minute on a busy machine).  ``.stop()`` ends it by its pid (SIGTERM, then SIGKILL
for every process it left), ``.kill()`` SIGKILLs them all at once.  It runs as _rspamd, so
its directory is one of its own under the system's temporary directory (pytest's are
private to root), removed when it stops; its log is copied to DIRECTORY then.  The
``rspamd`` fixture is a factory that stops every rspamd it started.  tests/run installs
Debian's rspamd.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.filter import RSPAMD, Rspamd
from tests.support import free_port


@dataclass
class RunningRspamd:
    daemon: Rspamd
    keep_log: Path               # where its log is copied when it stops

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.daemon.port}"

    def stop(self) -> None:
        self.daemon.stop()
        self._clean()

    def _clean(self) -> None:
        if self.daemon.root.exists():
            if self.daemon.log.exists():
                shutil.copy(self.daemon.log, self.keep_log)
            shutil.rmtree(self.daemon.root, ignore_errors=True)

    def kill(self) -> None:
        """Every rspamd process SIGKILLed at once: a crash."""
        for pid in self.daemon.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.daemon.stop()
        self._clean()

    def log_tail(self, lines: int = 30) -> str:
        return self.daemon.log_tail(lines)


def start_rspamd(directory: Path, dns_port: int, timeout: float = 120.0) -> RunningRspamd:
    if not RSPAMD.exists():
        raise RuntimeError(f"{RSPAMD} is missing: install Debian's rspamd package (tests/run does)")
    root = Path(tempfile.mkdtemp(prefix="smarthost-rspamd-"))
    os.chmod(root, 0o755)
    # The suffixes of the tests' domains only: rspamd compiles the whole Public Suffix List at each
    # start (some 15 s here); the benchmark gives it the whole list.
    tld = root / "tld.dat"
    tld.write_text("test\ninvalid\nexample\nnet\norg\ncom\nco.uk\n")
    os.chmod(tld, 0o644)
    daemon = Rspamd(root, free_port(), dns_port, worker="normal", url_tld=tld)
    server = RunningRspamd(daemon, Path(directory) / f"rspamd-{daemon.port}.log")
    try:
        daemon.start(timeout)
    except BaseException:
        server._clean()
        raise
    return server


@pytest.fixture
def rspamd(tmp_path):
    started: list[RunningRspamd] = []

    def start(dns_port: int) -> RunningRspamd:
        server = start_rspamd(tmp_path, dns_port)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()
