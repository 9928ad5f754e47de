"""The log lines an administrator reads, on real processes: every delivery line says to
whom and with what status, the Message-ID once per message and tier, no Python reprs and
no Twisted chatter at info level."""
from __future__ import annotations

import re

import pytest

from tests.integration.helpers import DOMAIN, QID, message, queued_id, transaction, wait_until

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


def test_log_lines_of_two_messages_through_the_pipeline(make_pipeline):
    p = make_pipeline()
    ids = []
    for n in (1, 2):                          # the second rides the edge's kept filter connection
        data = message(f"log {n}", extra_headers=[f"Message-ID: <log-{n}@example.net>"])
        replies = transaction(p.edge.port, "sender@example.net", [ALICE], data, helo=f"client-{n}.example")
        assert replies[-1].code == 250, replies
        ids.append(queued_id(replies[-1]))
    p.wait_messages(ALICE, 2)
    wait_until(lambda: p.domain.log_text().count("to=<alice@example.test>, relay=maildir, status=sent") == 2,
               10, "two delivery lines")
    edge, filt, dom = p.edge.log_text(), p.filter.log_text(), p.domain.log_text()
    for n, eqid in enumerate(ids, 1):
        assert re.search(rf"{eqid}: to=<alice@example\.test>, relay=\S+, status=sent \(250 ", edge), edge
        for text in (edge, filt, dom):        # once per message and tier, on its from= line
            assert text.count(f"message-id=<log-{n}@example.net>") == 1, text
    for text in (edge, filt, dom):
        assert "[('" not in text and "None" not in text, text
        assert "starting on" not in text and "Port" not in text and "Main loop" not in text, text
    # after the edge's connection was handed to the second client, the filter's xclient line
    # carries no id of the first message
    xclient = [ln for ln in filt.splitlines() if "xclient from" in ln]
    assert xclient and not any(f"upstream={ids[0]}" in ln for ln in xclient if "client-2" in ln), xclient
    assert re.search(rf"({QID}): from=<sender@example\.net>, size=\d+, nrcpt=1, message-id=<log-2@", filt)
