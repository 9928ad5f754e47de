"""Each outside component of the filter stopped while mail flows: the declared behaviour
(docs/filter.md, "When an outside component fails"), and nothing the client was given a 250
for is lost, nothing refused is delivered.

clamd: fails closed (451 4.7.1) unless ``antivirus.on_failure = "accept"``.  Redis:
greylisting fails open (GREYLIST_FAIL) unless ``greylist.on_failure = "tempfail"``.  DNS:
what was cached still decides; a new domain's DMARC cannot be decided, 451 4.7.1
(``dmarc.temperror``).  spamd and rspamd: fail open (SPAMD_FAIL, RSPAMD_FAIL) unless
``on_failure = "tempfail"``.  Each daemon is killed (SIGKILL, its children too) once 40 % of the
replies are in, while the other sessions go on sending."""
from __future__ import annotations

import pytest

from tests.clamd import clamd  # noqa: F401  (the fixture)
from tests.clamd import EICAR
from tests.dnsserver import dns_server  # noqa: F401  (the fixture)
from tests.filter.mailauth import attachment
from tests.integration.helpers import DOMAIN, assert_nothing_lost, message, parse_mail, send_under_load
from tests.integration.helpers import test_nameserver as nameserver
from tests.redisserver import redis_server  # noqa: F401  (the fixture)
from tests.rspamd import rspamd  # noqa: F401  (the fixture)
from tests.spamd import spamd  # noqa: F401  (the fixture)

BOB = f"bob@{DOMAIN}"
COUNT = 40


def plain(i: int, domain: str = "example.net"):
    sender = f"s{i}@{domain}"
    return sender, [BOB], message(f"outage {i}", sender=sender, to=BOB)


@pytest.mark.parametrize("on_failure", ["tempfail", "accept"])
def test_clamd_stopped_under_load(make_pipeline, clamd, on_failure):
    av = clamd()
    p = make_pipeline(filter={"antivirus": {"servers": [av.address], "timeout": 3, "on_failure": on_failure}})

    def make(i):
        if i % 5 == 4:                        # every fifth carries EICAR
            data = attachment(EICAR, "eicar.com")
            data = data.replace(b"Message-ID: <", f"Message-ID: <virus{i}.".encode(), 1).replace(
                b"@sender.test", b"@example.net")      # no DMARC policy: only the antivirus judges it
            return "v@example.net", [BOB], data
        return plain(i)
    sent = send_under_load(p.edge.port, COUNT, make, outage=av.kill)
    codes = {s.code for s in sent}
    before = [s for s in sent if not s.after_outage]
    after = [s for s in sent if s.after_outage]
    assert after and before
    viruses = [s for i, s in enumerate(sent) if i % 5 == 4]
    assert any(s.code == 554 for s in viruses)            # found while clamd ran
    if on_failure == "tempfail":
        assert codes <= {250, 451, 554}, codes
        assert all(s.code == 451 and s.reply.enhanced == "4.7.1" for s in after), [s.reply for s in after]
    else:
        assert codes <= {250, 554}, codes
        # fail open: unscanned, accepted (the viruses too: that is what accept means)
        assert all(s.code == 250 for s in after), [s.reply for s in after]
        p.filter.wait_log(r"AV_FAIL|antivirus=unavailable|antivirus=failed")
    assert sum(s.code == 250 for s in before) >= 10
    assert_nothing_lost(p, BOB, sent)


@pytest.mark.parametrize("on_failure", ["accept", "tempfail"])
def test_redis_killed_under_load(make_pipeline, redis_server, on_failure):
    server = redis_server()
    # the clients' network is auto-allowed, as in a throughput run: greylisting passes
    server.client().set("smarthost:grey:a:127.0.0.0/24", 100)
    p = make_pipeline(filter={"redis": {"servers": [server.address], "timeout": 0.5},
                              "greylist": {"enabled": True, "on_failure": on_failure}})
    sent = send_under_load(p.edge.port, COUNT, plain, outage=server.kill)
    before = [s for s in sent if not s.after_outage]
    after = [s for s in sent if s.after_outage]
    assert after and sum(s.code == 250 for s in before) >= 10
    if on_failure == "accept":
        assert all(s.code == 250 for s in sent), [s.reply for s in sent if s.code != 250]
        p.filter.wait_log(r"greylist=unavailable")
        p.filter.wait_log(r"redis unavailable at 127\.0\.0\.1:\d+")
    else:
        assert {s.code for s in sent} <= {250, 451}
        assert all(s.code == 451 and s.reply.enhanced == "4.7.1" for s in after), [s.reply for s in after]
    assert_nothing_lost(p, BOB, sent)
    assert p.filter.running and p.edge.running


def test_dns_stopped_under_load(make_pipeline, dns_server):
    records = [("_dmarc", "TXT", "v=DMARC1; p=none")]
    records += [(f"d{i}", "TXT", "v=spf1 ip4:127.0.0.0/8 -all") for i in range(COUNT)]
    dns = dns_server({"dns.test": records})
    p = make_pipeline(filter={"dns": {"nameservers": [f"{h}:{port}" for h, port in dns.nameservers],
                                      "timeout": 1}})
    sent = send_under_load(p.edge.port, COUNT, lambda i: plain(i, f"d{i}.dns.test"), outage=dns.stop)
    before = [s for s in sent if not s.after_outage]
    after = [s for s in sent if s.after_outage]
    assert after and sum(s.code == 250 for s in before) >= 10
    assert {s.code for s in sent} <= {250, 451}
    # a new domain after the outage: SPF and DMARC cannot be looked up; the message waits
    assert all(s.code == 451 and s.reply.enhanced == "4.7.1" for s in after), [s.reply for s in after]
    p.filter.wait_log(r"dmarc=temperror")
    assert_nothing_lost(p, BOB, sent)


def spam_status(p) -> list[str]:
    return [" ".join(str(parse_mail(f).get("X-Spam-Status", "")).split()) for f in p.messages(BOB)]


def test_spamd_killed_under_load_tempfails_when_so_configured(make_pipeline, spamd):
    server = spamd()
    p = make_pipeline(filter={"spamd": {"servers": [server.address], "timeout": 5, "on_failure": "tempfail"}})
    sent = send_under_load(p.edge.port, 30, plain, sessions=3, outage=server.kill, at=0.34)
    after = [s for s in sent if s.after_outage]
    assert after and all(s.code == 451 and s.reply.enhanced == "4.7.1" for s in after), [s.reply for s in after]
    assert {s.code for s in sent} <= {250, 451}
    assert_nothing_lost(p, BOB, sent)
    assert any("SPAMD(" in status for status in spam_status(p))
    p.filter.wait_log(r"spamd=-?[0-9.]+/5 \(")                     # a scanned message's log line
    p.filter.wait_log(r"spamd: no server answered .*; tempfail")


def test_rspamd_killed_under_load_fails_open(make_pipeline, rspamd):
    server = rspamd(int(nameserver().rsplit(":", 1)[1]))
    p = make_pipeline(filter={"rspamd": {"servers": [server.address], "timeout": 5}})
    sent = send_under_load(p.edge.port, 30, plain, sessions=3, outage=server.kill, at=0.34)
    assert all(s.code == 250 for s in sent), [s.reply for s in sent if s.code != 250]
    assert_nothing_lost(p, BOB, sent)
    statuses = spam_status(p)
    assert any("RSPAMD(" in s for s in statuses) and any("RSPAMD_FAIL(" in s for s in statuses), statuses
    p.filter.wait_log(r"rspamd: no server answered .*; accepted unscanned")
