"""A real clamd for tests: ClamAV's daemon with the small signature database the tests ship.

``start_clamd(directory)`` copies tests/clamav/ (EICAR's MD5 signature and one of our own,
``Smarthost-Test-Signature``: the text SMARTHOST-TEST-VIRUS-7f3a anywhere in a file) into a
new database directory, writes a clamd.conf (TCP on a free 127.0.0.1 port, MIME and archive
scanning on, foreground, its own log and pid file), starts ``clamd`` and returns once it
answers PING.  ``.stop()`` ends it by its pid.  The ``clamd`` fixture is a factory that stops
every clamd it started when the test ends.  No signature is downloaded: the machine's own
ClamAV database is not used.  tests/run installs clamav-daemon.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import Daemon, daemon_factory, free_port

CLAMD = "/usr/sbin/clamd"
SIGNATURES = Path(__file__).parent / "clamav"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TEST_VIRUS = b"SMARTHOST-TEST-VIRUS-7f3a"


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")
    except OSError:
        return False


@dataclass
class Clamd(Daemon):
    workdir: Path

    @property
    def log_file(self) -> Path:
        return self.workdir / "clamd.log"


def start_clamd(directory: Path, timeout: float = 60.0) -> Clamd:
    if not os.path.exists(CLAMD):
        raise RuntimeError(f"{CLAMD} is missing: install clamav-daemon (tests/run does)")
    workdir = Path(tempfile.mkdtemp(prefix="clamd-", dir=directory))
    db = workdir / "db"
    db.mkdir()
    for f in SIGNATURES.iterdir():
        shutil.copy(f, db / f.name)
    port = free_port()
    lines = [f"DatabaseDirectory {db}", f"TCPSocket {port}", "TCPAddr 127.0.0.1", "Foreground yes",
             f"LogFile {workdir / 'clamd.log'}", f"PidFile {workdir / 'clamd.pid'}", "ScanMail yes",
             "ScanArchive yes", "StreamMaxLength 30M", "MaxThreads 4"]
    if os.getuid() == 0:
        lines.append("User root")              # its files are root's here; clamd would become clamav
    (workdir / "clamd.conf").write_text("\n".join(lines) + "\n")
    with open(workdir / "clamd.out", "wb") as out:
        proc = subprocess.Popen([CLAMD, "-c", str(workdir / "clamd.conf")], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    server = Clamd(port, proc, workdir)
    if server.ready(ping, timeout):
        return server
    raise RuntimeError(f"clamd did not answer on 127.0.0.1:{port}:\n"
                       f"{(workdir / 'clamd.out').read_text(errors='replace')[-2000:]}\n{server.log_tail()}")


clamd = daemon_factory(start_clamd, "clamd")
