"""Small helpers the integration and end-to-end tests share."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
