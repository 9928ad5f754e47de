"""A real Redis server for tests: Debian's ``redis-server`` in its own process.

``start_redis_server(directory)`` runs ``redis-server`` on a free port of
127.0.0.1 with a new directory under `directory` as its working directory,
nothing saved to disk (``--save "" --appendonly no``), and returns once it
answers PING; ``.stop()`` ends it by its pid (SIGTERM, then SIGKILL),
``.kill()`` with SIGKILL (a crash), and ``.start()`` runs it again on the same
port, empty, for the outage tests.  The ``redis_server`` fixture is a factory
that stops every server it started when the test ends:

    from tests.redisserver import redis_server  # noqa: F401  (makes the fixture visible)

    def test_x(redis_server):
        server = redis_server()                  # or redis_server(password="s3cret")
        settings = {"redis": {"servers": [server.address]}}
        server.stop(); ...; server.start()
        replica = redis_server(replica_of=server)     # for failover tests, with
        sentinel = redis_server.sentinel(server)      # a Sentinel watching it as "mymaster"

``tests/run`` installs the package when it is missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import free_port


def _answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether the server at host:port answers PING (+PONG, or -NOAUTH when it wants a password)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    def __init__(self, directory: Path, host: str, port: int, password: str | None,
                 args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.host, self.port = host, port
        self.password = password
        self.args = args
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """host:port, as ``redis.servers`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [shutil.which("redis-server") or "redis-server", "--bind", self.host, "--port", str(self.port),
               "--dir", str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--logfile", str(self.log)]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.args)

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Run the server (again, on the same port); return once it answers PING."""
        assert not self.running(), "already running"
        cmd = self.command()
        with open(self.directory / "redis.stderr", "ab") as stderr:
            self.proc = subprocess.Popen(cmd, cwd=self.directory, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            if _answers(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.address} (exit {self.proc.returncode}):\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """End the server by its pid (SIGTERM, then SIGKILL); its exit status."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> int | None:
        """SIGKILL by pid: the server is gone at once, mid-reply if need be."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        return self.proc.returncode if self.proc is not None else None

    def client(self):
        """A redis-py client of this server, for a test's own look at the keys."""
        import redis
        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=2,
                           decode_responses=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace") + (self.directory / "redis.stderr").read_text(
                errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_redis_server(directory: Path, *, host: str = "127.0.0.1", password: str | None = None,
                       timeout: float = 10.0, replica_of: "RedisServer | None" = None) -> RedisServer:
    """A running redis-server in a new directory under `directory` (see the module docstring);
    with `replica_of`, a replica of that server."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="redis-", dir=directory))
    args = ("--replicaof", replica_of.host, str(replica_of.port)) if replica_of is not None else ()
    error = None
    for _ in range(3):               # a free port may be taken between the look and the bind
        server = RedisServer(workdir, host, free_port(host), password, args)
        try:
            return server.start(timeout)
        except RuntimeError as e:
            error = e
    raise error


class RedisSentinel(RedisServer):
    """``redis-server --sentinel`` watching one master as ``mymaster`` (quorum 1, a master
    silent for half a second is down, so a test's failover takes a few seconds)."""

    def __init__(self, directory: Path, host: str, port: int, master: RedisServer) -> None:
        super().__init__(directory, host, port, None)
        self.master = master

    def command(self) -> list[str]:
        conf = self.directory / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind {self.host}\ndir {self.directory}\nlogfile {self.log}\n"
                        f"sentinel monitor mymaster {self.master.host} {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds mymaster 500\n"
                        f"sentinel failover-timeout mymaster 3000\n")
        return [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"]

    def master_address(self) -> tuple[str, int] | None:
        """The master Sentinel names now."""
        import redis
        reply = redis.Redis(host=self.host, port=self.port, socket_timeout=2).execute_command(
            "SENTINEL", "get-master-addr-by-name", "mymaster")
        return (reply[0].decode(), int(reply[1])) if reply else None


def start_sentinel(directory: Path, master: RedisServer, *, host: str = "127.0.0.1") -> RedisSentinel:
    workdir = Path(tempfile.mkdtemp(prefix="sentinel-", dir=directory))
    return RedisSentinel(workdir, host, free_port(host), master).start()


@pytest.fixture
def redis_server(tmp_path):
    """Factory fixture: ``redis_server(**kw) -> RedisServer``; all are stopped after the test."""
    started: list[RedisServer] = []

    def start(**kwargs) -> RedisServer:
        server = start_redis_server(tmp_path, **kwargs)
        started.append(server)
        return server

    def sentinel(master: RedisServer) -> RedisSentinel:
        server = start_sentinel(tmp_path, master)
        started.append(server)
        return server

    start.sentinel = sentinel
    yield start
    for server in reversed(started):
        server.stop()
