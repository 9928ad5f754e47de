"""Files created ahead of need, so that no transaction creates one on the reactor.

Creating a file is a journaled metadata operation: on a file system busy with
the fsyncs of concurrent transactions it can wait for the journal for a
millisecond or more, and on the reactor thread that wait stalls every session.
A :class:`FileReserve` keeps a few empty files open in a directory, created in
the bounded thread pool; a transaction takes one instantly and gives it its
final name later by rename or link.  When the reserve runs dry (a burst larger
than the reserve), ``take`` creates the file in place, as before.
"""
from __future__ import annotations

import itertools
import os

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FileReserve:
    def __init__(self, directory: str, run, *, size: int = 16, prefix: str = "r") -> None:
        self.directory = str(directory)
        self.run = run                   # runs a blocking call off the reactor; returns a Deferred
        self.size = size
        self.prefix = f"{prefix}{os.getpid()}-"
        self.ready: list[tuple[int, str]] = []
        self.filling = False
        self.closed = False
        self._names = itertools.count(1)

    def names(self) -> set[str]:
        """The file names the reserve holds now (so that a spool clean-up spares them)."""
        return {os.path.basename(path) for _, path in self.ready}

    def _new_path(self) -> str:
        return os.path.join(self.directory, f"{self.prefix}{next(self._names)}")

    def _create(self, path: str) -> tuple[int, str]:
        return os.open(path, _FLAGS, 0o600), path

    def take(self) -> tuple[int, str]:
        """An open, empty file (fd, path), from the reserve or made now."""
        if not self.closed and len(self.ready) <= self.size // 2:
            self.fill()
        if self.ready:
            return self.ready.pop()
        return self._create(self._new_path())

    def fill(self) -> None:
        if self.filling or self.closed:
            return
        self.filling = True
        paths = [self._new_path() for _ in range(self.size - len(self.ready))]

        def create_all():
            made = []
            for path in paths:
                try:
                    made.append(self._create(path))
                except OSError:
                    break                   # disk trouble: take() will say so in place
            return made

        def done(made):
            self.filling = False
            if self.closed:
                self._discard(made)
            else:
                self.ready.extend(made)
        self.run(create_all).addCallbacks(done, lambda f: setattr(self, "filling", False))

    @staticmethod
    def _discard(files) -> None:
        for fd, path in files:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Delete the unused files (at shutdown)."""
        self.closed = True
        files, self.ready = self.ready, []
        self._discard(files)
