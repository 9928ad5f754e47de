"""Greylisting met by a real retrying MTA: a Postfix instance (Debian's postfix, run as its own
instance in a temporary directory) relays to the edge.  Its first attempt gets 451 4.7.1 from the
filter through the edge, Postfix defers the message and retries on its own schedule, the retry
after the delay is delivered, and once the network passed auto_allow_count triplets a new
sender's mail goes through at the first attempt."""
from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

import pytest

from bench.postfix import POSTFIX, PostfixSingleHop
from tests.integration.helpers import DOMAIN, free_port, message, wait_until

BOB = f"bob@{DOMAIN}"
DELAY = 3


@pytest.fixture
def postfix_root():
    # Postfix's daemons (user postfix) must reach it: not under pytest's 0700 directories
    root = Path(tempfile.mkdtemp(prefix="smarthost-postfix-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_retrying_postfix_is_greylisted_then_delivered_then_auto_allowed(make_pipeline, postfix_root):
    assert POSTFIX.exists(), "tests/run installs postfix"
    p = make_pipeline(filter={"greylist": {"enabled": True, "delay": DELAY, "auto_allow_count": 2}})
    # Postfix's retry schedule shortened (its defaults are 300 s and more): the point is that
    # Postfix, not the test, comes back
    sender_mta = PostfixSingleHop(postfix_root, free_port(), p.edge.port, domain=DOMAIN, settings=[
        ("queue_run_delay", "1s", "scan the deferred queue every second"),
        ("minimal_backoff_time", "1s", "retry a deferred message after a second"),
        ("maximal_backoff_time", "2s", "and never wait longer than two")])
    with sender_mta:
        port = sender_mta.ports["edge"]
        log = sender_mta.log_path("edge")

        def submit(sender: str, tag: str) -> str:
            data = message(tag, sender=sender, to=BOB)
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.sendmail(sender, [BOB], data)
            return re.search(rb"^Message-ID: (<[^>]+>)", data, re.M).group(1).decode()

        def delivered(mid: str):
            return any(mid.encode() in f.read_bytes() for f in p.messages(BOB))

        started = time.monotonic()
        first = submit("news@example.net", "greylisted first")
        wait_until(lambda: delivered(first), 30, "the retried message in the mailbox")
        took = time.monotonic() - started
        text = log.read_text()
        assert re.search(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.7\.1 Greylisted: "
                         r"please try again in \d+ seconds?", text), text
        assert took >= DELAY, took
        p.filter.wait_log(r"reject: RCPT to=<bob@example\.test>: 451 4\.7\.1 Greylisted: please try again in 3 s")
        p.filter.wait_log(r"greylist=passed \(after \d+s\)")

        second = submit("alerts@example.net", "greylisted second")          # a new triplet: greylisted
        wait_until(lambda: delivered(second), 30, "the second retried message")
        deferrals = len(re.findall(r"status=deferred", log.read_text()))
        third = submit("billing@example.net", "auto-allowed")               # the network passed twice
        wait_until(lambda: delivered(third), 15, "the auto-allowed message")
        p.filter.wait_log(r"greylist=allowed \(127\.0\.0\.0/24: 2 passed\)")
        time.sleep(0.5)
        assert len(re.findall(r"status=deferred", log.read_text())) == deferrals, "the third was deferred"
        assert len([f for f in p.messages(BOB)]) == 3
