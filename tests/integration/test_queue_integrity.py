"""A queue file whose message bytes were damaged on disk is never delivered.

The filter queues a message while the domain tier is down, so that it waits
in deferred/; then one bit of its message is flipped in the file.  The message
checksum in the file's trailer finds it: at the filter's start (recovery moves
it to corrupt/ and logs it), or, while the filter runs, when it is read for
delivery (the domain tier never gets the end of the message).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.helpers import (
    DOMAIN, QID, message, parse_mail, queued_id, transaction, wait_until,
)

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
TEXT = b"the original text of the message"


def _queue_deferred(p, subject: str) -> Path:
    """Send a message through the edge; the path of its filter queue file once in deferred/."""
    replies = transaction(p.edge.port, "sender@example.net", [ALICE],
                          message(subject, body=TEXT.decode() + "\r\n"))
    edge_qid = queued_id(replies[-1])
    qid = p.filter.wait_log(rf"({QID}): from=<sender@example.net>[^\n]*queued as \1 "
                            rf"upstream={edge_qid}").group(1)
    path = Path(p.filter.sections["queue"]["directory"]) / "deferred" / qid
    wait_until(path.exists, 10, f"{qid} to be deferred")
    return path


def _flip_a_message_bit(path: Path) -> None:
    """Flip one bit of the message text in place, as a disk error would."""
    with open(path, "r+b") as f:
        offset = f.read().index(TEXT) + 4
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x20]))


def _subjects(p) -> list[str]:
    return [parse_mail(m)["Subject"] for m in p.messages(ALICE)]


def test_damaged_message_found_by_recovery_goes_to_corrupt(make_pipeline):
    p = make_pipeline(filter={"verify": {"recipients": False}}, start=("filter", "edge"))
    damaged = _queue_deferred(p, "damaged on disk")
    intact = _queue_deferred(p, "intact")
    p.filter.stop()
    _flip_a_message_bit(damaged)
    p.filter.start()

    spool = damaged.parent.parent
    assert (spool / "corrupt" / damaged.name).exists() and not damaged.exists()
    assert intact.exists()
    assert (f"deferred/{damaged.name}: corrupt queue file (message checksum mismatch); "
            "moved to corrupt/") in p.filter.log_text(since_start=True)
    # The domain tier comes back: the intact message is delivered, the damaged one never.
    p.domain.start()
    p.filter.queue("flush")
    p.wait_messages(ALICE, 1)
    p.filter.wait_log(rf"{intact.name}: removed")
    assert _subjects(p) == ["intact"]


def test_damaged_message_found_at_delivery_is_not_delivered(make_pipeline):
    p = make_pipeline(filter={"verify": {"recipients": False}}, start=("filter", "edge"))
    damaged = _queue_deferred(p, "damaged on disk")
    _flip_a_message_bit(damaged)
    p.domain.start()
    mark = p.filter.log_size()
    p.filter.queue("flush")
    p.filter.wait_log(rf"{damaged.name}: [^\n]*message checksum mismatch", since=mark)
    spool = damaged.parent.parent
    wait_until(lambda: (spool / "corrupt" / damaged.name).exists(), 10, "the damaged message in corrupt/")
    p.filter.wait_log(rf"{damaged.name}: corrupt queue file \(message checksum mismatch\); "
                      rf"moved to corrupt/, not delivered", since=mark)
    # The next message takes the same path to the mailbox, alone.
    transaction(p.edge.port, "sender@example.net", [ALICE], message("after the damaged one"))
    p.wait_messages(ALICE, 1)
    assert _subjects(p) == ["after the damaged one"]
    assert not re.search(rf"{damaged.name}: to=<[^\n]*status=sent", p.filter.log_text())
