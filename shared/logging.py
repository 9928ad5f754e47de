"""Log lines the way mail administrators read them: one line per event.

``2026-11-23T14:05:13.123Z edge[4242]: 01HF...: from=<a@b>, size=123, nrcpt=1: 250 ...``
Each line names the tier and process, then the queue id the event belongs to.
"""
from __future__ import annotations

import sys
import time

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, globalLogBeginner)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


class LineObserver:
    def __init__(self, stream, tier: str, pid: int) -> None:
        self.stream = stream
        self.prefix = f"{tier}[{pid}]"

    def __call__(self, event: dict) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        t = event.get("log_time", time.time())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        level = event.get("log_level")
        tag = "" if level in (LogLevel.info, None) else f" {level.name}:"
        self.stream.write(f"{stamp} {self.prefix}:{tag} {text}\n")
        self.stream.flush()


def start_logging(tier: str, level: str = "info", file: str = "-", pid: int = 0):
    stream = sys.stderr if file == "-" else open(file, "a", buffering=1, encoding="utf-8")
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    observer = FilteringLogObserver(LineObserver(stream, tier, pid), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return predicate


def set_level(predicate, level: str) -> None:
    predicate.setLogLevelForNamespace(None, _LEVELS[level])
