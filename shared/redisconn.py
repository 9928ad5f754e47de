"""The ``[redis]`` section, and a link to the Redis server that never blocks the reactor.

Several edge nodes that share one Redis share what the checks keep there (the
rate counters of :mod:`shared.counters`).  The section is declared by the
tiers that use it (the edge now, the filter with greylisting), not by the
core: the domain tier keeps nothing in Redis, and a ``[redis]`` table in its
file is refused as a setting of the tiers that have one.  ``servers`` empty
(the default) means no Redis: everything is counted in the process.  For
failover, ``sentinels`` lists Redis Sentinel's addresses instead: redis-py asks
them for the master of ``master_name`` and, after a failover, for the new one
(its connections to the old master are dropped at their first error; the link's
outage handling below covers the seconds Sentinel takes to promote a replica).

A :class:`RedisLink` sends commands with redis-py from a small pool of its own
threads (:data:`THREADS`), not from the tier's
:class:`shared.blocking.BlockingPool`: that pool fsyncs the spool and reads
reloaded files, and neither should wait behind Redis commands stuck in their
timeout during an outage, nor a connection's count wait behind a slow disk (it
would be taken for a Redis outage).  Commands asked while both threads wait
for Redis are pipelined together (one write, one round trip).  Every command
gets one attempt (redis-py's own retries are off) and must be answered within
``redis.timeout`` seconds, counted on the reactor from the moment it is asked,
so a wait for a free thread counts too; a command still unsent at its
deadline is dropped.

Outage: the first command that fails or times out marks the server down and
logs one line ("redis unavailable at HOST:PORT (REASON): counting locally");
from then on :meth:`RedisLink.command` answers None at once (the caller does
without: :mod:`shared.counters` counts locally) except for one command, a
probe, after a back-off of 1 s doubling to 30 s.  The probe that succeeds logs
one line ("redis at HOST:PORT answers again after N s: counting in redis")
and commands go to Redis again.  Commands that were in flight when the outage
began do not change that state, so one slow answer cannot make the lines flap.

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
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.blocking import WorkerPool
from shared.config.schema import Section, bounded, hostport, hostport_text, setting

log = Logger(namespace="smarthost.redis")

THREADS = 2                    # batches in flight at once (each holds one connection)
BATCH = 256                    # commands in one pipeline at most
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0


def _key_prefix(value: str) -> str:
    if len(value) > 64 or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError(f"{value!r}: at most 64 characters, no whitespace or control characters")
    return value


@dataclass(frozen=True)
class RedisSettings:
    """Redis, shared by the nodes of a tier (counters of rate_limits); empty servers: none"""
    servers: tuple = setting((), "the Redis server, host:port (empty, and no sentinels: no Redis, every "
                                 "node counts by itself)", hostport)
    sentinels: tuple = setting((), "Redis Sentinel addresses, host:port, instead of servers: the master "
                                   "they name for master_name is used, and the new one after a failover",
                               hostport)
    master_name: str = setting("mymaster", "the master's name in Sentinel (sentinel monitor NAME ...)")
    password: str = setting("", "the server's password (requirepass; empty: none); sent in the clear",
                            secret=True)
    db: int = setting(0, "the database number (0 to 65535)", bounded(0, 65535))
    key_prefix: str = setting("smarthost:", "put before every key this tier writes (at most 64 characters, "
                                            "no whitespace)", _key_prefix)
    timeout: float = setting(0.5, "seconds one Redis call may take, from being asked (more than 0, at "
                                  "most 10); past it Redis counts as down and the node counts locally",
                             bounded(0, 10, above=True))


def _finish_redis(ld) -> None:
    servers, sentinels = ld.values["redis"]["servers"], ld.values["redis"]["sentinels"]
    if len(servers) > 1:
        raise ld.error("redis.servers", f"{len(servers)} servers given: one (for failover, list Redis "
                                        f"Sentinel's addresses in redis.sentinels instead)")
    if servers and sentinels:
        raise ld.error("redis.sentinels", "both servers and sentinels are set: the master comes from "
                                          "Sentinel, leave servers empty")
    if not ld.values["redis"]["master_name"].strip():
        raise ld.error("redis.master_name", "empty: Sentinel knows its masters by name")


REDIS = Section.of("redis", RedisSettings, finish=_finish_redis)


def configured(own: RedisSettings | None) -> bool:
    """Whether `own` names a Redis (a server, or Sentinels)."""
    return own is not None and bool(own.servers or own.sentinels)


def where(own: RedisSettings) -> str:
    """The server, or the Sentinel master, in a line of the log."""
    if own.sentinels:
        return f"{own.master_name} (sentinels {','.join(hostport_text(h, p) for h, p in own.sentinels)})"
    return hostport_text(*own.servers[0])


def describe(own: RedisSettings) -> str:
    """Where the server is, for check-config."""
    return f"{where(own)} db {own.db}, keys {own.key_prefix}*, timeout {own.timeout:g}s"


class _Expired(Exception):
    """A command that waited past its deadline (its caller did without): not sent."""


class RedisLink:
    """One Redis server, called from a pool of its own threads (see the module docstring).

    Commands are pipelined as they come: while every thread waits for Redis, the commands
    asked meanwhile gather, and the next free thread sends them together (up to
    :data:`BATCH`), in one write and one round trip.  At a light load each command goes
    alone, as soon as it is asked; at a heavy one the syscalls and the round trip are
    shared by many counts.

    `fallback` and `restored` end the two log lines of an outage: what the node does
    while the server is down, and once it answers again."""

    def __init__(self, own: RedisSettings, reactor, *, fallback: str, restored: str,
                 threads: int = THREADS, backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX)) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.address = where(own)
        self.reactor = reactor
        self.timeout = own.timeout
        self.fallback, self.restored = fallback, restored
        options = dict(db=own.db, password=own.password or None, socket_timeout=own.timeout,
                       socket_connect_timeout=own.timeout, retry=Retry(NoBackoff(), 0), max_connections=threads)
        if own.sentinels:
            from redis.sentinel import Sentinel
            sentinel = Sentinel(list(own.sentinels), sentinel_kwargs={"socket_timeout": own.timeout,
                                                                      "socket_connect_timeout": own.timeout})
            self.client = sentinel.master_for(own.master_name, **options)
        else:
            host, port = own.servers[0]
            self.client = redis.Redis(host=host, port=port, **options)
        self.pool = WorkerPool(reactor, threads, name="redis")
        self.pending: list[tuple[tuple, defer.Deferred, float]] = []    # (command, its Deferred, deadline)
        self.sending = 0                          # batches in the threads
        self.first_backoff, self.max_backoff = backoff
        self.backoff = self.first_backoff
        self.down_since: float | None = None     # reactor time the outage began; None: up
        self.retry_at = 0.0
        self.probing = False                      # the one command of an outage in flight
        self.closed = False

    @property
    def up(self) -> bool:
        return self.down_since is None

    def command(self, *args: Any) -> defer.Deferred | None:
        """Send the Redis command `args` ("GET", key): a Deferred of its reply, which fails
        with the error or when there is no reply within the timeout.  None, at once, while
        the server is down and no retry is due, or once the link is closed: the caller
        does without Redis."""
        if self.closed:
            return None
        probe = False
        if self.down_since is not None:
            if self.probing or self.reactor.seconds() < self.retry_at:
                return None
            self.probing = probe = True
        d = defer.Deferred()
        self.pending.append((args, d, time.monotonic() + self.timeout))
        self._send()
        d.addTimeout(self.timeout, self.reactor)
        return d.addCallbacks(self._answered, self._failed, callbackArgs=(probe,), errbackArgs=(probe,))

    def _send(self) -> None:
        """Hand the pending commands to a free thread, if there is one."""
        if not self.pending or self.sending >= self.pool.max:
            return
        if not self.pool.started:
            self.pool.start()
        batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
        self.sending += 1
        self.pool.run(self._pipeline, [(args, deadline) for args, _, deadline in batch]).addBoth(
            self._replied, [d for _, d, _ in batch])

    def _pipeline(self, batch: list[tuple[tuple, float]]) -> list:
        """In a pool thread: the commands still within their deadline, in one pipeline;
        each one's reply or error (raises when the server cannot be reached)."""
        now = time.monotonic()
        live = [args for args, deadline in batch if now <= deadline]
        if not live:
            return [_Expired()] * len(batch)
        pipe = self.client.pipeline(transaction=False)
        for args in live:
            pipe.execute_command(*args)
        replies = iter(pipe.execute(raise_on_error=False))
        return [next(replies) if now <= deadline else _Expired() for _, deadline in batch]

    def _replied(self, replies, waiting: list[defer.Deferred]) -> None:
        self.sending -= 1
        for i, d in enumerate(waiting):
            if d.called:                          # timed out already
                continue
            reply = replies if isinstance(replies, Failure) else replies[i]
            if isinstance(reply, (Exception, Failure)):
                d.errback(reply)
            else:
                d.callback(reply)
        self._send()

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
        """Stop sending; the commands not yet sent fail (their callers do without).  The
        connections are closed in a pool thread, after the batches already handed over;
        the threads end without being waited for."""
        self.closed = True
        pending, self.pending = self.pending, []
        for _, d, _ in pending:
            if not d.called:
                d.errback(_Expired())
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
    if not configured(own):
        return None
    links = ctx.kept(f"redis.{use}", SharedLinks)
    link = links.acquire(own, ctx.reactor, **texts)
    ctx.on_retire(lambda: links.release(link))
    return link
