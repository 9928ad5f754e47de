"""Group commit of directory fsyncs among the threads of a pool.

A new directory entry (a link, a rename) is durable once the directory is
fsynced.  Threads that need the same directory synced at the same time share
one fsync: a caller returns after an fsync of that directory that *started*
after it asked, so what it linked before asking is covered.  While one fsync
runs, the callers that arrive wait for the next round, which one of them runs
for all.  A failed fsync satisfies nobody: its runner gets the error and the
waiters run the next round themselves (each then fails or succeeds on its own).
"""
from __future__ import annotations

import os
import threading
from typing import Callable


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Shared fsyncs of one directory (call :meth:`sync` from pool threads)."""

    def __init__(self, path: str, fsync: Callable[[str], None] = fsync_dir) -> None:
        self.path = path
        self.fsync = fsync
        self._cond = threading.Condition()
        self._started = 0          # rounds started
        self._done = 0             # last round finished with success
        self._running = False
        self.rounds = 0            # fsyncs done (instrumentation)

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1          # the next round to start covers us
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                mine = self._started
                self._cond.release()
                ok = False
                try:
                    self.fsync(self.path)
                    ok = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    self.rounds += 1
                    if ok:
                        self._done = mine
                    self._cond.notify_all()


class DirSyncs:
    """One :class:`DirSync` per directory path, made on first use."""

    def __init__(self, fsync: Callable[[str], None] = fsync_dir) -> None:
        self.fsync = fsync
        self._lock = threading.Lock()
        self._by_path: dict[str, DirSync] = {}

    def sync(self, path: str) -> None:
        ds = self._by_path.get(path)
        if ds is None:
            with self._lock:
                ds = self._by_path.setdefault(path, DirSync(path, self.fsync))
        ds.sync()
