"""DNS lists with scores (filter.dnslists): the client's address at MAIL (RBL, DNSWL, IPv6 nibbles,
mapped IPv4), the domains of the message's URLs at end of data (URIBL), scored by the actions check,
against a real DNS server with test zones; error codes, SERVFAIL and timeouts fail open; answers are
cached; the configuration is checked when loaded."""
from __future__ import annotations

import base64
import ipaddress
import socket

import pytest
from twisted.internet import defer

from filter.dnslists import MAX_HOSTS, url_subjects
from shared.checks.core import Action, Request
from shared.checks.dnsbl import query_name
from shared.config import ConfigError
from shared.config.schema import tier_spec
from shared.checks.registry import describe
from shared.message import MessageView
from tests.dnsserver import start_dns_server
from tests.filter.mailauth import message, zones
from tests.filter.test_mailauth import RECEIVED, Filter, added, settings
from tests.support import logged, real  # noqa: F401  (the fixture)

SENDER = "a@neutral.test"            # SPF neutral, no DMARC: those checks score 0
V6 = "2001:db8::1"


def nibbles(address: str) -> str:
    return query_name(ipaddress.ip_address(address), "zen.example")


def list_zones() -> dict:
    return {
        **zones(),
        "zen.example": [
            ("10.2.0.192", "A", "127.0.0.2"),            # SBL: matches =127.0.0.[2..3]
            ("11.2.0.192", "A", "127.0.0.4"),            # XBL: not [2..3], matches =127.0.0.4
            ("12.2.0.192", "A", "127.255.255.254"),      # query refused: no listing
            ("14.2.0.192", "A", "10.0.0.1"),             # outside 127/8: no listing
            ("13.2.0.192", "SERVFAIL", None),
            ("15.2.0.192", "A", "127.0.0.2"),
            (nibbles(V6) + ".", "A", "127.0.0.3"),
        ],
        "bl2.example": [("15.2.0.192", "A", "127.0.0.2")],
        "wl.example": [("20.2.0.192", "A", "127.0.10.3")],
        "uribl.example": [
            ("example.co.uk", "A", "127.0.0.2"),
            ("spam.test", "A", "127.0.0.4"),
            ("5.113.0.203", "A", "127.0.0.2"),
            ("refused.test", "A", "127.255.255.255"),
        ] + [(f"d{n}.test", "A", "127.0.0.2") for n in range(30)],
    }


CLIENT_ZONES = ["zen.example=127.0.0.[2..3]*5.5 RBL_ZEN_SBL", "zen.example=127.0.0.4*2 RBL_ZEN_XBL",
                "bl2.example*1.5", "wl.example=127.0.[0..255].[2..3]*-4 DNSWL_MED"]
URI_ZONES = ["uribl.example=127.0.0.[2;4]*4 URIBL_TEST"]


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = start_dns_server(tmp_path_factory.mktemp("dns"), list_zones())
    yield server
    server.stop()


class Lists(Filter):
    """The default policy's mail and end_of_data chains, one transaction after the other."""

    def __init__(self, real, s) -> None:
        super().__init__(real, s)

    def run(self, msg: bytes = None, *, client="192.0.2.10", login=None, sender=SENDER,
            recipients=("bob@example.test",)):
        msg = msg if msg is not None else message(sender)
        results = {}
        record = results.__setitem__
        mail = Request(phase="mail", client_address=client, sender=sender, login=login, queue_id="Q1",
                       results=results)
        verdict = self.real.wait(self.chain.run(mail, record), limit=20)
        assert not verdict.final, verdict
        header = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        whole = RECEIVED + msg
        view = MessageView(header, len(whole), lambda: defer.succeed(whole))
        eod = mail.at("end_of_data", recipients=tuple(recipients), message=view)
        verdict = self.real.wait(self.chain.run(eod, record), limit=20)
        return verdict, results


def lists(real, server, tmp_path, client=CLIENT_ZONES, uri=URI_ZONES, **sections):
    sections["dnslists"] = {"zones": client, **sections.get("dnslists", {})}
    sections["urilists"] = {"zones": uri, **sections.get("urilists", {})}
    return Lists(real, settings(server, tmp_path, **sections))


