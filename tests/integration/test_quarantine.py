"""`smarthost quarantine` against a running filter tier, delivering to a running domain tier.

No registered check quarantines yet, and a tier process runs only registered checks: the
quarantined mail is made by a real session in this process (a test-only end_of_data check
answering ``Verdict(CONTINUE, quarantine=...)``, the filter's queue sink, a spool fsynced
as the tier's) into the filter tier's spool directory before the tier starts.  From there
everything is the tiers' own: recovery at start-up keeps it, the commands list, show,
release and delete it, the filter logs each action and delivers what was released, with
the check's header edits, to the domain tier.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from twisted.internet.task import Clock

from shared.engine.queued import QueueSink
from shared.queue.store import Spool
from tests.integration.helpers import DOMAIN, smarthost
from tests.shared.engine.test_quarantine_flow import connect, quarantining, send
from tests.shared.queue.helpers import sync_runner

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


class NoManager:
    def notify(self, *args, **kwargs):
        raise AssertionError("a quarantined message must not be scheduled")


def quarantine_into(directory: str, subjects: list[str]) -> list[str]:
    """Receive one message per subject through a real session whose end_of_data check
    quarantines it; their queue ids."""
    clock = Clock()
    clock.advance(time.time())                    # arrival times as the tier's own
    spool = Spool(directory, reactor=clock, fsync=True, runner=sync_runner)
    proto, t = connect(QueueSink(spool, NoManager()), [quarantining([])], clock, domains=(DOMAIN,))
    qids = []
    for subject in subjects:
        body = (f"Subject: {subject}\r\nX-Spam-Flag: YES\r\n\r\nthe body of {subject}\r\n").encode()
        reply = send(proto, t, body, rcpt=ALICE)
        m = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", reply)
        assert m, reply
        qids.append(m.group(1))
    assert sorted(spool.list("quarantine")) == sorted(qids)
    return qids


def quarantine(p, *args: str):
    return smarthost("quarantine", *args, "--config", str(p.filter.config_path))


def test_quarantine_list_show_release_delete_against_running_tiers(make_pipeline):
    p = make_pipeline(start=())
    kept, dropped = quarantine_into(p.filter.sections["queue"]["directory"], ["kept back", "bad one"])
    p.start(("domain", "filter"))
    assert "corrupt" not in p.filter.log_text()

    out = quarantine(p, "list")
    assert out.returncode == 0, out.stderr
    for qid in (kept, dropped):
        assert re.search(rf"^{qid}\s+quarantine\s+\d+\s", out.stdout, re.M), out.stdout
    assert out.stdout.count("quarantined: test: subject hello") == 2
    assert f"<{ALICE}>" in out.stdout and out.stdout.endswith("-- 2 quarantine\n")
    listed = [json.loads(line) for line in quarantine(p, "list", "--json").stdout.splitlines()]
    assert {e["queue_id"]: e["quarantine_reason"] for e in listed} == {
        kept: "test: subject hello", dropped: "test: subject hello"}
    queue_list = p.filter.queue("list").stdout
    assert re.search(rf"^{kept}\s+quarantine\s", queue_list, re.M), queue_list

    shown = quarantine(p, "show", kept.lower())
    assert shown.returncode == 0, shown.stderr
    for line in (f"queue id: {kept}", "state: quarantine", "quarantine reason: test: subject hello",
                 f"recipient: <{ALICE}>", "header edits: add X-Quarantined; remove x-spam-flag",
                 "Subject: kept back", "the body of kept back"):
        assert line in shown.stdout.splitlines(), shown.stdout

    # The queue's own release is not the quarantine's: nothing moves.
    out = p.filter.queue("release", kept)
    assert out.returncode == 1 and f"{kept}: quarantined (see smarthost quarantine)" in out.stdout, out
    assert quarantine(p, "release").returncode == 2              # a queue id, or ALL

    mark = p.filter.log_size()
    out = quarantine(p, "release", kept)
    assert out.returncode == 0 and out.stdout == f"{kept}: released\n", out
    p.filter.wait_log(rf"{kept}: released from quarantine by admin command", since=mark, timeout=5)
    p.filter.wait_log(rf"{kept}: to=<{re.escape(ALICE)}>[^\n]*status=sent", since=mark)
    [delivered] = p.wait_messages(ALICE, 1)
    head, _, body = delivered.read_bytes().partition(b"\r\n\r\n")
    assert b"\r\nX-Quarantined: test\r\n" in head and b"X-Spam-Flag" not in head    # the check's edits
    assert b"Subject: kept back" in head and body == b"the body of kept back\r\n"

    mark = p.filter.log_size()
    out = quarantine(p, "delete", dropped)
    assert out.returncode == 0 and out.stdout == f"{dropped}: deleted\n", out
    p.filter.wait_log(rf"{dropped}: removed from quarantine by admin command", since=mark, timeout=5)
    assert quarantine(p, "list").stdout == "Quarantine is empty\n"
    assert "Queue is empty" in p.filter.queue("list").stdout
    assert len(p.messages(ALICE)) == 1


def test_quarantine_on_the_domain_tier_says_it_keeps_none(make_pipeline):
    p = make_pipeline(start=())
    out = smarthost("quarantine", "list", "--config", str(p.domain.config_path))
    assert out.returncode == 0 and "keeps no queue" in out.stderr, out
    out = smarthost("quarantine", "release", "ALL", "--config", str(p.domain.config_path))
    assert out.returncode == 1 and "keeps no queue" in out.stderr, out
