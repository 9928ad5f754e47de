"""Counters in fixed windows, for the checks that limit how often something happens.

A count is named by its use and a key (``add("connection_rate", "192.0.2.1",
60)``) and runs for a window of ``unit`` seconds that starts with its first
count, as Postfix's anvil counts per time unit: ``add`` answers how many
counts the window holds, this one included, and the next count after the
window has passed starts a new one at 1.  A client can burst up to twice a
limit across a window boundary, never more.

:class:`LocalCounters` counts in this process; ``add`` answers at once, an
int (no Deferred: a check that counts runs for every connection, MAIL and
RCPT).  The interface (:class:`Counters`) lets a store answer a Deferred, for
a store shared by several nodes.

``first_refusal(name, key)`` says whether a refusal is the first of its
window on this node, so the refusal is logged once per client and window;
each node logs its own refusals.

:func:`counters` gives a check the store of its configuration; it lives as
long as the process (``BuildContext.kept``: a reload forgets no count).
"""
from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred


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


def counters(ctx) -> LocalCounters:
    """The store of a configuration (``ctx``: a :class:`shared.checks.registry.BuildContext`).
    Every check that counts uses it, each under its own names."""
    return ctx.kept("counters", lambda: LocalCounters(ctx.reactor))