@pytest.fixture
def filt(real, dns, tmp_path):
    f = lists(real, dns, tmp_path)
    yield f
    f.close()


def scored(results):
    return {name: score for name, score, _ in results["actions"].result.symbols}


def test_a_listed_client_is_scored_with_the_symbol_of_the_matching_filter(filt):
    verdict, results = filt.run(client="192.0.2.10")
    assert verdict.action is Action.CONTINUE
    assert results["dnslists"].result.hits == ("RBL_ZEN_SBL",)
    assert scored(results)["RBL_ZEN_SBL"] == 5.5 and "RBL_ZEN_XBL" not in scored(results)
    assert results["actions"].result.score == pytest.approx(5.5)
    status = added(results, "X-Spam-Status")[0]
    assert status.startswith("No, score=5.50") and "RBL_ZEN_SBL(5.5)" in status
    assert results["dnslists"].result.log == "dnslists=RBL_ZEN_SBL"
    # 127.0.0.4 is not in [2..3]: only the other entry of the zone counts
    _, results = filt.run(client="192.0.2.11")
    assert results["dnslists"].result.hits == ("RBL_ZEN_XBL",)
    assert results["actions"].result.score == pytest.approx(2.0)
    # not listed anywhere
    _, results = filt.run(client="192.0.2.99")
    assert results["dnslists"].result.hits == () and results["actions"].result.score == 0


def test_the_hits_of_several_lists_add_up_and_can_reach_an_action(real, dns, tmp_path):
    f = lists(real, dns, tmp_path, actions={"add_header": 7})
    try:
        _, results = f.run(client="192.0.2.15")
        assert set(results["dnslists"].result.hits) == {"RBL_ZEN_SBL", "RBL_BL2_EXAMPLE"}
        assert results["actions"].result.score == pytest.approx(7.0)
        assert results["actions"].result.action == "add header"
        assert ("X-Spam-Flag", "YES") in results["actions"].edits.add
    finally:
        f.close()


def test_ipv6_is_looked_up_as_nibbles_and_mapped_ipv4_as_ipv4(filt):
    assert nibbles(V6) == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.zen.example"
    _, results = filt.run(client=V6)
    assert results["dnslists"].result.hits == ("RBL_ZEN_SBL",)
    _, results = filt.run(client="::ffff:192.0.2.11")
    assert results["dnslists"].result.hits == ("RBL_ZEN_XBL",)


def test_an_allowlist_hit_has_a_negative_score_and_allowlists_the_client(real, dns, tmp_path):
    f = lists(real, dns, tmp_path, greylist={"enabled": True})
    try:
        _, results = f.run(client="192.0.2.20")
        r = results["dnslists"].result
        assert r.hits == ("DNSWL_MED",) and r.score == -4 and r.allowlisted
        assert results["actions"].result.score == pytest.approx(-4)
        assert "DNSWL_MED(-4)" in added(results, "X-Spam-Status")[0]
        # greylisting (at RCPT, after MAIL's checks) skips it
        greylist = next(c.fn for c in f.chain.checks if c.name == "greylist")
        rcpt = Request(phase="rcpt", client_address="192.0.2.20", sender=SENDER, recipient="bob@example.test",
                       results=results)
        v = f.real.wait(defer.maybeDeferred(greylist, rcpt))
        assert v.action is Action.CONTINUE and v.result.detail == "DNS-allowlisted client"
        _, other = f.run(client="192.0.2.99")
        v = f.real.wait(defer.maybeDeferred(greylist, rcpt.at("rcpt", client_address="192.0.2.99", results=other)))
        assert v.action is Action.TEMPFAIL
    finally:
        f.close()


def test_the_allowlist_threshold_and_actions_scores_decide_who_is_allowlisted(real, dns, tmp_path):
    f = lists(real, dns, tmp_path, dnslists={"allowlist_threshold": -5})
    try:
        _, results = f.run(client="192.0.2.20")
        assert not results["dnslists"].result.allowlisted
    finally:
        f.close()
    f = lists(real, dns, tmp_path, dnslists={"allowlist_threshold": -5}, actions={"scores": {"DNSWL_MED": -6}})
    try:
        _, results = f.run(client="192.0.2.20")
        assert results["dnslists"].result.allowlisted
        assert results["actions"].result.score == pytest.approx(-6)
    finally:
        f.close()


