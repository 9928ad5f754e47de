"""DNS lists through the three tiers: the filter looks up the original client (passed by the edge
with XCLIENT) at MAIL and the domains of the message's URLs at end of data, in a real DNS server
with the tests' zones and list zones; the hits and their scores reach the mailbox in X-Spam-Status."""
from __future__ import annotations

import pytest

from tests.dnsserver import start_dns_server
from tests.filter.mailauth import message, signed, zones
from tests.integration.helpers import DOMAIN, parse_mail, transaction


@pytest.fixture
def lists_dns(tmp_path):
    server = start_dns_server(tmp_path / "dns", {
        **zones(),
        "zen.example": [("1.0.0.127", "A", "127.0.0.2")],            # the pipeline's client, 127.0.0.1
        "uribl.example": [("spam.test", "A", "127.0.0.2")]})
    yield server
    server.stop()


def test_a_listed_client_and_a_listed_url_are_scored_in_the_delivered_message(make_pipeline, lists_dns):
    p = make_pipeline(filter={"dns": {"nameservers": [f"127.0.0.1:{lists_dns.port}"]},
                              "dnslists": {"zones": ["zen.example=127.0.0.[2..3]*5.5 RBL_ZEN_SBL"]},
                              "urilists": {"zones": ["uribl.example*3 URIBL_TEST"]}})
    msg = signed(message(to=f"bob@{DOMAIN}", subject="offer",
                         body="Hello Bob,\r\n\r\nsee https://www.spam.test/offer?id=1 today.\r\n"))
    replies = transaction(p.edge.port, "alice@sender.test", [f"bob@{DOMAIN}"], msg, helo="mx.sender.test")
    assert replies[-1].code == 250, replies
    mail = parse_mail(p.wait_messages(f"bob@{DOMAIN}", 1)[-1])
    status = mail["X-Spam-Status"]
    # 5.5 + 3, and SPF_PASS -0.2, DKIM_VALID -0.5, DMARC_PASS -0.5: over add_header (6)
    assert status.startswith("Yes, score=7.30"), status
    assert "RBL_ZEN_SBL(5.5)" in status and "URIBL_TEST(3)" in status
    assert mail["X-Spam-Flag"] == "YES"
    assert p.filter.wait_log(r"dnslists=RBL_ZEN_SBL, .*urilists=URIBL_TEST.*score=7\.30")


def test_an_override_in_actions_scores_can_make_a_listing_refuse_the_client(make_pipeline, lists_dns):
    p = make_pipeline(filter={"dns": {"nameservers": [f"127.0.0.1:{lists_dns.port}"]},
                              "dnslists": {"zones": ["zen.example*2 RBL_ZEN"]},
                              "actions": {"scores": {"RBL_ZEN": 20}}})
    msg = signed(message(to=f"bob@{DOMAIN}", subject="refused"))
    final = transaction(p.edge.port, "alice@sender.test", [f"bob@{DOMAIN}"], msg, helo="mx.sender.test")[-1]
    assert (final.code, final.enhanced) == (550, "5.7.1"), final
    assert p.filter.wait_log(r"reject: END-OF-MESSAGE: 550 5\.7\.1.*dnslists=RBL_ZEN")
