"""A real spamd for tests: SpamAssassin's daemon with the rules Debian's package ships.

``start_spamd(directory)`` writes a site configuration of its own (the package's plugin
``.pre`` files and a local.cf: no Bayes, no auto-whitelist, no network tests, every client a
trusted relay so that the score does not depend on the test's Received fields), starts
``spamd`` on a free 127.0.0.1 port with at most 2 children and returns once it answers PING
(spamd compiles its rules first: a few seconds).  ``.stop()`` ends it by its pid.  The
``spamd`` fixture is a factory that stops every spamd it started when the test ends.  Nothing
is downloaded (no sa-update).  tests/run installs Debian's spamd package.

spamd drops root to the user ``nobody`` and reads its configuration as that user, so its
configuration and pid file are in a directory of their own under the system's temporary
directory (pytest's are private to root); it is removed at stop.  Its log (stderr) goes to
``spamd.log`` in DIRECTORY.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import Daemon, daemon_factory, free_port

SPAMD = "/usr/sbin/spamd"
SITE_CONFIG = "/etc/spamassassin"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
USER = "nobody"

LOCAL_CF = """\
# Written by tests/spamd.py
use_bayes 0
bayes_auto_learn 0
use_auto_whitelist 0
skip_rbl_checks 1
dns_available no
trusted_networks 127.0.0.0/8
internal_networks 127.0.0.0/8
required_score 5.0
"""


def ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in s.recv(64)
    except OSError:
        return False


@dataclass
class Spamd(Daemon):
    log: Path
    confdir: Path

    @property
    def log_file(self) -> Path:
        return self.log

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the parent (it ends its children), SIGKILL after `timeout`."""
        super().stop(timeout)
        shutil.rmtree(self.confdir, ignore_errors=True)

    def kill(self) -> None:
        """Gone at once, children and all (its process group): a crash."""
        super().kill()
        shutil.rmtree(self.confdir, ignore_errors=True)


def start_spamd(directory: Path, timeout: float = 120.0) -> Spamd:
    if not os.path.exists(SPAMD):
        raise RuntimeError(f"{SPAMD} is missing: install Debian's spamd package (tests/run does)")
    confdir = Path(tempfile.mkdtemp(prefix="smarthost-spamd-"))
    for pre in glob.glob(f"{SITE_CONFIG}/*.pre"):
        shutil.copy(pre, confdir)
    (confdir / "local.cf").write_text(LOCAL_CF)
    argv = [SPAMD, "--listen", "127.0.0.1", "--port", "", "--allowed-ips", "127.0.0.1",
            "--siteconfigpath", str(confdir), "--nouser-config", "--local", "--syslog", "stderr",
            "--pidfile", str(confdir / "spamd.pid"), "--max-children", "2", "--min-children", "1",
            "--min-spare", "1", "--max-spare", "2", "--timeout-child", "60"]
    if os.getuid() == 0:
        user = pwd.getpwnam(USER)
        os.chown(confdir, user.pw_uid, user.pw_gid)
        argv += ["--username", USER, "--helper-home-dir", str(confdir)]
    os.chmod(confdir, 0o755)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    log = Path(directory) / f"spamd-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Spamd(port, proc, log, confdir)
    if server.ready(ping, timeout, 0.2):
        return server
    raise RuntimeError(f"spamd did not answer PING on 127.0.0.1:{port}:\n{server.log_tail(40)}")


spamd = daemon_factory(start_spamd, "spamd")
