"""A real Dovecot for tests: its authentication service alone, in a temporary directory.

``start_dovecot(directory, users)`` writes a minimal ``dovecot.conf`` and a
passwd-file into a new directory, runs ``dovecot -F -c FILE`` as a child in
its own process group, waits until the auth service answers a
handshake on its UNIX socket and on its TCP port, and returns a DovecotServer;
``.stop()`` ends the master and whatever it forked by the group's id, and
``.start()`` brings the same Dovecot back (same socket, same port);
``.cleanup()`` stops it for good and removes its files.  The
``dovecot`` fixture is a factory that stops every server it started when the
test ends:

    from tests.dovecot import dovecot  # noqa: F401  (makes the fixture visible)

    def test_x(dovecot):
        server = dovecot()
        backend = DovecotBackend(reactor, server.socket)       # or server.tcp_address

Users are data: ``{name: (scheme, password)}``, the scheme one of ``doveadm pw
-l`` (the passwd-file entries are made with ``doveadm pw``).  The defaults,
:data:`USERS`: ``cram`` stored with the CRAM-MD5 scheme (so CRAM-MD5 works for
it), ``hashed`` with SHA512-CRYPT (only the plaintext mechanisms can work).
The user :data:`TEMPFAIL_USER` is in no file: a second passdb, a checkpassword
script that exits 111, answers for that name alone, so Dovecot fails it
temporarily (``code=temp_fail``), as it does when a real passdb is down.

The configuration, chosen so that Dovecot touches nothing outside its
directory (the package's /etc/dovecot is never read):

- ``protocols =`` empty: no IMAP, POP3 or LMTP listener, no login processes;
- everything (configuration, passwd-file, ``base_dir`` with the sockets and
  the pid file, ``state_dir``, ``log_path``) in a short directory under /tmp,
  mode 0755: UNIX socket paths are limited to 107 bytes and pytest's
  directories are long, and the auth process reads the passwd-file as the
  ``dovecot`` user, which pytest's 0700 directories keep out.  ``cleanup()``
  removes it and leaves a copy of the log in the directory given;
- ``ssl = no``; ``auth_mechanisms`` as asked (default plain login cram-md5);
- ``service auth``: ``unix_listener smarthost-auth`` (mode 0600, in base_dir;
  :attr:`DovecotServer.socket`) and ``inet_listener`` on a free port of
  127.0.0.1, or of the `host` asked for (:attr:`DovecotServer.tcp_address`);
- ``auth_failure_delay = 0``: a wrong password is answered at once instead of
  after 2 s.  Dovecot's penalty still applies (after a failure from an address,
  that address's next requests wait seconds): give each test that fails
  authentications remote addresses of its own;
- ``auth_debug = yes``: the log (:meth:`DovecotServer.log_text`) shows every
  client connection ("auth client connected") and every request line, which
  tests read to see how many connections a client made, and Dovecot's
  complaints ("BUG: ...") when a client breaks the protocol.  ``debug=False``
  (for the benchmark, ``bench/auth.py``) logs as Dovecot does by default;
  :meth:`DovecotServer.client_connections` then counts nothing.

``hashed={name: "{SCHEME}..."}`` adds users whose hashes were made elsewhere
(the benchmark gives Dovecot the very argon2id hashes of smarthost's user
store, so both verify the same parameters).

The master runs as root here and its auth process as the package's
``dovecot`` user, as packaged; nothing else of the system is changed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pytest

from tests.support import free_port

USERS = {"cram": ("CRAM-MD5", "cram-secret"), "hashed": ("SHA512-CRYPT", "hashed-secret")}
TEMPFAIL_USER = "tempfail"
SOCKET_NAME = "smarthost-auth"

_CONFIG = """\
# Written by tests/dovecot.py: Dovecot's authentication service only.
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log}
protocols =
ssl = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
auth_debug = {debug}
auth_verbose = {debug}

