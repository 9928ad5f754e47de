"""Log lines the way mail administrators read them: one line per event.

``2026-11-23T14:05:13.123Z edge[4242]: 01HF...: from=<a@b>, size=123, nrcpt=1: 250 ...``
Each line names the tier and process, then the queue id the event belongs to.

The observer is on the hot path (several lines per message per tier), so it
filters by level itself and keeps each format string parsed: a line costs a
few dictionary look-ups and one write, not a pass through string.Formatter.

The log file can be rotated without copytruncate: after logrotate renames the
file away, :meth:`LineObserver.reopen` (the daemon calls it on SIGHUP) starts a
new file at the same path.
"""
from __future__ import annotations

import os
import re
import string
import sys
import time

from twisted.logger import LogLevel, formatEvent, globalLogBeginner

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
_ORDER = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
_SIMPLE = frozenset(string.ascii_letters + string.digits + "_")
_MAX_FORMATS = 1000
_threshold = {"level": 0}        # the running daemon's level; debug until one is set


def debug_enabled() -> bool:
    """Whether debug lines are written: lets a hot path skip building one nobody reads."""
    return _threshold["level"] == 0


def _compile(fmt: str):
    """[(literal, field-or-None)], or None when the format needs the full formatter."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(fmt):
        if field is not None and (spec or conversion or not field or not _SIMPLE.issuperset(field)):
            return None
        parts.append((literal, field))
    return parts



_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _safe(value: str) -> str:
    """A field value on one line: control characters (a user name from a client, say) as \\xNN,
    so no value can start a forged log line (fail2ban reads these lines)."""
    if _CONTROL.search(value) is None:
        return value
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)

class LineObserver:
    def __init__(self, stream, tier: str, pid: int, level: str = "info", *, is_global: bool = False,
                 path: str | None = None) -> None:
        self.stream = stream
        self.path = path                 # the file `stream` appends to, for reopen(); None: not a file of ours
        self.is_global = is_global       # the daemon's observer: its level is debug_enabled()'s
        self.prefix = f"{tier}[{pid}]"
        self.set_level(level)
        self._compiled: dict[str, list | None] = {}
        self._second = -1
        self._stamp = ""

    def set_level(self, level: str) -> None:
        self.min_level = _ORDER[_LEVELS[level]]
        if self.is_global:
            _threshold["level"] = self.min_level

    def reopen(self) -> str | None:
        """Write to whatever file is at :attr:`path` now (a new one when logrotate renamed
        the old away); None, or what went wrong, naming the file: then the lines go on
        to the file written so far, and the daemon logs the text there.

        The new file's descriptor takes the place of the stream's own (``dup2``): the
        stream object, and so the hot path, stay as they are, and a line written by
        another thread meanwhile reaches one file or the other, never a closed stream.  The daemon
        runs as ``server.user`` by then: it must be allowed to create the file in its
        directory, or to append to the file logrotate made (``create 0640 USER adm``).
        A stream that is not a file of ours (stderr) is left alone.
        """
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            return f"{self.path}: cannot reopen the log file: {e.strerror}; still writing to the file opened before"
        try:
            self.stream.flush()
            os.dup2(fd, self.stream.fileno(), inheritable=False)
        finally:
            os.close(fd)
        return None

    def _text(self, event: dict) -> str:
        fmt = event.get("log_format")
        if fmt is None:
            return formatEvent(event)
        parts = self._compiled.get(fmt, False)
        if parts is False:
            if len(self._compiled) >= _MAX_FORMATS:     # formats built at run time: stay bounded
                self._compiled.clear()
            parts = self._compiled[fmt] = _compile(fmt)
        if parts is None:
            return formatEvent(event)
        try:
            return "".join(lit + (_safe(str(event[field])) if field is not None else "") for lit, field in parts)
        except KeyError:
            return formatEvent(event)

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        order = _ORDER.get(level, 1)
        if order == 1 and not event.get("log_namespace", "").startswith("smarthost"):
            order = 0        # Twisted's own news ("... starting on 25", "(TCP Port 25 Closed)"): debug
        if level is not None and order < self.min_level:
            return
        text = self._text(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        t = event.get("log_time") or time.time()
        sec = int(t)
        if sec != self._second:
            self._second, self._stamp = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        tag = "" if level in (LogLevel.info, None) else f" {level.name}:"
        self.stream.write(f"{self._stamp}.{int(t % 1 * 1000):03d}Z {self.prefix}:{tag} {text}\n")
        self.stream.flush()


def start_logging(tier: str, level: str = "info", file: str = "-", pid: int = 0) -> LineObserver:
    """Log to stderr (`file` ``"-"``) or append to `file`, from now on; the observer.

    The daemon opens its log file as whoever starts it, before it binds its ports
    and drops privileges (:meth:`shared.daemon.Daemon.start`), as twistd does: a
    failure to bind is logged, and the file may live where only root may write
    (``/var/log``).  The file keeps its owner, and one made here is the starting
    user's: a tier running as ``server.user`` writes it through the descriptor
    opened before the drop.  :func:`shared.config.check_host` judges ``log.file``
    for the starting user accordingly.
    """
    stream = sys.stderr if file == "-" else open(file, "a", buffering=1, encoding="utf-8")
    observer = LineObserver(stream, tier, pid, level, is_global=True, path=None if file == "-" else file)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer
