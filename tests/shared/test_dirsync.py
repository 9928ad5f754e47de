"""Shared directory fsyncs among threads: nobody returns before an fsync that started after it asked."""
from __future__ import annotations

import threading

import pytest

from shared.dirsync import DirSync, DirSyncs


class GatedFsync:
    """An fsync that blocks until the test lets it finish; records when each started."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.calls = 0
        self.fail_next = False

    def __call__(self, path: str) -> None:
        self.calls += 1
        self.started.release()
        self.release.acquire()
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")


def start(target) -> tuple[threading.Thread, list]:
    out: list = []

    def run():
        try:
            target()
            out.append("ok")
        except OSError as e:
            out.append(e.errno)
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_callers_during_a_round_share_the_next_one():
    fs = GatedFsync()
    ds = DirSync("/x", fs)
    first, r1 = start(ds.sync)
    assert fs.started.acquire(timeout=5)          # round 1 runs for the first caller
    others = [start(ds.sync) for _ in range(5)]   # they asked after round 1 started
    fs.release.release()                          # round 1 ends: only the first is served
    first.join(5)
    assert r1 == ["ok"]
    assert fs.started.acquire(timeout=5)          # round 2, for all five
    assert all(out == [] for _, out in others)
    fs.release.release()
    for t, out in others:
        t.join(5)
        assert out == ["ok"]
    assert fs.calls == 2 and ds.rounds == 2


def test_a_failed_round_satisfies_nobody():
    fs = GatedFsync()
    ds = DirSync("/x", fs)
    first, r1 = start(ds.sync)
    assert fs.started.acquire(timeout=5)
    second, r2 = start(ds.sync)                   # waits for round 2
    fs.release.release()
    first.join(5)
    assert fs.started.acquire(timeout=5)          # round 2 (second's) fails...
    fs.fail_next = True
    fs.release.release()
    second.join(5)
    assert r1 == ["ok"] and r2 == [5]
    third, r3 = start(ds.sync)                    # ...and the next caller gets a fresh round
    assert fs.started.acquire(timeout=5)
    fs.release.release()
    third.join(5)
    assert r3 == ["ok"] and fs.calls == 3


def test_waiter_of_a_failed_round_runs_its_own():
    fs = GatedFsync()
    ds = DirSync("/x", fs)
    a, ra = start(ds.sync)
    assert fs.started.acquire(timeout=5)          # round 1 for a
    fs.fail_next = True
    b, rb = start(ds.sync)                        # b needs round 2
    fs.release.release()                          # round 1 fails: a gets the error
    a.join(5)
    assert ra == [5]
    assert fs.started.acquire(timeout=5)          # b runs round 2 and succeeds
    fs.release.release()
    b.join(5)
    assert rb == ["ok"]


def test_one_syncer_per_directory(tmp_path):
    syncs = DirSyncs()
    syncs.sync(str(tmp_path))                     # a real directory fsync
    syncs.sync(str(tmp_path))
    assert len(syncs._by_path) == 1 and syncs._by_path[str(tmp_path)].rounds == 2
    with pytest.raises(FileNotFoundError):
        syncs.sync(str(tmp_path / "missing"))
