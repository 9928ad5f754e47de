"""The counters of shared/counters.py: local in fixed windows (with a Clock)."""
from __future__ import annotations

from twisted.internet.task import Clock

from shared.counters import LocalCounters

# -- local --------------------------------------------------------------------------------

def test_local_counts_run_for_a_window_from_their_first_count():
    clock = Clock()
    c = LocalCounters(clock)
    assert [c.add("connection_rate", "192.0.2.1", 60) for _ in range(3)] == [1, 2, 3]
    assert c.add("connection_rate", "192.0.2.2", 60) == 1          # another key
    assert c.add("message_rate", "192.0.2.1", 60) == 1             # another name
    assert c.get("connection_rate", "192.0.2.1") == 3 and c.get("connection_rate", "nobody") == 0
    clock.advance(59.9)
    assert c.add("connection_rate", "192.0.2.1", 60) == 4
    clock.advance(0.1)                                               # the window began at 0
    assert c.get("connection_rate", "192.0.2.1") == 0
    assert c.add("connection_rate", "192.0.2.1", 60) == 1


def test_a_refusal_is_first_once_per_window():
    clock = Clock()
    c = LocalCounters(clock)
    c.add("message_rate", "a", 60)
    assert c.first_refusal("message_rate", "a") and not c.first_refusal("message_rate", "a")
    assert c.first_refusal("message_rate", "b")
    clock.advance(60)
    c.add("message_rate", "a", 60)                                   # a new window
    assert c.first_refusal("message_rate", "a")


def test_a_sweep_forgets_only_the_windows_that_have_passed():
    clock = Clock()
    c = LocalCounters(clock)
    assert c.add("user_message_rate", "alice", 3600) == 1
    clock.advance(61)
    c.add("connection_rate", "192.0.2.1", 60)                        # sweeps: a minute has passed
    c.add("connection_rate", "192.0.2.1", 60)
    clock.advance(61)
    c.add("connection_rate", "192.0.2.9", 60)                        # sweeps again
    assert c.add("user_message_rate", "alice", 3600) == 2           # the hour is not over
    assert ("connection_rate", "192.0.2.1") not in c.counts         # its minute is
