"""The ``[redis]`` section, and a link to the Redis server that never blocks the reactor.

Several edge nodes that share one Redis share what the checks keep there (the
rate counters of :mod:`shared.counters`).  The section is declared by the
tiers that use it (the edge now, the filter with greylisting), not by the
core: the domain tier keeps nothing in Redis, and a ``[redis]`` table in its
file is refused as a setting of the tiers that have one.  ``servers`` empty
(the default) means no Redis: everything is counted in the process.  One
server for now; a list leaves room for Redis Sentinel, whose addresses it
will hold.

A :class:`RedisLink` calls redis-py in a small pool of its own threads
(:data:`THREADS`), not in the tier's :class:`shared.blocking.BlockingPool`:
that pool fsyncs the spool and reads reloaded files, and neither should wait
behind Redis calls stuck in their timeout during an outage, nor a connection's
count wait behind a slow disk (it would be taken for a Redis outage).  Every
call gets one attempt (redis-py's own retries are off) and must answer within
``redis.timeout`` seconds, counted on the reactor from the moment it is handed
over, so the wait in the pool's queue counts too; a call still queued at its
deadline is dropped unsent.

Outage: the first call that fails or times out marks the server down and logs
one line ("redis unavailable at HOST:PORT (REASON): counting locally"); from
then on :meth:`RedisLink.call` answers None at once (the caller does without:
:mod:`shared.counters` counts locally) except for one call, a probe, after a
back-off of 1 s doubling to 30 s.  The probe that succeeds logs one line
("redis at HOST:PORT answers again after N s: counting in redis") and calls
go to Redis again.  Calls that were in flight when the outage began do not
change that state, so one slow answer cannot make the lines flap.

A link is shared by the generations of a configuration while ``[redis]`` stays
the same (:func:`shared_link`): a reload keeps its connections, its state and
its back-off; it is closed when the last generation using it is retired, on a
reload that changes ``[redis]`` or when the tier stops.

Trusts: the Redis server, with what the checks store there (a node's counts
can be raised by anyone who can write to its keys).  The password travels in
the clear (no TLS to Redis yet): keep Redis on a private network.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.blocking import WorkerPool
from shared.config.schema import Section, bounded, hostport, hostport_text, setting

log = Logger(namespace="smarthost.redis")

THREADS = 2                    # calls in flight at once (each holds one connection)
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


def _key_prefix(value: str) -> str:
    if len(value) > 64 or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError(f"{value!r}: at most 64 characters, no whitespace or control characters")
    return value


@dataclass(frozen=True)
class RedisSettings:
    """Redis, shared by the nodes of a tier (counters of rate_limits); empty servers: none"""
    servers: tuple = setting((), "the Redis server, host:port (empty: no Redis, every node counts by "
                                 "itself; one server for now: a list is for Redis Sentinel later)", hostport)
    password: str = setting("", "the server's password (requirepass; empty: none); sent in the clear",
                            secret=True)
    db: int = setting(0, "the database number (0 to 65535)", bounded(0, 65535))
    key_prefix: str = setting("smarthost:", "put before every key this tier writes (at most 64 characters, "
                                            "no whitespace)", _key_prefix)
    timeout: float = setting(0.5, "seconds one Redis call may take, from being asked (more than 0, at "
                                  "most 10); past it Redis counts as down and the node counts locally",
                             bounded(0, 10, above=True))


def _finish_redis(ld) -> None:
    servers = ld.values["redis"]["servers"]
    if len(servers) > 1:
        raise ld.error("redis.servers", f"{len(servers)} servers given: one for now (a list is for Redis "
                                        f"Sentinel, not supported yet)")


REDIS = Section.of("redis", RedisSettings, finish=_finish_redis)


def describe(own: RedisSettings) -> str:
    """Where the server is, for check-config and the log."""
    host, port = own.servers[0]
    return f"{hostport_text(host, port)} db {own.db}, keys {own.key_prefix}*, timeout {own.timeout:g}s"


class _Expired(Exception):
    """A call that waited in the pool's queue past its deadline (its caller did without)."""


