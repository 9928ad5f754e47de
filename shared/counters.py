"""Counters in fixed windows, for the checks that limit how often something happens.

A count is named by its use and a key (``add("connection_rate", "192.0.2.1",
60)``) and runs for a window of ``unit`` seconds that starts with its first
count, as Postfix's anvil counts per time unit: ``add`` answers how many
counts the window holds, this one included, and the next count after the
window has passed starts a new one at 1.  A client can burst up to twice a
limit across a window boundary, never more.

Two stores, one interface (:class:`Counters`):

- :class:`LocalCounters`: in this process; ``add`` answers at once, an int (no
  Deferred: a check that counts runs for every connection, MAIL and RCPT).
- :class:`RedisCounters`: in Redis, shared by every node that uses the same
  server, prefix and names; ``add`` answers a Deferred of the shared count.
  The key of a count is ``redis.key_prefix + name + ":" + key``; one Lua script
  per count (EVAL: Redis keeps it compiled) increments it and, at its first
  count, sets it to expire with the window, atomically, so the window ends
  the same for every node (no clocks compared); the link pipelines the counts
  of many sessions into one round trip when they come together.  The node
  counts in its local store as well (a dictionary update), and answers from
  it when Redis cannot: from the first failure or timeout until Redis answers
  again (:mod:`shared.redisconn`: one log line each way), each node holds its
  clients to the limits by itself, from its own share of the window.  Never
  no limit, and never a refusal because Redis is down.  Counts made locally
  during an outage are not copied to Redis afterwards.

``first_refusal(name, key)`` says whether a refusal is the first of its
window on this node, so the refusal is logged once per client and window;
it is answered locally with either store (each node logs its own refusals).

:func:`counters` gives a check the store of its configuration: the local
store lives as long as the process (``BuildContext.kept``: a reload forgets
no count), and the Redis link is closed when the last configuration using it
is retired.
"""
from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from shared.redisconn import describe as describe_redis
from shared.redisconn import configured, shared_link

# KEYS[1]: the count; ARGV[1]: the window, ms.  A key found without an expiry (written by
# something else) gets one, so that no count can outlive its window.
_INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""


class Counters(Protocol):
    def add(self, name: str, key: str, unit: float) -> int | Deferred:
        """Count one for (`name`, `key`) in a window of `unit` seconds: the window's count,
        this one included (an int, or a Deferred of one that never fails)."""

    def get(self, name: str, key: str) -> int | Deferred:
        """The window's count for (`name`, `key`) without adding one (0 once it has passed)."""

    def first_refusal(self, name: str, key: str) -> bool:
        """True the first time in the window of (`name`, `key`) it is asked, on this node."""


class LocalCounters:
    """The counts of this process.  Windows that have passed are forgotten as the clock
    passes them (one sweep per ``unit`` at most, each count with its own window end), so
    memory follows the keys counted in the last window, not all the keys ever counted."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.counts: dict[tuple[str, str], tuple[float, int]] = {}    # (name, key) -> (window end, count)
        self.logged: set[tuple[str, str]] = set()      # whose refusal this window was logged
        self.swept = 0.0

    def add(self, name: str, key: str, unit: float) -> int:
        now = self.clock.seconds()
        if now - self.swept >= unit:
            self._sweep(now)
        counted = (name, key)
        end, n = self.counts.get(counted, (now, 0))
        if now >= end:
            end, n = now + unit, 0
            self.logged.discard(counted)
        n += 1
        self.counts[counted] = (end, n)
        return n

    def get(self, name: str, key: str) -> int:
        end, n = self.counts.get((name, key), (0.0, 0))
        return n if self.clock.seconds() < end else 0

    def first_refusal(self, name: str, key: str) -> bool:
        counted = (name, key)
        if counted in self.logged:
            return False
        self.logged.add(counted)
        return True

    def _sweep(self, now: float) -> None:
        self.swept = now
        for counted in [c for c, (end, _) in self.counts.items() if now >= end]:
            del self.counts[counted]
            self.logged.discard(counted)


class RedisCounters:
    """The counts in Redis, shared by the nodes using it; the local store counts too and
    answers while Redis does not (see the module docstring)."""

    def __init__(self, local: LocalCounters, link, key_prefix: str) -> None:
        self.local = local
        self.link = link                         # shared.redisconn.RedisLink
        self.key_prefix = key_prefix

    def add(self, name: str, key: str, unit: float) -> int | Deferred:
        n = self.local.add(name, key, unit)
        d = self.link.command("EVAL", _INCR, 1, self._key(name, key), max(1, round(unit * 1000)))
        if d is None:
            return n
        return d.addCallback(int).addErrback(lambda _: n)

    def get(self, name: str, key: str) -> int | Deferred:
        n = self.local.get(name, key)
        d = self.link.command("GET", self._key(name, key))
        if d is None:
            return n
        return d.addCallback(lambda v: int(v or 0)).addErrback(lambda _: n)

    def first_refusal(self, name: str, key: str) -> bool:
        return self.local.first_refusal(name, key)

    def _key(self, name: str, key: str) -> str:
        return f"{self.key_prefix}{name}:{key}"


def counters(ctx) -> LocalCounters | RedisCounters:
    """The store of a configuration (``ctx``: a :class:`shared.checks.registry.BuildContext`):
    in Redis when ``[redis]`` names a server, else local.  Every check that counts uses it,
    each under its own names."""
    local = ctx.kept("counters", lambda: LocalCounters(ctx.reactor))
    link = shared_link(ctx, "counters", fallback="counting locally", restored="counting in redis")
    return local if link is None else RedisCounters(local, link, ctx.settings.redis.key_prefix)


def describe(settings) -> str:
    """Where the counters of `settings` are, for check-config."""
    if settings.has("redis") and configured(settings.redis):
        return (f"counters: in redis at {describe_redis(settings.redis)}, shared by every node using it; "
                f"in this process while it does not answer")
    return "counters: in this process (no redis.servers): each node counts by itself"
