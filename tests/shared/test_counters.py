"""The counters of shared/counters.py: local in fixed windows (with a Clock), and in a real
redis-server: counts shared by two nodes, windows that end with the key's TTL, an outage
(the server killed, then stopped answering) counted locally with one log line, the
recovery with another, a reactor never held; the link shared across reloads and closed
with the last configuration."""
from __future__ import annotations

import os
import signal
import time

import pytest
from twisted.internet import defer, task
from twisted.internet.task import Clock

from shared.blocking import InlinePool
from shared.checks.registry import BuildContext
from shared.config import parse
from shared.counters import LocalCounters, RedisCounters, counters
from shared.daemon import close_all
from shared.redisconn import RedisLink, RedisSettings
from tests.redisserver import redis_server  # noqa: F401  (the fixture)
from tests.support import logged, on_real_reactor

EDGE = {"server": {"hostname": "mx.example.org"}, "next_hop": {"hosts": ["127.0.0.1:10025"]}}


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


# -- redis: helpers --------------------------------------------------------------------

async def counted(value):
    """An answer of add/get, an int or a Deferred of one."""
    return await value if isinstance(value, defer.Deferred) else value


def sleep(reactor, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def node(reactor, server, *, timeout: float = 0.5, backoff=(0.3, 0.6), password: str = "") -> RedisCounters:
    """One edge node's store on `server`: its own local counters and link."""
    own = RedisSettings(servers=((server.host, server.port),), timeout=timeout, password=password)
    link = RedisLink(own, reactor, fallback="counting locally", restored="counting in redis", backoff=backoff)
    return RedisCounters(LocalCounters(reactor), link, own.key_prefix)


@pytest.fixture
def redis_log():
    """The text of every smarthost.redis log event while the test runs."""
    with logged("smarthost.redis") as seen:
        yield seen


# -- redis --------------------------------------------------------------------------------

def test_two_nodes_share_counts_and_a_window_ends_with_its_key(redis_server):
    server = redis_server()

    async def scenario(reactor):
        a, b = node(reactor, server), node(reactor, server)
        try:
            got = [await counted(a.add("connection_rate", "192.0.2.1", 0.5)) for _ in range(3)]
            got += [await counted(b.add("connection_rate", "192.0.2.1", 0.5)) for _ in range(2)]
            other = await counted(b.add("connection_rate", "192.0.2.2", 0.5))
            shared = await counted(a.get("connection_rate", "192.0.2.1"))
            ttl = server.client().pttl("smarthost:connection_rate:192.0.2.1")
            local = b.local.get("connection_rate", "192.0.2.1")
            await sleep(reactor, 0.6)
            gone = server.client().exists("smarthost:connection_rate:192.0.2.1")
            again = await counted(b.add("connection_rate", "192.0.2.1", 0.5))
            return got, other, shared, ttl, local, gone, again
        finally:
            await a.link.close()
            await b.link.close()
    got, other, shared, ttl, local, gone, again = on_real_reactor(scenario)
    assert got == [1, 2, 3, 4, 5] and other == 1 and shared == 5
    assert 0 < ttl <= 500                  # set at the window's first count, in ms
    assert local == 2                      # each node also keeps its own share
    assert gone == 0 and again == 1        # Redis expired the window; the next count opens one


def test_counts_asked_together_are_pipelined_each_with_its_own_reply(redis_server):
    server = redis_server()

    async def scenario(reactor):
        a = node(reactor, server)
        try:
            asked = [a.add("rcpt", "x" if i % 3 else "y", 60) for i in range(300)]     # none awaited yet
            peeked = a.get("rcpt", "x")
            return [await counted(d) for d in asked], await counted(peeked), a.link.sending
        finally:
            await a.link.close()
    replies, peeked, sending = on_real_reactor(scenario)
    xs = [n for i, n in enumerate(replies) if i % 3]
    ys = [n for i, n in enumerate(replies) if not i % 3]
    assert sorted(xs) == list(range(1, 201)) and sorted(ys) == list(range(1, 101))
    assert 0 < peeked <= 200 and sending == 0


def test_a_key_left_without_expiry_gets_the_window_as_ttl(redis_server):
    server = redis_server()
    server.client().set("smarthost:connection_rate:192.0.2.1", 7)

    async def scenario(reactor):
        a = node(reactor, server)
        try:
            return await counted(a.add("connection_rate", "192.0.2.1", 60))
        finally:
            await a.link.close()
    assert on_real_reactor(scenario) == 8
    assert 0 < server.client().pttl("smarthost:connection_rate:192.0.2.1") <= 60_000


def test_an_outage_is_counted_locally_with_one_line_and_redis_is_used_again_when_back(redis_server, redis_log):
    server = redis_server()

    async def scenario(reactor):
        a, b = node(reactor, server), node(reactor, server)
        try:
            for _ in range(3):
                await counted(b.add("message_rate", "c", 60))
            before = [await counted(a.add("message_rate", "c", 60)) for _ in range(2)]    # 4, 5: shared
            server.kill()
            during = [await counted(a.add("message_rate", "c", 60)) for _ in range(3)]    # a's own: 3, 4, 5
            answered_at_once = not isinstance(a.add("message_rate", "c", 60), defer.Deferred)
            lines_down = list(redis_log)
            server.start()                         # the same port, empty
            await sleep(reactor, 0.35)             # past the first back-off
            back = await counted(a.add("message_rate", "c", 60))
            after = await counted(a.add("message_rate", "c", 60))
            return before, during, answered_at_once, lines_down, back, after
        finally:
            await a.link.close()
            await b.link.close()
    before, during, answered_at_once, lines_down, back, after = on_real_reactor(scenario)
    assert before == [4, 5]
    assert during == [3, 4, 5] and answered_at_once
    assert len(lines_down) == 1, lines_down
    assert lines_down[0].startswith(f"redis unavailable at {server.address} (ConnectionError: ")
    assert lines_down[0].endswith("): counting locally")
    assert (back, after) == (1, 2)             # in Redis again (the restarted server was empty)
    assert len(redis_log) == 2 and redis_log[1].startswith(f"redis at {server.address} answers again after ")
    assert redis_log[1].endswith("s: counting in redis")


def test_a_server_that_stops_answering_costs_one_timeout_and_never_holds_the_reactor(redis_server, redis_log):
    server = redis_server()

    async def scenario(reactor):
        a = node(reactor, server, timeout=0.2, backoff=(0.5, 1.0))
        gaps, last = [], [time.monotonic()]

        def tick():
            now = time.monotonic()
            gaps.append(now - last[0])
            last[0] = now
        ticker = task.LoopingCall(tick)
        ticker.clock = reactor
        ticker.start(0.01)
        try:
            assert await counted(a.add("recipient_rate", "c", 60)) == 1
            os.kill(server.pid, signal.SIGSTOP)    # accepts nothing, answers nothing
            started = time.monotonic()
            waited = await counted(a.add("recipient_rate", "c", 60))
            took = time.monotonic() - started
            queued = [a.add("recipient_rate", "c", 60) for _ in range(20)]    # down: answered at once
            await sleep(reactor, 0.6)              # the probe is due: it times out too, silently
            probe = await counted(a.add("recipient_rate", "c", 60))
            os.kill(server.pid, signal.SIGCONT)
            await sleep(reactor, 1.1)              # the back-off doubled
            back = await counted(a.add("recipient_rate", "c", 60))
            return waited, took, queued, probe, back, max(gaps)
        finally:
            ticker.stop()
            os.kill(server.pid, signal.SIGCONT)
            await a.link.close()
    waited, took, queued, probe, back, gap = on_real_reactor(scenario)
    assert waited == 2 and 0.15 < took < 0.6           # the local count, after the timeout
    assert queued == list(range(3, 23))
    assert probe == 23
    # Redis's count again, not the local 24: 1 before, this one, and the call that timed out
    # (run when the server woke, unless it saw the connection closed first)
    assert back in (3, 4)
    assert gap < 0.15, f"the reactor was held for {gap:.3f}s"
    assert redis_log[0] == f"redis unavailable at {server.address} (no answer within 0.2s): counting locally"
    assert len(redis_log) == 2 and "answers again" in redis_log[1]


def test_a_password_is_sent_and_a_wrong_one_is_an_outage(redis_server, redis_log):
    server = redis_server(password="s3cret")

    async def scenario(reactor):
        good, bad = node(reactor, server, password="s3cret"), node(reactor, server, password="wrong")
        try:
            return (await counted(good.add("connection_rate", "c", 60)),
                    await counted(good.add("connection_rate", "c", 60)),
                    await counted(bad.add("connection_rate", "c", 60)))
        finally:
            await good.link.close()
            await bad.link.close()
    assert on_real_reactor(scenario) == (1, 2, 1)
    assert len(redis_log) == 1 and redis_log[0].startswith(f"redis unavailable at {server.address} (")
    assert "counting locally" in redis_log[0]


# -- one store per configuration ------------------------------------------------------------

def test_a_reload_keeps_the_counts_and_the_link_which_the_last_configuration_closes(redis_server):
    server = redis_server()

    async def scenario(reactor):
        store: dict = {}
        with_redis = parse("edge", {**EDGE, "redis": {"servers": [server.address]}})
        first = BuildContext(with_redis, reactor, InlinePool(), store=store)
        c1 = counters(first)
        assert await counted(c1.add("connection_rate", "c", 60)) == 1
        second = BuildContext(with_redis, reactor, InlinePool(), store=store)       # a reload
        c2 = counters(second)
        same_link = c2.link is c1.link and c2.local is c1.local
        await close_all(first.closers)             # the old configuration retired
        still_open = not c2.link.closed
        n = await counted(c2.add("connection_rate", "c", 60))
        without = BuildContext(parse("edge", EDGE), reactor, InlinePool(), store=store)   # [redis] removed
        c3 = counters(without)
        await close_all(second.closers)
        return same_link, still_open, n, c2.link.closed, c3 is c2.local, c3.add("connection_rate", "c", 60)
    same_link, still_open, n, closed, local_kept, local_n = on_real_reactor(scenario)
    assert same_link and still_open and n == 2
    assert closed                                   # closed with the last configuration that used it
    assert local_kept and local_n == 3              # the node's own share carries on locally
