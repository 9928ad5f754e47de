import io

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from shared.logging import LineObserver


def lines(level="info", emit=None):
    out = io.StringIO()
    obs = LineObserver(out, "filter", 42, level)
    log = Logger(namespace="smarthost.test", observer=obs)
    emit(log)
    return out.getvalue().splitlines()


def test_fast_and_full_formats_agree_and_levels_filter():
    got = lines(emit=lambda log: (
        log.info("{qid}: to=<{rcpt}>, status={status}", qid="Q1", rcpt="a@b", status="sent"),
        log.info("{qid}: delay={delay:.2f} {x!r}", qid="Q2", delay=0.123456, x="s"),
        log.info("{missing} stays readable", other=1),
        log.debug("not shown"),
        log.warn("careful {what}", what="now")))
    assert [ln.split(" ", 1)[1] for ln in got] == [
        "filter[42]: Q1: to=<a@b>, status=sent",
        "filter[42]: Q2: delay=0.12 's'",
        got[2].split(" ", 1)[1],
        "filter[42]: warn: careful now"]
    assert "Unable to format event" in got[2] or "missing" in got[2]
    assert got[0][:4].isdigit() and got[0][10] == "T" and got[0].split(" ")[0].endswith("Z")


def test_level_changes_and_failures():
    out = io.StringIO()
    obs = LineObserver(out, "edge", 1, "error")
    log = Logger(namespace="smarthost.test", observer=obs)
    log.info("hidden")
    obs.set_level("debug")
    log.debug("shown {n}", n=1)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("boom {n}", Failure(), n=2, log_level=LogLevel.error)
    text = out.getvalue()
    assert "hidden" not in text and "shown 1" in text and "boom 2" in text and "ZeroDivisionError" in text


def test_debug_enabled_follows_the_daemons_observer_only():
    from shared import logging as shlog
    saved = dict(shlog._threshold)
    try:
        LineObserver(io.StringIO(), "edge", 1, "error")          # a stray observer changes nothing
        assert shlog.debug_enabled()
        daemon = LineObserver(io.StringIO(), "edge", 1, "info", is_global=True)
        assert not shlog.debug_enabled()
        daemon.set_level("debug")                               # a reload
        assert shlog.debug_enabled()
    finally:
        shlog._threshold.update(saved)


def test_parsed_formats_stay_bounded():
    from shared import logging as shlog
    obs = LineObserver(io.StringIO(), "edge", 1)
    log = Logger(namespace="smarthost.test", observer=obs)
    for n in range(shlog._MAX_FORMATS + 50):
        log.info(f"built at run time {n}")               # a careless caller: a new format each time
    assert len(obs._compiled) <= shlog._MAX_FORMATS
    assert obs.stream.getvalue().splitlines()[-1].endswith(f"built at run time {shlog._MAX_FORMATS + 49}")


def test_twisteds_own_news_is_debug_its_warnings_are_not():
    out = io.StringIO()
    obs = LineObserver(out, "edge", 1, "info")
    twisted_log = Logger(namespace="twisted.internet.tcp.Port", observer=obs)
    twisted_log.info("SMTPServerFactory starting on 25")
    twisted_log.warn("something wrong in {what}", what="the reactor")
    Logger(namespace="smarthost.daemon", observer=obs).info("listening on 127.0.0.1:25")
    text = out.getvalue()
    assert "starting on" not in text
    assert "warn: something wrong in the reactor" in text and "listening on 127.0.0.1:25" in text
    obs.set_level("debug")
    twisted_log.info("(TCP Port 25 Closed)")
    assert "(TCP Port 25 Closed)" in out.getvalue()


class _Beginner:
    """Stands in for Twisted's global log beginner: the test process keeps its own logging."""

    def beginLoggingTo(self, observers, redirectStandardIO=True):
        self.observers = observers


def test_reopen_after_logrotate_renamed_the_file_writes_a_new_one(tmp_path, monkeypatch):
    from shared import logging as shlog
    monkeypatch.setattr(shlog, "globalLogBeginner", _Beginner())
    monkeypatch.setattr(shlog, "_threshold", dict(shlog._threshold))
    path = tmp_path / "edge.log"
    obs = shlog.start_logging("edge", "info", str(path), 7)
    log = Logger(namespace="smarthost.test", observer=obs)
    log.info("before rotation")
    path.rename(tmp_path / "edge.log.1")                  # logrotate, without copytruncate
    log.info("after the rename, before reopen")
    assert obs.reopen() is None
    log.info("after reopen")
    assert [ln.split(": ", 1)[1] for ln in (tmp_path / "edge.log.1").read_text().splitlines()] == [
        "before rotation", "after the rename, before reopen"]
    assert [ln.split(": ", 1)[1] for ln in path.read_text().splitlines()] == ["after reopen"]
    assert obs.reopen() is None                            # nothing rotated: the same file goes on
    log.info("again")
    assert path.read_text().splitlines()[-1].endswith("edge[7]: again")
    obs.stream.close()


def test_reopen_failure_keeps_the_old_file_and_says_why(tmp_path):
    path = tmp_path / "edge.log"
    stream = open(path, "a", buffering=1, encoding="utf-8")
    obs = LineObserver(stream, "edge", 1, path=str(path))
    log = Logger(namespace="smarthost.test", observer=obs)
    path.rename(tmp_path / "edge.log.1")
    path.mkdir()                                          # nothing can open it for writing, root included
    assert obs.reopen() == (f"{path}: cannot reopen the log file: Is a directory; "
                            "still writing to the file opened before")
    log.info("still logged")
    assert (tmp_path / "edge.log.1").read_text().endswith("edge[1]: still logged\n")
    stream.close()


def test_reopen_leaves_stderr_alone(monkeypatch):
    from shared import logging as shlog
    monkeypatch.setattr(shlog, "globalLogBeginner", _Beginner())
    monkeypatch.setattr(shlog, "_threshold", dict(shlog._threshold))
    obs = shlog.start_logging("edge", "info", "-", 1)
    assert obs.path is None and obs.reopen() is None


def test_a_field_cannot_forge_a_line():
    """A value from a client (an AUTH user name through Dovecot, say) with a line break
    stays on its line: fail2ban must not read a second, forged "auth failed" line."""
    forged = "x\n2026-01-01T00:00:00.000Z edge[1]: Q: auth failed: client=unknown[192.0.2.99]"
    got = lines(emit=lambda log: log.info("{qid}: auth failed: user=<{user}>", qid="Q", user=forged))
    assert len(got) == 1
    assert got[0].endswith(r"user=<x\x0a2026-01-01T00:00:00.000Z edge[1]: Q: auth failed: "
                           r"client=unknown[192.0.2.99]>")