def test_error_codes_and_answers_outside_127_are_ignored_and_logged_once(filt, capture_log):
    for _ in range(2):
        _, results = filt.run(client="192.0.2.12")
        assert results["dnslists"].result.hits == () and results["dnslists"].result.failed == ("zen.example",)
    _, results = filt.run(client="192.0.2.14")
    assert results["dnslists"].result.hits == ()
    warnings = [e for e in capture_log if "zone zen.example" in e]
    assert len(warnings) == 1, warnings           # once a minute per zone at most
    assert "127.255.255.254, an error code" in warnings[0]


def test_servfail_fails_open(filt, capture_log):
    verdict, results = filt.run(client="192.0.2.13")
    assert verdict.action is Action.CONTINUE
    r = results["dnslists"].result
    assert r.hits == () and "zen.example" in r.failed and "no answer: zen.example" in r.log
    assert any("SERVFAIL" in e for e in capture_log)


def test_a_silent_server_times_out_and_fails_open(real, tmp_path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))

    class Silent:
        address = silent.getsockname()
    try:
        f = lists(real, Silent, tmp_path, uri=[])           # [dns] timeout 2
        try:
            mail = Request(phase="mail", client_address="192.0.2.10", sender=SENDER, queue_id="Q1", results={})
            out = {}
            verdict = real.wait(f.chain.run(mail, out.__setitem__), limit=10)
            assert verdict.action is Action.CONTINUE
            assert out["dnslists"].result.failed and out["dnslists"].result.hits == ()
        finally:
            f.close()
    finally:
        silent.close()


def test_answers_are_cached_by_ttl_a_second_message_asks_nobody(real, tmp_path):
    server = start_dns_server(tmp_path / "own", list_zones())
    f = lists(real, server, tmp_path)
    try:
        html = b'<a href="http://www.example.co.uk/x">x</a>'
        _, first = f.run(_html(html), client="192.0.2.10")
        lookups = f.ctx.store["resolver:current"][1].lookups
        server.stop()
        _, second = f.run(_html(html), client="192.0.2.10")
        assert f.ctx.store["resolver:current"][1].lookups == lookups
        for results in (first, second):
            assert results["dnslists"].result.hits == ("RBL_ZEN_SBL",)
            assert results["urilists"].result.hits == ("URIBL_TEST",)
    finally:
        f.close()
        server.stop()


def test_mynetworks_and_authenticated_clients_are_not_looked_up(real, dns, tmp_path):
    f = lists(real, dns, tmp_path, relay={"mynetworks": ["192.0.2.0/28"]})
    try:
        _, results = f.run(client="192.0.2.10")
        assert results["dnslists"].result is None and not results["dnslists"].symbols
        _, results = f.run(client="192.0.2.20", login="alice")
        assert results["dnslists"].result is None and not results["dnslists"].symbols
        _, results = f.run(client="192.0.2.20")
        assert results["dnslists"].result.hits == ("DNSWL_MED",)
    finally:
        f.close()


