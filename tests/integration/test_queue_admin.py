"""`smarthost queue` against a running filter: list, show, hold, release, flush, delete."""
from __future__ import annotations

import json
import re

import pytest

from tests.integration.helpers import DOMAIN, QID, message, queued_id, transaction, wait_until

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


def _state_of(tier, qid: str) -> str | None:
    out = tier.queue("list")
    assert out.returncode == 0, out.stderr
    m = re.search(rf"^{qid}\s+(\w+)", out.stdout, re.M)
    return m.group(1) if m else None


def _wait_state(tier, qid: str, state: str | None, timeout: float = 10) -> None:
    wait_until(lambda: _state_of(tier, qid) == state, timeout, f"{qid} to be {state or 'gone'}")


def _deferred_through_the_edge(p, subject: str) -> tuple[str, str]:
    """Send one message through the edge while the domain tier is down; (edge id, filter id)
    once it sits in the filter's deferred/."""
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message(subject))
    edge_qid = queued_id(replies[-1])
    m = p.filter.wait_log(rf"({QID}): from=<sender@example.net>[^\n]*queued as \1 upstream={edge_qid}")
    _wait_state(p.filter, m.group(1), "deferred")
    return edge_qid, m.group(1)


def test_hold_release_delete_a_deferred_message_while_running(make_pipeline):
    p = make_pipeline(filter={"verify": {"recipients": False}}, start=("filter", "edge"))
    edge_qid, qid = _deferred_through_the_edge(p, "admin me")

    listing = p.filter.queue("list").stdout
    assert f"<{ALICE}>" in listing and "1 attempt(s) so far" in listing, listing
    assert "4.4.1" in listing, "the last reply (next hop down) is listed"

    shown = p.filter.queue("show", qid)
    assert shown.returncode == 0, shown.stderr
    for line in (f"queue id: {qid}", "state: deferred", "sender: <sender@example.net>",
                 f"recipient: <{ALICE}>", f"upstream_id: {edge_qid}", "Subject: admin me"):
        assert line in shown.stdout, shown.stdout
    assert p.filter.queue("show", "NOSUCHQUEUEID00000000").returncode != 0

    out = p.filter.queue("hold", qid)
    assert out.returncode == 0 and f"{qid}: held" in out.stdout, out
    assert _state_of(p.filter, qid) == "hold"
    assert "state: hold" in p.filter.queue("show", qid).stdout
    # A flush does not touch held mail.
    mark = p.filter.log_size()           # before the request: the poll may answer at once
    p.filter.queue("flush")
    p.filter.wait_log("flush requested", since=mark, timeout=5)
    assert _state_of(p.filter, qid) == "hold"

    mark = p.filter.log_size()
    out = p.filter.queue("release", qid)
    assert out.returncode == 0 and f"{qid}: released" in out.stdout, out
    # Released: tried again at once (the domain tier is still down), deferred again.
    p.filter.wait_log(rf"{qid}: to=<{re.escape(ALICE)}>[^\n]*status=deferred", since=mark)
    _wait_state(p.filter, qid, "deferred")
    assert "2 attempt(s) so far" in p.filter.queue("list").stdout

    out = p.filter.queue("delete", qid)
    assert out.returncode == 0 and f"{qid}: deleted" in out.stdout, out
    assert "Queue is empty" in p.filter.queue("list").stdout
    assert p.filter.queue("show", qid).returncode != 0
    # Nothing is delivered when the domain tier comes back, and no bounce is made.
    p.domain.start()
    mark = p.filter.log_size()
    p.filter.queue("flush")
    p.filter.wait_log("flush requested", since=mark, timeout=5)
    assert p.messages(ALICE) == []
    assert "non-delivery notification" not in p.filter.log_text()


def test_the_edge_queue_id_json_and_the_log_lines(make_pipeline):
    """The id the client was told finds the message; every change is in the filter's log."""
    p = make_pipeline(filter={"verify": {"recipients": False}}, start=("filter", "edge"))
    edge_qid, qid = _deferred_through_the_edge(p, "by edge id")

    shown = p.filter.queue("show", edge_qid.lower())
    assert shown.returncode == 0 and f"queue id: {qid}" in shown.stdout, shown
    out = p.filter.queue("list", "--json")
    assert out.returncode == 0, out.stderr
    [entry] = [json.loads(line) for line in out.stdout.splitlines()]
    assert (entry["queue_id"], entry["queue_name"], entry["upstream_id"]) == (qid, "deferred", edge_qid)
    [rcpt] = entry["recipients"]
    assert rcpt["address"] == ALICE and "4.4.1" in rcpt["delay_reason"], entry
    out = p.filter.queue("show", edge_qid, "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["queue_id"] == qid and shown["envelope"]["upstream_id"] == edge_qid
    assert shown["status"]["attempts"] == 1 and "Subject: by edge id" in shown["header"]

    for action, result, logged in (("hold", "held", "put on hold by admin command"),
                                   ("release", "released", "released from hold by admin command"),
                                   ("flush", "made due now", "flush requested"),
                                   ("delete", "deleted", "removed by admin command")):
        mark = p.filter.log_size()
        out = p.filter.queue(action, edge_qid)
        assert out.returncode == 0, out
        assert f"{qid}: {result} (upstream id {edge_qid})" in out.stdout, out.stdout
        p.filter.wait_log(rf"{qid}: {logged}", since=mark, timeout=5)
        if action in ("release", "flush"):       # tried at once: the domain tier is down
            p.filter.wait_log(rf"{qid}: to=<{re.escape(ALICE)}>[^\n]*status=deferred", since=mark)
            _wait_state(p.filter, qid, "deferred")
    assert "Queue is empty" in p.filter.queue("list").stdout


def test_queue_on_the_edge_says_it_keeps_none(make_pipeline):
    p = make_pipeline(start=())
    out = p.edge.queue("list")
    assert out.returncode == 0
    assert "keeps no queue" in out.stderr + out.stdout
    assert str(p.edge.config_path) in out.stderr + out.stdout
    out = p.edge.queue("flush")
    assert out.returncode != 0 and "keeps no queue" in out.stderr


def test_queue_rejects_malformed_ids(make_pipeline):
    p = make_pipeline(start=("filter",))
    for bad in ("../../etc/passwd", "x/y"):
        out = p.filter.queue("hold", bad)
        assert out.returncode != 0
        assert "invalid queue id" in out.stdout + out.stderr
        out = p.filter.queue("show", bad)
        assert out.returncode != 0
    out = p.filter.queue("hold", "ALL", "--json")
    assert out.returncode == 2 and "--json is for list and show" in out.stderr
