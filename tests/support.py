"""Small helpers the integration and end-to-end tests share."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer, error as net_error
from twisted.python.failure import Failure


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something true; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """A daemon a test started as a child, listening on 127.0.0.1:`port`: stopped by its pid
    (SIGTERM, then SIGKILL after `timeout`; to its process group when it leads one), its
    log's tail for a failure's message (``log_file``, given by each kind)."""
    port: int
    proc: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    def _kill(self, sig: int) -> None:
        if os.getpgid(self.proc.pid) == self.proc.pid:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill(signal.SIGKILL)
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL (to its process group when it leads one): a crash."""
        if self.proc.poll() is None:
            self._kill(signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ready(self, answers: Callable[[int], bool], timeout: float, interval: float = 0.1) -> bool:
        """Whether `answers(port)` came true before the process exited or `timeout` passed;
        if not, the daemon is stopped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if answers(self.port):
                return True
            time.sleep(interval)
        self.stop()
        return False


def daemon_factory(start: Callable[[Path], Daemon], name: str):
    """The fixture `name`: a factory of daemons (``start(tmp_path)``), each stopped when the
    test ends."""
    @pytest.fixture(name=name)
    def factory(tmp_path):
        started: list[Daemon] = []

        def make() -> Daemon:
            server = start(tmp_path)
            started.append(server)
            return server
        yield make
        for server in started:
            server.stop()
    return factory


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, and not one this process was given before: a test that asks
    for several ports before binding any (a pipeline's tiers, then an extra listener) must not
    get the same number twice, which the kernel may well hand out again."""
    for _ in range(100):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no fresh free port on {host}")


def on_real_reactor(scenario: Callable[[Any], Any], timeout: float = 30) -> Any:
    """Run ``scenario(reactor)``, a coroutine, on a new real reactor (threads, sockets and
    time as in a daemon) until it returns; its result, or its exception raised here."""
    from twisted.internet.defer import Deferred
    from twisted.internet.selectreactor import SelectReactor
    from twisted.python.failure import Failure
    reactor = SelectReactor()
    out: list = []

    def go():
        d = Deferred.fromCoroutine(scenario(reactor))
        d.addBoth(out.append).addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.callLater(timeout, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert out, f"did not finish within {timeout:g}s"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@contextlib.contextmanager
def logged(namespace: str):
    """The text of every log event of `namespace` while the block runs (a list, filled as
    the events come)."""
    from twisted.logger import formatEvent, globalLogPublisher
    seen: list[str] = []

    def observe(event):
        if event.get("log_namespace") == namespace:
            seen.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


class RealReactor:
    """A private real reactor (a SelectReactor, never installed, never run).

    ``wait`` spins it with ``iterate()`` until one Deferred fires, bounded by
    a deadline, and returns the result (asserting it is not a Failure);
    ``close`` releases its sockets and timers.
    """

    def __init__(self) -> None:
        from twisted.internet.selectreactor import SelectReactor
        self.reactor = SelectReactor()

    def wait(self, d: defer.Deferred, limit: float = 10.0):
        box = []
        d.addBoth(box.append)
        deadline = time.monotonic() + limit
        while not box:
            assert time.monotonic() < deadline, "Deferred did not fire in time"
            self.reactor.iterate(0.01)
        assert not isinstance(box[0], Failure), box[0]
        return box[0]

    def close(self) -> None:
        for _ in range(3):                     # let finished exchanges close their sockets
            self.reactor.iterate(0)
        for call in self.reactor.getDelayedCalls():
            call.cancel()
        for selectable in self.reactor.removeAll():
            selectable.connectionLost(Failure(net_error.ConnectionDone()))
        self.reactor.waker.connectionLost(None)


@pytest.fixture
def real():
    """A RealReactor, closed after the test."""
    r = RealReactor()
    yield r
    r.close()


_nameserver = None


def test_nameserver() -> str:
    """"127.0.0.1:PORT" of a real DNS server serving the test zones
    (:func:`tests.filter.mailauth.zones`), for the filter tiers the tests run: their
    checks look up SPF, DKIM and DMARC there, never on the machine's resolver.  One per
    test process, started on first use, stopped by its pid when the process exits."""
    global _nameserver
    if _nameserver is None:
        import atexit
        import tempfile
        from pathlib import Path
        from tests.dnsserver import start_dns_server
        from tests.filter.mailauth import zones
        _nameserver = start_dns_server(Path(tempfile.mkdtemp(prefix="smarthost-dns-")), zones())
        atexit.register(_nameserver.stop)
    host, port = _nameserver.address
    return f"{host}:{port}"


class GarbageServer:
    """A TCP server on a free loopback port, in a thread: every connection gets `answer`
    (after the request is read), then is closed; with `answer` None it is held, silent.
    What an outside component that is broken, or something else on its port, looks like."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if self.answer is None:
                self.held.append(conn)
                continue
            conn.settimeout(1)
            try:
                conn.recv(65536)
                conn.sendall(self.answer)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()