passdb {{
  driver = passwd-file
  args = {users}
}}
passdb {{
  driver = checkpassword
  args = {tempfail}
  username_filter = {tempfail_user}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}

service auth {{
  unix_listener {socket_name} {{
    mode = 0600
  }}
  inet_listener {socket_name} {{
    address = {host}
    port = {port}
  }}
}}
"""


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None)


def require_dovecot() -> None:
    """Fail (never skip: a skipped check is not a passed one) when Dovecot is not installed."""
    if dovecot_binary() is None:
        pytest.fail("dovecot is not installed (tests/run installs dovecot-core)")


def password_hash(config: Path, scheme: str, password: str) -> str:
    """``{SCHEME}...``, as ``doveadm pw`` makes it (with our config, not /etc/dovecot's)."""
    doveadm = shutil.which("doveadm") or str(Path(dovecot_binary() or "/usr/sbin/dovecot").with_name("doveadm"))
    out = subprocess.run([doveadm, "-c", str(config), "pw", "-s", scheme, "-p", password],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def _handshake(family: int, address, timeout: float = 0.5) -> bool:
    """True if the auth service at `address` sends its whole handshake (up to DONE)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address)
            s.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
            data = b""
            while b"\nDONE\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
        except OSError:
            return False
    return data.startswith(b"VERSION\t1\t")


@dataclass
class DovecotServer:
    directory: Path                   # short, under /tmp: config, users, log, base_dir
    keep: Path                        # where cleanup() leaves a copy of the log
    host: str
    port: int
    timeout: float = 10.0
    debug: bool = True                # auth_debug: the log shows every connection and request
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.directory / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        return self.directory / "run"

    @property
    def socket(self) -> str:
        """The auth service's UNIX socket (what ``smtpd_sasl_path`` names for Postfix)."""
        return str(self.base_dir / SOCKET_NAME)

    @property
    def tcp_address(self) -> str:
        """The auth service's TCP listener as ``host:port`` (``[host]:port`` for IPv6)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "dovecot.log"

    @property
    def pid(self) -> int | None:
        """The master's pid (and its process group's id), while it runs."""
        return self.proc.pid if self.running() else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "DovecotServer":
        """Run the master and wait until the auth service answers on both listeners."""
        if self.running():
            return self
        binary = dovecot_binary()
        if binary is None:
            raise RuntimeError("dovecot is not installed (tests/run installs dovecot-core)")
        with open(self.directory / "dovecot.stderr", "ab") as stderr:
            self.proc = subprocess.Popen([binary, "-F", "-c", str(self.config)], cwd=self.directory,
                                         stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.running():
            connections = self.client_connections()
            if (_handshake(socket.AF_UNIX, self.socket)
                    and _handshake(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                   (self.host, self.port))):
                # the log process writes a little later: wait for the probes' lines, so that
                # client_connections() counts from here on only the connections of the test
                while (self.debug and self.client_connections() < connections + 2
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
                return self
            time.sleep(0.05)
        status = self.proc.poll()
        self.stop()
        stderr = (self.directory / "dovecot.stderr").read_text(errors="replace")
        raise RuntimeError(f"Dovecot did not answer on {self.socket} and {self.tcp_address} "
                           f"(exit status {status}):\n{stderr[-2000:]}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the master and every process it forked (one process group: the master's pid).

        SIGTERM first (the master then stops its children and removes its
        sockets), SIGKILL to the group for whatever is left after `timeout`.
        """
        if self.proc is None:
            return None
        group = self.proc.pid
        if self.proc.poll() is None:
            self._signal_group(group, signal.SIGCONT)       # a paused auth process must see SIGTERM
            self._signal_group(group, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while self._group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._group_alive(group):
            self._signal_group(group, signal.SIGKILL)
        self.proc.wait(timeout)
        return self.proc.returncode

    def auth_pid(self) -> int:
        """The pid of the auth process (Dovecot starts it on the first connection)."""
        if not self.running():
            raise RuntimeError("Dovecot is not running")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for pid in _children(self.proc.pid):
                if _comm(pid) == "auth":
                    return pid
            _handshake(socket.AF_UNIX, self.socket)            # makes the master start one
            time.sleep(0.05)
        raise RuntimeError("no Dovecot auth process")

    def pause(self) -> int:
        """Freeze the auth process (SIGSTOP): connections are accepted, nothing is answered."""
        pid = self.auth_pid()
        os.kill(pid, signal.SIGSTOP)
        return pid

    def resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client_connections(self) -> int:
        """How many client connections the auth service has accepted (from its debug log,
        which Dovecot's log process writes a few milliseconds after the fact)."""
        return self.log_text().count("auth client connected")

    def protocol_errors(self) -> list[str]:
        """Dovecot's complaints about clients that broke the protocol ("BUG: ...")."""
        return [line for line in self.log_text().splitlines() if "BUG:" in line]

    def cleanup(self) -> None:
        """Stop Dovecot and remove its directory, keeping a copy of the log in `keep`."""
        self.stop()
        if self.log.exists():
            shutil.copyfile(self.log, self.keep / f"{self.directory.name}.log")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "DovecotServer":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @staticmethod
    def _signal_group(group: int, sig: int) -> None:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _group_alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def start_dovecot(directory: Path, users: Mapping[str, tuple[str, str]] = USERS, *,
                  mechanisms: str = "plain login cram-md5", host: str = "127.0.0.1",
                  port: int | None = None, timeout: float = 10.0, debug: bool = True,
                  hashed: Mapping[str, str] | None = None) -> DovecotServer:
    """Start a Dovecot auth service for `users`; return once it answers. See the module docstring."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dovecot-", dir="/tmp"))
    workdir.chmod(0o755)              # the auth process reads the users as the dovecot user
    tempfail = workdir / "tempfail.sh"
    tempfail.write_text("#!/bin/sh\n# checkpassword: 111 is a temporary failure\nexit 111\n")
    tempfail.chmod(0o755)
    (workdir / "state").mkdir()
    attempts = 1 if port is not None else 3
    last_error: Exception | None = None
    for _ in range(attempts):
        server = DovecotServer(directory=workdir, keep=Path(directory), host=host,
                               port=port if port is not None else free_port(host), timeout=timeout,
                               debug=debug)
        server.config.write_text(_CONFIG.format(
            base_dir=server.base_dir, state_dir=workdir / "state", log=server.log,
            debug="yes" if debug else "no",
            mechanisms=mechanisms, users=workdir / "users", tempfail=tempfail,
            tempfail_user=TEMPFAIL_USER, socket_name=SOCKET_NAME, host=host, port=server.port))
        entries = {name: password_hash(server.config, scheme, password)
                   for name, (scheme, password) in users.items()}
        entries.update(hashed or {})
        (workdir / "users").write_text("".join(
            f"{name}:{hashed_password}:65534:65534::/nonexistent::\n"
            for name, hashed_password in entries.items()))
        try:
            return server.start()
        except RuntimeError as e:             # most likely the port was taken meanwhile
            last_error = e
    server.cleanup()
    raise RuntimeError(f"Dovecot did not start: {last_error}")


@pytest.fixture
def dovecot(tmp_path):
    """Factory fixture: ``dovecot(users=USERS, **kw) -> DovecotServer``; all are stopped after the test."""
    require_dovecot()
    started: list[DovecotServer] = []

    def start(users: Mapping[str, tuple[str, str]] = USERS, **kwargs) -> DovecotServer:
        server = start_dovecot(tmp_path, users, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.cleanup()
