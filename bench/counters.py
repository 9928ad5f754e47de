"""What one count of shared/counters.py costs: local, and in Redis through the link's threads.

    python -m bench.counters [--seconds 2] [--concurrency 1,16,64] [--threads 2] [--redis HOST:PORT]

Prints calls/s, the latency of one count (median and 99th percentile) and the
process's CPU time per count (all its threads) for:

- ``local``: LocalCounters.add, a plain call (what every connection, MAIL and
  RCPT costs without Redis);
- ``redis-py direct``: the counting script sent by redis-py on this thread,
  one after the other (a round trip each, no reactor, no thread hop);
- ``redis cN``: RedisCounters.add on an epoll reactor with N counts in flight,
  sent through the link's pool (``--threads``, the link's default otherwise),
  pipelined when they come together, and answered with ``callFromThread``:
  what a check waits for.

Without ``--redis`` it starts its own redis-server on a free 127.0.0.1 port
(tests/redisserver.py: needs the test extras) and stops it at the end.  Each
measurement runs ``--seconds``; the whole run takes a few times that.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor

from shared.config.schema import hostport
from shared.counters import _INCR as INCR
from shared.counters import LocalCounters, RedisCounters
from shared.redisconn import THREADS, RedisLink, RedisSettings


def summary(name: str, calls: int, seconds: float, latencies: list[float], cpu: float) -> str:
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1e6
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
    return (f"{name:18} {calls / seconds:>10,.0f} calls/s   p50 {p50:8.1f} µs   p99 {p99:8.1f} µs   "
            f"CPU {cpu / calls * 1e6:6.1f} µs/call")


class WallClock:
    seconds = staticmethod(time.monotonic)


def local(seconds: float) -> str:
    c = LocalCounters(WallClock())
    keys = [f"192.0.2.{i}" for i in range(256)]
    calls, latencies, cpu = 0, [], time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for key in keys:
            t = time.perf_counter()
            c.add("connection_rate", key, 60)
            latencies.append(time.perf_counter() - t)
        calls += len(keys)
    return summary("local", calls, seconds, latencies, time.process_time() - cpu)


def direct(own: RedisSettings, seconds: float) -> str:
    link = RedisLink(own, None, fallback="", restored="")
    calls, latencies, cpu = 0, [], time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        link.client.execute_command("EVAL", INCR, 1, f"{own.key_prefix}bench:{calls % 256}", 60_000)
        latencies.append(time.perf_counter() - t)
        calls += 1
    cpu = time.process_time() - cpu
    link.client.close()
    return summary("redis-py direct", calls, seconds, latencies, cpu)


def through_reactor(own: RedisSettings, seconds: float, concurrency: int, threads: int) -> str:
    reactor = EPollReactor()
    link = RedisLink(own, reactor, fallback="counting locally", restored="counting in redis", threads=threads)
    store = RedisCounters(LocalCounters(reactor), link, own.key_prefix)
    latencies: list[float] = []
    counted = [0]

    async def worker(n: int, end: float) -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            result = store.add("bench", f"{n}.{counted[0] % 64}", 60)
            if isinstance(result, defer.Deferred):
                await result
            latencies.append(time.perf_counter() - t)
            counted[0] += 1

    cpu = [0.0]

    async def run() -> None:
        end = time.perf_counter() + seconds
        cpu[0] = time.process_time()
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker(n, end)) for n in range(concurrency)])
        cpu[0] = time.process_time() - cpu[0]
        await link.close()

    def go():
        defer.Deferred.fromCoroutine(run()).addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    if not link.up:
        return f"redis c{concurrency:<15} redis did not answer in time: counted locally"
    return summary(f"redis c{concurrency}", counted[0], seconds, latencies, cpu[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.counters", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--concurrency", default="1,16,64", help="counts in flight, comma-separated")
    p.add_argument("--threads", type=int, default=THREADS, help=f"the link's threads (default {THREADS})")
    p.add_argument("--redis", metavar="HOST:PORT", help="a running server (default: start one)")
    args = p.parse_args(argv)
    server = None
    if args.redis:
        address = hostport(args.redis)
    else:
        from tests.redisserver import start_redis_server
        server = start_redis_server(tempfile.mkdtemp(prefix="bench-counters-"))
        address = (server.host, server.port)
    own = RedisSettings(servers=(address,), key_prefix="smarthost-bench:", timeout=0.5)
    try:
        print(local(args.seconds))
        print(direct(own, args.seconds))
        for c in (int(x) for x in args.concurrency.split(",")):
            print(through_reactor(own, args.seconds, c, args.threads))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