class RedisLink:
    """One Redis server, called from a pool of its own threads (see the module docstring).

    `fallback` and `restored` end the two log lines of an outage: what the node does
    while the server is down, and once it answers again."""

    def __init__(self, own: RedisSettings, reactor, *, fallback: str, restored: str,
                 threads: int = THREADS, backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX)) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        host, port = own.servers[0]
        self.address = hostport_text(host, port)
        self.reactor = reactor
        self.timeout = own.timeout
        self.fallback, self.restored = fallback, restored
        self.client = redis.Redis(host=host, port=port, db=own.db, password=own.password or None,
                                  socket_timeout=own.timeout, socket_connect_timeout=own.timeout,
                                  retry=Retry(NoBackoff(), 0), max_connections=threads)
        self.pool = WorkerPool(reactor, threads, name="redis")
        self.first_backoff, self.max_backoff = backoff
        self.backoff = self.first_backoff
        self.down_since: float | None = None     # reactor time the outage began; None: up
        self.retry_at = 0.0
        self.probing = False                      # the one call of an outage in flight
        self.closed = False

    @property
    def up(self) -> bool:
        return self.down_since is None

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred | None:
        """``fn(*args)`` (a redis-py call) in a pool thread: a Deferred of its result, which
        fails with the error or when there is no answer within the timeout.  None, at once,
        while the server is down and no retry is due, or once the link is closed: the caller
        does without Redis."""
        if self.closed:
            return None
        probe = False
        if self.down_since is not None:
            if self.probing or self.reactor.seconds() < self.retry_at:
                return None
            self.probing = probe = True
        if not self.pool.started:
            self.pool.start()
        deadline = time.monotonic() + self.timeout

        def job():
            if time.monotonic() > deadline:
                raise _Expired()
            return fn(*args)
        d = self.pool.run(job)
        d.addTimeout(self.timeout, self.reactor)
        return d.addCallbacks(self._answered, self._failed, callbackArgs=(probe,), errbackArgs=(probe,))

    def _answered(self, result: Any, probe: bool) -> Any:
        if probe:
            self.probing = False
            log.info("redis at {address} answers again after {outage:.1f}s: {restored}", address=self.address,
                     outage=self.reactor.seconds() - self.down_since, restored=self.restored)
            self.down_since, self.backoff = None, self.first_backoff
        return result

    def _failed(self, failure: Failure, probe: bool) -> Failure:
        now = self.reactor.seconds()
        if probe:
            self.probing = False
            self.backoff = min(self.backoff * 2, self.max_backoff)
            self.retry_at = now + self.backoff
        elif self.down_since is None and not self.closed:
            self.down_since, self.retry_at = now, now + self.backoff
            log.warn("redis unavailable at {address} ({reason}): {fallback}", address=self.address,
                     reason=self._reason(failure), fallback=self.fallback)
        return failure

    def _reason(self, failure: Failure) -> str:
        if failure.check(defer.TimeoutError, defer.CancelledError, _Expired):
            return f"no answer within {self.timeout:g}s"
        return f"{type(failure.value).__name__}: {failure.value}"

    def close(self) -> defer.Deferred:
        """Stop calling Redis and close the connections (in a pool thread, after the calls
        already handed over); the threads end without being waited for."""
        self.closed = True
        if not self.pool.started:
            return defer.succeed(None)
        d = self.pool.run(self.client.close)
        self.pool.stop(wait=False)
        return d.addErrback(lambda f: log.failure("closing the redis connections", f))


class SharedLinks:
    """The links of one use (``ctx.kept``), one per ``[redis]`` configuration, each with the
    number of generations that hold it."""

    def __init__(self) -> None:
        self.links: dict[RedisSettings, list] = {}      # settings -> [link, holders]

    def acquire(self, own: RedisSettings, reactor, **texts: str) -> RedisLink:
        entry = self.links.get(own)
        if entry is None:
            entry = self.links[own] = [RedisLink(own, reactor, **texts), 0]
        entry[1] += 1
        return entry[0]

    def release(self, link: RedisLink) -> defer.Deferred | None:
        for own, entry in self.links.items():
            if entry[0] is link:
                entry[1] -= 1
                if entry[1] == 0:
                    del self.links[own]
                    return link.close()
                return None
        return None


def shared_link(ctx, use: str, **texts: str) -> RedisLink | None:
    """The link of this configuration's ``[redis]`` for `use` (a name: each use has its
    own), released when this configuration is retired; None when the tier has no Redis.
    `texts`: :class:`RedisLink`'s `fallback` and `restored`."""
    own = ctx.settings.redis if ctx.settings.has("redis") else None
    if own is None or not own.servers:
        return None
    links = ctx.kept(f"redis.{use}", SharedLinks)
    link = links.acquire(own, ctx.reactor, **texts)
    ctx.on_retire(lambda: links.release(link))
    return link