def _html(markup: bytes) -> bytes:
    b64 = base64.encodebytes(b"<html><body>" + markup + b"</body></html>").replace(b"\n", b"\r\n")
    return (f"From: <{SENDER}>\r\nTo: <bob@example.test>\r\nSubject: links\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/alternative; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: text/plain\r\n\r\nnothing here\r\n"
            "--B\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() \
        + b64 + b"--B--\r\n"


def test_a_listed_domain_in_a_base64_html_part_is_scored_by_its_registered_domain(filt):
    verdict, results = filt.run(_html(b'<a href="https://a.b.example.co.uk/path?q=1">click</a>'),
                                client="192.0.2.99")
    assert verdict.action is Action.CONTINUE
    r = results["urilists"].result
    assert r.hits == ("URIBL_TEST",) and r.looked_up == 1
    assert results["urilists"].symbols[0].detail == "example.co.uk"
    assert scored(results) == {**{n: 0 for n in scored(results) if n != "URIBL_TEST"}, "URIBL_TEST": 4}
    assert "URIBL_TEST(4)" in added(results, "X-Spam-Status")[0]


def test_a_domain_not_listed_ip_urls_and_refusing_lists(filt):
    _, results = filt.run(_html(b'see http://clean.test/ and http://203.0.113.5:8080/x'), client="192.0.2.99")
    assert results["urilists"].result.hits == ("URIBL_TEST",)
    assert results["urilists"].symbols[0].detail == "203.0.113.5"
    _, results = filt.run(_html(b'http://refused.test/'), client="192.0.2.99")
    assert results["urilists"].result.hits == () and results["urilists"].result.failed == ("uribl.example",)


def test_a_symbol_counts_once_per_message(filt):
    body = "http://spam.test/1 http://www.spam.test/2 www.example.co.uk".encode()
    _, results = filt.run(message(SENDER, body=body.decode() + "\r\n"), client="192.0.2.99")
    assert results["urilists"].result.hits == ("URIBL_TEST",)
    assert results["urilists"].symbols[0].detail == "spam.test,example.co.uk"
    assert results["actions"].result.score == pytest.approx(4)


def test_the_registered_domain_dedupe_cap_and_skip():
    text = ("http://a.b.example.co.uk/ https://x.example.co.uk http://user:pw@www.other.test:80/ "
            "ftp://[2001:db8::5]/f www.bare.test http://localhost/ http://1.2.3.4.5/ "
            + " ".join(f"http://d{n}.test/" for n in range(40)))
    msg = f"Subject: x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" \
          f"{text.replace('=', '=3D')}\r\n".encode()
    found = url_subjects(msg, 1 << 20, 10)
    assert list(found)[:5] == ["example.co.uk", "other.test", "2001:db8::5", "bare.test", "d0.test"]
    assert len(found) == 10
    assert "example.co.uk" not in url_subjects(msg, 1 << 20, 10, frozenset({"example.co.uk"}))


def test_max_domains_caps_the_lookups(real, dns, tmp_path):
    f = lists(real, dns, tmp_path, urilists={"max_domains": 3})
    try:
        body = " ".join(f"http://d{n}.test/" for n in range(30))
        _, results = f.run(message(SENDER, body=body + "\r\n"), client="192.0.2.99")
        r = results["urilists"].result
        assert r.looked_up == 3 and results["urilists"].symbols[0].detail == "d0.test,d1.test,d2.test"
    finally:
        f.close()


def test_a_large_message_is_scanned_only_up_to_scan_size():
    filler = "x" * 2000 + "\r\n"
    body = filler * 2000 + "http://late.test/\r\n"                   # some 4 MB before the URL
    msg = f"Subject: big\r\nContent-Type: text/plain\r\n\r\nhttp://early.test/\r\n{body}".encode()
    assert list(url_subjects(msg, 1 << 20, 20)) == ["early.test"]
    assert list(url_subjects(msg, 8 << 20, 20)) == ["early.test", "late.test"]
    # hosts that are no names count towards the hosts examined (MAX_HOSTS), so the work is bounded
    junk = " ".join(f"http://{n}.{n}.{n}.{n}.{n}/" for n in range(MAX_HOSTS))
    msg = f"Subject: many\r\n\r\n{junk} http://after.test/\r\n".encode()
    assert url_subjects(msg, 8 << 20, 20) == {}
    assert list(url_subjects(msg.replace(b"http://0.0.0.0.0/", b"http://first.test/"), 8 << 20, 20)) == \
        ["first.test"]


def test_actions_scores_override_a_configured_symbol_and_check_config_prints_them(real, dns, tmp_path):
    s = settings(dns, tmp_path, dnslists={"zones": CLIENT_ZONES}, urilists={"zones": URI_ZONES},
                 actions={"scores": {"RBL_ZEN_SBL": 8}})
    text = describe(s, tier_spec("filter"))
    assert "mail         1. dnslists (timeout" in text
    assert "zones zen.example=127.0.0.[2..3]*5.5 RBL_ZEN_SBL, zen.example=127.0.0.4*2 RBL_ZEN_XBL" in text
    assert "symbols: RBL_ZEN_SBL 8, RBL_ZEN_XBL 2, RBL_BL2_EXAMPLE 1.5, DNSWL_MED -4" in text
    assert "symbols: URIBL_TEST 4" in text
    f = Lists(real, s)
    try:
        _, results = f.run(client="192.0.2.10")
        assert scored(results)["RBL_ZEN_SBL"] == 8
    finally:
        f.close()


def test_the_lists_are_off_until_zones_are_set(real, dns, tmp_path):
    s = settings(dns, tmp_path)
    assert "dnslists (off)" in describe(s, tier_spec("filter"))
    f = Lists(real, s)
    try:
        _, results = f.run(_html(b"http://example.co.uk/"), client="192.0.2.10")
        assert "dnslists" not in results and "urilists" not in results
    finally:
        f.close()


def test_unknown_symbols_and_bad_entries_are_refused_at_load(dns, tmp_path):
    from shared.checks.registry import preflight_checks
    s = settings(dns, tmp_path, dnslists={"zones": CLIENT_ZONES}, actions={"scores": {"RBL_NOWHERE": 3}})
    with pytest.raises(ConfigError, match="RBL_NOWHERE: no check of this tier reports that symbol"):
        preflight_checks(s, tier_spec("filter"))
    preflight_checks(settings(dns, tmp_path, dnslists={"zones": CLIENT_ZONES},
                              actions={"scores": {"RBL_ZEN_XBL": 3}}), tier_spec("filter"))
    bad = {"zen.example": "the score is missing",
           "zen.example*lots": "is not a number",
           "zen.example=128.0.0.2*3": "never matches",
           "zen.example*3 lower_case": "is not a symbol name",
           "zen.example*3 RBL_A RBL_B": "is not ZONE[=FILTER]*SCORE [SYMBOL]",
           "zen.example*3 SPF_FAIL": "a symbol of another check"}
    for entry, why in bad.items():
        with pytest.raises(ConfigError, match="dnslists.zones") as e:
            settings(dns, tmp_path, dnslists={"zones": [entry]})
        assert why in str(e.value), (entry, str(e.value))
    with pytest.raises(ConfigError, match="listed twice"):
        settings(dns, tmp_path, dnslists={"zones": ["zen.example*3 A", "zen.example*4 B"]})
    with pytest.raises(ConfigError, match="the symbol RBL_X is also"):
        settings(dns, tmp_path, dnslists={"zones": ["zen.example*3 RBL_X", "bl2.example*4 RBL_X"]})
    with pytest.raises(ConfigError, match="urilists.zones.*also dnslists"):
        settings(dns, tmp_path, dnslists={"zones": ["zen.example*3 RBL_X"]},
                 urilists={"zones": ["uribl.example*3 RBL_X"]})


@pytest.fixture
def capture_log():
    with logged("smarthost.dnslists") as seen:
        yield seen


def test_a_plain_message_read_without_a_mime_parse_finds_what_the_parse_finds():
    """The fast path (single-part text/plain, no transfer encoding) against the MIME parse of the
    same text as a part of a multipart: the same hosts, in the same order."""
    import random
    from filter.dnslists import _plain, url_subjects
    rng = random.Random(7)
    words = ["see", "https://a.example.com/x", "http://WWW.Shop.Example.co.uk/?q=1", "www.bare.example.net",
             "ftp://files.example.org:21/f", "mailto:x@y.example", "http://[2001:db8::1]/p", "xwww.no.example",
             "/www.slash.example", "https://user:pw@login.example.io/", "http://192.0.2.7/a", ",", "\r\n"]
    for _ in range(200):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))).encode()
        plain = b"From: a@b.example\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
        assert _plain(plain, 1 << 20) is not None
        multipart = (b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=Q\r\n\r\n"
                     b"--Q\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body + b"\r\n--Q--\r\n")
        assert _plain(multipart, 1 << 20) is None
        assert list(url_subjects(plain, 1 << 20, 50)) == list(url_subjects(multipart, 1 << 20, 50)), body


def test_folded_fields_do_not_hide_a_type_or_an_encoding():
    from filter.dnslists import _plain
    signed = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\nContent-Type: text/plain\r\n\r\nbody"
    assert _plain(signed, 100) == "body"
    folded_type = b"Content-Type:\r\n text/html\r\n\r\n<a href=x>"
    folded_cte = b"Content-Type: text/plain\r\nContent-Transfer-Encoding:\r\n base64\r\n\r\naGk="
    assert _plain(folded_type, 100) is None and _plain(folded_cte, 100) is None
