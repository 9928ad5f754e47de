"""Limits the pipeline controls: what the edge accepts, the tiers behind it accept too.

Each tier adds its Received header on the way in; a message the edge took with a 250
must never be refused further in (and bounced) for the size those additions make, nor
for a line the pipeline wrote itself.
"""
from __future__ import annotations

import pytest

from tests.integration.helpers import DOMAIN, message, transaction

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
LIMIT = 300_000
SIZES = {"server": {"max_message_size": LIMIT}}


def sized(n: int, subject: str) -> bytes:
    """A message of exactly n octets: CRLF line ends, lines of 78 octets and one filler line."""
    head = message(subject, body="")
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(n - len(head), len(line))
    if rest < 2:                                 # the filler line needs room for its CRLF
        lines, rest = lines - 1, rest + len(line)
    data = head + line * lines + b"y" * (rest - 2) + b"\r\n"
    assert len(data) == n
    return data


@pytest.fixture(scope="module")
def limited(tmp_path_factory, edge_tls):
    from tests.integration.conftest import PipelineFactory
    factory = PipelineFactory(tmp_path_factory.mktemp("limits"), edge_tls)
    yield factory(edge=SIZES, filter=SIZES, domain=SIZES)
    factory.close()


@pytest.mark.parametrize("size", [LIMIT, LIMIT - 1, LIMIT - 150, LIMIT - 400])
def test_a_message_the_edge_accepts_reaches_the_mailbox_up_to_exactly_the_advertised_size(limited, size):
    p = limited
    before = len(p.messages(ALICE))
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], sized(size, f"size {size}"))
    assert replies[-1].code == 250, replies
    path = p.wait_messages(ALICE, before + 1)[-1]
    assert f"Subject: size {size}".encode() in path.read_bytes()
    assert not p.filter.log_lines("sender non-delivery notification")
    assert "552 5.3.4" not in p.domain.log_text() and "552 5.3.4" not in p.filter.log_text()


def test_one_octet_over_the_advertised_size_is_refused_at_the_edge(limited):
    replies = transaction(limited.edge.port, "sender@example.net", [ALICE], sized(LIMIT + 1, "too big"))
    assert (replies[-1].code, replies[-1].enhanced) == (552, "5.3.4"), replies


def test_a_helo_as_long_as_a_command_line_allows_is_delivered_not_bounced(limited):
    """The Received headers quote the HELO: a long one must not make a line that the
    next tier refuses (1000 octets) after the edge has said 250."""
    p = limited
    before = len(p.messages(ALICE))
    helo = "h" * (2048 - len("EHLO .example\r\n")) + ".example"       # the longest command line
    replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("long helo"), helo=helo)
    assert replies[-1].code == 250, replies
    path = p.wait_messages(ALICE, before + 1)[-1]
    data = path.read_bytes()
    assert b"Subject: long helo" in data
    assert max(len(line) for line in data.split(b"\r\n")) < 1000
    assert not p.filter.log_lines("sender non-delivery notification")


def test_the_default_limit_exactly_and_the_window_the_adversarial_test_found(make_pipeline):
    """10,240,000 octets is the default SIZE; 10,239,650-10,239,800 used to get 250 at the
    edge and 552 at the domain tier (the pipeline's Received headers counted against it)."""
    p = make_pipeline()
    for n, size in enumerate((10_240_000, 10_239_700), 1):
        replies = transaction(p.edge.port, "sender@example.net", [ALICE], sized(size, f"default {size}"))
        assert replies[-1].code == 250, (size, replies)
        path = p.wait_messages(ALICE, n, timeout=30)[-1]
        assert f"Subject: default {size}".encode() in path.read_bytes()
    assert not p.filter.log_lines("sender non-delivery notification")


def test_a_client_that_only_sends_noop_is_closed_at_the_edge(limited):
    """A session that moves no mail is not kept open for ever: past server.max_junk_commands
    (100) each NOOP is an error, and the error limit (20) closes it."""
    from tests.integration.helpers import Client
    with Client(limited.edge.port) as c:
        c.ehlo()
        replies = [c.cmd("NOOP") for _ in range(120)]
        assert all(r.code == 250 for r in replies), replies[-3:]
        last = c.reply()                          # the 20th error: the session ends
        assert (last.code, last.enhanced) == (421, "4.7.0"), last
        assert c.closed_by_server()
