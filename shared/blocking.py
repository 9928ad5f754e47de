"""A bounded thread pool for the blocking calls the reactor must never make.

fsync, link and other disk calls that may stall run here; the reactor thread
only waits on the Deferred.  The pool is bounded so a burst of transactions
queues its work instead of spawning threads without limit.
"""
from __future__ import annotations

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class BlockingPool:
    def __init__(self, reactor, size: int = 8, name: str = "blocking") -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=size, name=name)

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self.pool.started:
            self.pool.stop()

    def run(self, fn, *args, **kwargs):
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)


class InlinePool:
    """Runs the call at once on the caller's thread: for unit tests only."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, fn, *args, **kwargs):
        from twisted.internet import defer
        return defer.maybeDeferred(fn, *args, **kwargs)
