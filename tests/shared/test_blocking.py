"""The worker pool with a real reactor: results, errors, order, the bound, stopping."""
from __future__ import annotations

import threading
import time

import pytest
from twisted.internet.defer import gatherResults
from twisted.internet.selectreactor import SelectReactor

from shared.blocking import WorkerPool


def run_reactor(reactor, go, timeout=20):
    out: list = []
    reactor.callWhenRunning(lambda: go().addBoth(out.append).addBoth(lambda _: reactor.stop()))
    reactor.callLater(timeout, reactor.stop)
    reactor.run(installSignalHandlers=False)
    assert out, "did not finish"
    return out[0]


def test_results_errors_and_the_bound():
    reactor = SelectReactor()
    pool = WorkerPool(reactor, 3, name="t")
    pool.start()
    active, peak, lock = [0], [0], threading.Lock()
    main = threading.get_ident()

    def job(n):
        assert threading.get_ident() != main
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        if n == 5:
            raise ValueError("five")
        return n * n

    fired_on: list = []

    def go():
        ds = []
        for n in range(12):
            d = pool.run(job, n)
            d.addBoth(lambda r: (fired_on.append(threading.get_ident()), r)[1])
            ds.append(d.addErrback(lambda f: f.trap(ValueError) and "failed"))
        return gatherResults(ds)
    try:
        result = run_reactor(reactor, go)
    finally:
        pool.stop()
    assert result == [n * n if n != 5 else "failed" for n in range(12)]
    assert peak[0] == 3                          # never more than the pool's size at once
    assert set(fired_on) == {main}               # callbacks run on the reactor's thread
    assert pool._threads == [] and not pool.started


def test_stop_finishes_queued_jobs_and_run_after_stop_fails():
    reactor = SelectReactor()
    pool = WorkerPool(reactor, 1)
    pool.start()
    done: list = []
    for n in range(5):
        pool.run(lambda n=n: (time.sleep(0.005), done.append(n)))
    pool.stop()                                   # waits for the five
    assert done == [0, 1, 2, 3, 4]
    failures: list = []
    pool.run(lambda: None).addErrback(failures.append)
    assert failures and "not running" in str(failures[0].value)
    with pytest.raises(ValueError):
        WorkerPool(reactor, 0)


def test_stop_without_waiting_leaves_a_slow_job_to_finish_in_its_thread():
    reactor = SelectReactor()
    pool = WorkerPool(reactor, 2)
    pool.start()
    threads = list(pool._threads)
    release = threading.Event()
    pool.run(release.wait, 10)
    started = time.monotonic()
    pool.stop(wait=False)
    assert time.monotonic() - started < 0.5 and not pool.started
    assert any(t.is_alive() for t in threads)        # still in its job
    release.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)    # then each took its stop
