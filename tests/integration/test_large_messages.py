"""Large messages back to back on one session: back-pressure must never leave a session stuck."""
from __future__ import annotations

import smtplib

import pytest

from tests.integration.helpers import DOMAIN, message

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


def test_one_megabyte_messages_back_to_back(shared_pipeline):
    p = shared_pipeline
    before = len(p.messages(ALICE))
    body = ("y" * 76 + "\r\n") * 13_000                       # ~1 MB
    with smtplib.SMTP("127.0.0.1", p.edge.port, timeout=15) as s:   # a stuck session fails in 15 s
        for i in range(6):
            s.sendmail("big@example.net", [ALICE], message(f"big {i}", body=body))
    files = p.wait_messages(ALICE, before + 6)
    sizes = sorted(f.stat().st_size for f in files[before:])
    assert sizes[0] > len(body)
