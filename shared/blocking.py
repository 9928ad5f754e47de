"""A bounded thread pool for the blocking calls the reactor must never make.

fsync, link and other disk calls that may stall run here; the reactor thread
only waits on the Deferred.  The pool is bounded so a burst of transactions
queues its work instead of spawning threads without limit.

:class:`WorkerPool` is the whole mechanism: ``size`` threads take jobs from
one queue in order and hand each result back with ``reactor.callFromThread``.
It does what the spool and the sinks need and no more (no per-job context
propagation, no growing and shrinking), because a job is handed over for every
message and Twisted's general-purpose ThreadPool costs several times as much
per hand-off.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    def __init__(self, reactor, size: int = 4, name: str = "blocking") -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.reactor = reactor
        self.max = size
        self.name = name
        self.started = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for n in range(self.max):
            t = threading.Thread(target=self._work, name=f"{self.name}-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, wait: bool = True) -> None:
        """Finish the jobs already handed over, then end the threads; `wait`: until they
        have ended (without it, the reactor thread is never held by a job that is slow to
        finish, such as a network call waiting for its timeout)."""
        if not self.started:
            return
        self.started = False
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            for t in self._threads:
                t.join()
        self._threads = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """``fn(*args, **kwargs)`` in a pool thread; a Deferred of its result."""
        if not self.started:
            return fail(RuntimeError(f"worker pool {self.name} is not running"))
        d: Deferred = Deferred()
        self._jobs.put((d, fn, args, kwargs))
        return d

    def _work(self) -> None:
        get, call = self._jobs.get, self.reactor.callFromThread
        while True:
            job = get()
            if job is _STOP:
                return
            d, fn, args, kwargs = job
            result = None
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)
            job = d = fn = args = kwargs = result = None     # hold no message while idle


class BlockingPool(WorkerPool):
    """The daemon's pool for blocking calls of the checks and sinks."""


class InlinePool:
    """Runs the call at once on the caller's thread: for unit tests only."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, fn, *args, **kwargs):
        from twisted.internet import defer
        return defer.maybeDeferred(fn, *args, **kwargs)
