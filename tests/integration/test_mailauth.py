"""The filter's sender-authentication checks through the three tiers, against the tests'
DNS server: what the original client is told, and what reaches the mailbox."""
from __future__ import annotations

import time

from tests.filter.mailauth import message, signed
from tests.integration.helpers import DOMAIN, parse_mail, transaction


def test_signed_mail_is_delivered_with_one_authentication_results_field(shared_pipeline):
    p = shared_pipeline
    forged = "Authentication-Results: filter.example.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"
    kept = "Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=x@elsewhere.test\r\n"
    before = len(p.messages(f"bob@{DOMAIN}"))
    msg = signed(message(to=f"bob@{DOMAIN}", extra=forged + kept, subject="signed"))
    replies = transaction(p.edge.port, "alice@sender.test", [f"bob@{DOMAIN}"], msg, helo="mx.sender.test")
    assert replies[-1].code == 250, replies
    path = p.wait_messages(f"bob@{DOMAIN}", before + 1)[-1]
    mail = parse_mail(path)
    ours = [v for v in mail.get_all("Authentication-Results") if v.startswith("filter.example.test")]
    assert len(ours) == 1
    assert "spf=pass" in ours[0] and "dkim=pass" in ours[0] and "dmarc=pass" in ours[0]
    assert "bank.test" not in ours[0]
    assert any(v.startswith("mx.elsewhere.test") for v in mail.get_all("Authentication-Results"))
    assert mail["Received-SPF"].lower().startswith("pass")
    assert mail["X-Spam-Status"].startswith("No, score=")
    line = p.filter.wait_log(r"message-id=.*spf=pass.*dkim=pass:sender.test.*dmarc=pass.*score=")
    assert line


def test_dmarc_reject_reaches_the_original_client_and_nothing_is_queued(shared_pipeline):
    p = shared_pipeline
    before = len(p.messages(f"bob@{DOMAIN}"))
    msg = message(sender="mallory@forged.test", to=f"bob@{DOMAIN}", subject="forged")
    replies = transaction(p.edge.port, "mallory@forged.test", [f"bob@{DOMAIN}"], msg)
    final = replies[-1]
    assert (final.code, final.enhanced) == (550, "5.7.1"), replies
    assert "DMARC" in final.text
    time.sleep(1)
    assert len(p.messages(f"bob@{DOMAIN}")) == before
    assert not p.filter.queue("list").stdout.strip() or "forged" not in p.filter.queue("list").stdout
    p.filter.wait_log(r"reject: END-OF-MESSAGE: 550 5\.7\.1.*dmarc=fail")


def test_dns_failure_of_a_policy_is_a_451_never_a_pass(shared_pipeline):
    p = shared_pipeline
    msg = message(sender="a@tempdmarc.test", to=f"bob@{DOMAIN}")
    final = transaction(p.edge.port, "a@tempdmarc.test", [f"bob@{DOMAIN}"], msg)[-1]
    assert (final.code, final.enhanced) == (451, "4.7.1")


def test_a_score_over_the_quarantine_threshold_is_kept_then_released_by_hand(make_pipeline):
    from tests.integration.helpers import parse_mail, queued_id, smarthost, wait_until
    p = make_pipeline(filter={"dmarc": {"reject_policy": "score"}, "actions": {"quarantine": 3}})
    msg = message(sender="mallory@forged.test", to=f"bob@{DOMAIN}", subject="held")
    final = transaction(p.edge.port, "mallory@forged.test", [f"bob@{DOMAIN}"], msg)[-1]
    assert final.code == 250, final          # quarantined mail is accepted: the sender learns nothing
    edge_id = queued_id(final)
    line = p.filter.wait_log(r"quarantined: score 5\.00 >= 3")
    assert line
    listed = smarthost("quarantine", "list", "--config", str(p.filter.config_path))
    assert listed.returncode == 0 and "mallory@forged.test" in listed.stdout, listed
    time.sleep(0.5)
    assert not p.messages(f"bob@{DOMAIN}")
    released = smarthost("quarantine", "release", edge_id, "--config", str(p.filter.config_path))
    assert released.returncode == 0 and "released" in released.stdout, released
    path = p.wait_messages(f"bob@{DOMAIN}", 1)[0]
    mail = parse_mail(path)
    assert mail["X-Spam-Flag"] == "YES" and mail["X-Spam-Status"].startswith("Yes, score=5.00")
    assert "dmarc=fail" in mail["Authentication-Results"]
    wait_until(lambda: not smarthost("quarantine", "list", "--config",
                                     str(p.filter.config_path)).stdout.count("mallory"), 10, "quarantine empty")
