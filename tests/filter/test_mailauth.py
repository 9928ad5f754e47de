"""SPF, DKIM, ARC, DMARC, Authentication-Results, scores and actions, DKIM signing:
the filter's default end-of-data chain, against a real DNS server with test zones."""
from __future__ import annotations

import pytest
from twisted.internet import defer

from filter.dkimsign import keygen, load_key
from filter.mailauth import MethodResult, organizational_domain, tags
from shared.blocking import InlinePool
from shared.checks.core import Action, Request
from shared.checks.registry import BuildContext, build_policies
from shared.config.schema import parse, tier_spec
from shared.message import MessageView
from tests.dnsserver import start_dns_server
from tests.filter.mailauth import keys, message, signed, zones
from tests.support import real  # noqa: F401  (the fixture)

RECEIVED = b"Received: from mx.sender.test (mx.sender.test [127.0.0.1]) by filter.example.test\r\n"


def settings(dns, tmp_path, **sections):
    doc = {"next_hop": {"hosts": ["127.0.0.1:1"]}, "queue": {"directory": str(tmp_path / "q")},
           "server": {"hostname": "filter.example.test"},
           "dns": {"nameservers": [f"127.0.0.1:{dns.address[1]}"], "timeout": 2}}
    for name, keys_ in sections.items():
        doc.setdefault(name, {}).update(keys_)
    return parse("filter", doc)


class Filter:
    """The default policy's end_of_data chain of a configuration, run on a real reactor."""

    def __init__(self, real, s) -> None:
        self.real = real
        self.ctx = BuildContext(s, real.reactor, InlinePool())
        self.chain = build_policies(s, tier_spec("filter"), self.ctx)["default"].chain

    def run(self, msg: bytes, *, sender="alice@sender.test", client="127.0.0.1", helo="mx.sender.test",
            login=None, recipients=("bob@example.test",)):
        header = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        whole = RECEIVED + msg
        view = MessageView(header, len(whole), lambda: defer.succeed(whole))
        req = Request(phase="end_of_data", client_address=client, helo=helo, sender=sender, login=login,
                      recipients=tuple(recipients), message=view, queue_id="Q1")
        results = {}
        verdict = self.real.wait(self.chain.run(req.at("end_of_data", results=results),
                                                lambda n, v: results.__setitem__(n, v)), limit=20)
        return verdict, results

    def close(self):
        for close in self.ctx.closers:
            close()


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    """One server for the module: the zones are data no test changes."""
    server = start_dns_server(tmp_path_factory.mktemp("dns"), zones())
    yield server
    server.stop()


@pytest.fixture
def filt(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path))
    yield f
    f.close()


def added(results, name):
    out = []
    for v in results.values():
        if v.edits:
            out += [val for n, val in v.edits.add if n.lower() == name.lower()]
    return out


def symbols(results):
    return {s.name for v in results.values() for s in v.symbols}


def test_signed_mail_from_an_allowed_client_passes_everything(filt):
    verdict, results = filt.run(signed(message()))
    assert verdict.action is Action.CONTINUE
    assert results["spf"].result.result == "pass"
    assert [s.result for s in results["dkim"].result.signatures] == ["pass"]
    assert results["dmarc"].result.result == "pass"
    assert {"SPF_PASS", "DKIM_VALID", "DMARC_PASS", "ARC_NONE"} <= symbols(results)
    ar = added(results, "Authentication-Results")
    assert len(ar) == 1
    assert ar[0].startswith("filter.example.test;")
    assert "spf=pass" in ar[0] and "smtp.mailfrom=alice@sender.test" in ar[0]
    assert "dkim=pass" in ar[0] and "header.d=sender.test" in ar[0] and "header.s=sel" in ar[0]
    assert "dmarc=pass" in ar[0] and "header.from=sender.test" in ar[0]
    assert added(results, "Received-SPF")[0].lower().startswith("pass")
    scored = results["actions"].result
    assert scored.action == "no action" and scored.score == pytest.approx(-1.2)
    status = added(results, "X-Spam-Status")[0]
    assert status.startswith("No, score=-1.20") and "DKIM_VALID(-0.5)" in status


def test_ed25519_and_rsa_signatures_are_each_checked(filt):
    msg = signed(signed(message(), key="ed", selector="ed"))
    _, results = filt.run(msg)
    sigs = results["dkim"].result.signatures
    assert [(s.result, s.selector, s.algorithm) for s in sigs] == [
        ("pass", "sel", "rsa-sha256"), ("pass", "ed", "ed25519-sha256")]


def test_a_changed_body_fails_dkim_and_dmarc_rejects_when_spf_does_not_pass(filt):
    msg = signed(message(sender="alice@sender.test")).replace(b"this is a test", b"this is a fake")
    verdict, results = filt.run(msg, client="192.0.2.77")
    assert [s.result for s in results["dkim"].result.signatures] == ["fail"]
    assert results["spf"].result.result == "fail"
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
    assert "DMARC" in verdict.reply.text and "actions" not in results


def test_forged_from_domain_is_refused_by_dmarc(filt):
    # MAIL FROM and the signature are another domain's: nothing aligned with From.
    msg = signed(message(sender="mallory@forged.test"), domain="other.test")
    verdict, results = filt.run(msg, sender="mallory@other.test", client="192.0.2.5")
    assert results["dmarc"].result.result == "fail"
    assert verdict.action is Action.REJECT and verdict.reply.code == 550


def test_dmarc_reject_as_score_only(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, dmarc={"reject_policy": "score"}))
    try:
        verdict, results = f.run(message(sender="mallory@forged.test"), sender="mallory@forged.test",
                                 client="192.0.2.5")
        assert verdict.action is Action.CONTINUE
        assert "DMARC_REJECT" in symbols(results) and "SPF_FAIL" in symbols(results)
        assert results["actions"].result.score == pytest.approx(5.0)
    finally:
        f.close()


def test_spf_results(filt):
    cases = {"soft.test": "softfail", "neutral.test": "neutral", "broken.test": "permerror",
             "nospf.example.test": "none", "temp.test": "temperror"}
    for domain, want in cases.items():
        _, results = filt.run(message(sender=f"a@{domain}"), sender=f"a@{domain}", client="192.0.2.9")
        assert results["spf"].result.result == want, domain
        assert f"SPF_{want.upper()}" in symbols(results)


def test_spf_temperror_is_never_a_pass_and_can_tempfail(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, spf={"temperror": "tempfail"}))
    try:
        verdict, _ = f.run(message(sender="a@temp.test"), sender="a@temp.test")
        assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    finally:
        f.close()


def test_dmarc_temperror_tempfails_by_default(filt):
    verdict, results = filt.run(message(sender="a@tempdmarc.test"), sender="a@tempdmarc.test")
    assert results["dmarc"].result.result == "temperror"
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451


def test_dkim_key_lookup_failure_is_temperror(filt):
    verdict, results = filt.run(signed(message(sender="a@tempkey.test"), domain="tempkey.test"),
                                sender="a@tempkey.test", client="192.0.2.3")
    assert [s.result for s in results["dkim"].result.signatures] == ["temperror"]
    assert results["dmarc"].result.result == "temperror"
    assert verdict.action is Action.TEMPFAIL


def test_null_sender_uses_the_helo_identity(filt):
    _, results = filt.run(message(), sender="", helo="mx.sender.test")
    spf = results["spf"].result
    assert (spf.identity, spf.result, spf.domain) == ("helo", "pass", "mx.sender.test")
    assert "smtp.helo=mx.sender.test" in added(results, "Authentication-Results")[0]


def test_rsa_key_under_the_floor_fails(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, dkim={"min_key_bits": 2048}))
    try:
        _, results = f.run(signed(message(), selector="small", key="small"))
        sig = results["dkim"].result.signatures[0]
        assert sig.result == "fail" and "1024" in sig.reason
        _, results = f.run(signed(message()))
        assert results["dkim"].result.signatures[0].result == "pass"
    finally:
        f.close()


def test_body_length_tag_leaving_content_unsigned_is_not_valid(filt):
    msg = signed(message(), length=True)
    msg += b"Appended by someone else: click here\r\n"
    _, results = filt.run(msg, client="192.0.2.8")
    sig = results["dkim"].result.signatures[0]
    assert sig.result == "policy"
    assert results["dmarc"].result.result == "fail"


def test_full_body_length_tag_is_fine(filt):
    _, results = filt.run(signed(message(), length=True))
    assert results["dkim"].result.signatures[0].result == "pass"


def test_dmarc_pct_zero_never_rejects_and_subdomain_policy(filt):
    verdict, results = filt.run(message(sender="a@half.test"), sender="a@half.test", client="192.0.2.1")
    assert results["dmarc"].result.applied == "quarantine" and verdict.action is Action.CONTINUE
    # a.sender.test has no record of its own: the organizational domain's sp= applies
    verdict, results = filt.run(message(sender="x@a.sender.test"), sender="x@a.sender.test", client="192.0.2.1")
    r = results["dmarc"].result
    assert (r.result, r.policy) == ("fail", "quarantine")
    assert "DMARC_QUARANTINE" in symbols(results)


def test_forged_authentication_results_with_our_id_are_removed(filt):
    extra = ("Authentication-Results: filter.example.test; dkim=pass header.d=bank.test\r\n"
             "Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=a@sender.test\r\n"
             "Authentication-Results: (comment) FILTER.example.test; dmarc=pass\r\n")
    _, results = filt.run(signed(message(extra=extra)))
    drop = set()
    for v in results.values():
        if v.edits:
            drop |= v.edits.drop
    assert drop == {("authentication-results", 0), ("authentication-results", 2)}


def test_authenticated_submission_is_signed_and_not_spf_checked(real, dns, tmp_path):
    path, record = keygen("sender.test", "out", str(tmp_path))
    f = Filter(real, settings(dns, tmp_path, dkim_sign={"keys": [f"sender.test out {path}"]}))
    try:
        _, results = f.run(message(), client="192.0.2.200", login="alice")
        assert results["spf"].result.result == "skipped"
        sig = added(results, "DKIM-Signature")
        assert len(sig) == 1 and "d=sender.test" in sig[0] and "s=out" in sig[0]
        assert "out._domainkey.sender.test. IN TXT" in record
        # the signature verifies with the record keygen printed
        import dkim
        txt = "".join(record.split("(", 1)[1].rsplit(")", 1)[0].replace('"', "").split()).replace(";", "; ")
        whole = f"DKIM-Signature: {sig[0]}\r\n".encode() + message()
        assert dkim.verify(whole, dnsfunc=lambda name, timeout=5: txt.encode())
        # an unauthenticated message with the same From is not signed
        _, results = f.run(message(), client="127.0.0.1")
        assert not added(results, "DKIM-Signature")
    finally:
        f.close()


def test_keygen_ed25519(tmp_path):
    path, record = keygen("sender.test", "ed", str(tmp_path), algorithm="ed25519")
    assert load_key(str(path))[0] == b"ed25519-sha256"
    assert "k=ed25519" in record
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        keygen("sender.test", "ed", str(tmp_path))


def test_thresholds_and_per_domain_profiles(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, dmarc={"reject_policy": "score"},
                              actions={"add_header": 2, "reject": 100,
                                       "domains": {"strict.test": {"reject": 4}},
                                       "scores": {"SPF_FAIL": 2.5}}))
    try:
        args = dict(sender="mallory@forged.test", client="192.0.2.5")
        verdict, results = f.run(message(sender="mallory@forged.test"), **args)
        assert verdict.action is Action.CONTINUE and results["actions"].result.action == "add header"
        assert added(results, "X-Spam-Flag") == ["YES"]
        verdict, results = f.run(message(sender="mallory@forged.test"), recipients=("x@strict.test",), **args)
        assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
        assert results["actions"].result.score == pytest.approx(4.5)
    finally:
        f.close()


def test_rewrite_subject_and_quarantine(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, dmarc={"reject_policy": "score"},
                              actions={"rewrite_subject": 3, "quarantine": 0}))
    try:
        _, results = f.run(message(sender="m@forged.test", subject="Win"), sender="m@forged.test", client="192.0.2.5")
        assert added(results, "Subject") == ["***SPAM*** Win"]
        assert ("subject", 0) in results["actions"].edits.drop
    finally:
        f.close()
    f = Filter(real, settings(dns, tmp_path, dmarc={"reject_policy": "score"}, actions={"quarantine": 3}))
    try:
        verdict, results = f.run(message(sender="m@forged.test"), sender="m@forged.test", client="192.0.2.5")
        assert verdict.action is Action.CONTINUE
        assert results["actions"].quarantine.startswith("score 5.00")
    finally:
        f.close()


def test_unknown_symbol_in_scores_is_refused(dns, tmp_path):
    from shared.config import ConfigError
    from shared.daemon import preflight
    s = settings(dns, tmp_path, actions={"scores": {"NO_SUCH_SYMBOL": 1}})
    with pytest.raises(ConfigError, match="NO_SUCH_SYMBOL"):
        preflight(s)


def test_helpers():
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.sender.test") == "sender.test"
    assert tags("v=DMARC1; p=reject;") == {"v": "DMARC1", "p": "reject"}
    assert tags("v=1; v=2") is None
    assert MethodResult("spf", "pass", "a (b)", (("smtp.mailfrom", "x@y"),)).text() == \
        "spf=pass (a \\(b\\)) smtp.mailfrom=x@y"


def test_dns_lookups_are_cached_across_messages(filt):
    filt.run(signed(message()))
    from shared.resolver import resolver_for
    resolver = resolver_for(filt.ctx)
    before = resolver.lookups
    filt.run(signed(message()))
    assert resolver.lookups == before
    assert keys()["rsa"]


def test_opendkim_signed_mail(real, dns, tmp_path):
    """A signature made by OpenDKIM (opendkim-testmsg, which signs rsa-sha1 relaxed/simple)
    verifies; rsa-sha1 counts only where a site accepts it (RFC 8301 retired it)."""
    import subprocess
    key = tmp_path / "sel.private"
    key.write_bytes(keys()["rsa"].private)
    msg = subprocess.run(["opendkim-testmsg", "-C", "-d", "sender.test", "-s", "sel", "-k", str(key)],
                         input=message(), capture_output=True, check=True, timeout=30).stdout
    assert msg.startswith(b"DKIM-Signature:") and b"a=rsa-sha1" in msg
    f = Filter(real, settings(dns, tmp_path, dkim={"rsa_sha1": "accept"}))
    try:
        _, results = f.run(msg)
        assert [(s.result, s.algorithm) for s in results["dkim"].result.signatures] == [("pass", "rsa-sha1")]
        _, results = f.run(msg.replace(b"this is a test", b"this is a fake"))
        assert results["dkim"].result.signatures[0].result == "fail"
    finally:
        f.close()
    f = Filter(real, settings(dns, tmp_path))
    try:
        _, results = f.run(msg)
        sig = results["dkim"].result.signatures[0]
        assert (sig.result, sig.reason) == ("policy", "rsa-sha1 is historic (RFC 8301)")
    finally:
        f.close()


def test_arc_seal_on_the_way_out_validates_at_the_next_hop(real, dns, tmp_path):
    key = tmp_path / "seal.key"
    key.write_bytes(keys()["rsa"].private)
    f = Filter(real, settings(dns, tmp_path, arc_seal={"key": f"sender.test sel {key}"}))
    try:
        msg = signed(message())
        _, results = f.run(msg)
        sealed = results["arc_seal"].result
        assert (sealed.instance, sealed.cv) == (1, "none")
        from shared.message import HeaderEdits
        edits = HeaderEdits()
        for v in results.values():
            edits = edits.then(v.edits)
        onward = edits.apply(msg)
        assert onward.startswith(b"ARC-Seal:") or b"\r\nARC-Seal:" in onward
    finally:
        f.close()
    g = Filter(real, settings(dns, tmp_path))
    try:
        _, results = g.run(onward)
        arc = results["arc"].result
        assert (arc.result, arc.instances, arc.domain) == ("pass", 1, "sender.test")
        assert "ARC_PASS" in symbols(results)
        _, results = g.run(onward.replace(b"this is a test", b"this is a fake"))
        assert results["arc"].result.result == "fail"
    finally:
        g.close()


def test_spf_include_chain_is_looked_up_in_rounds_and_then_cached(real, tmp_path):
    """pyspf never waits on the reactor: each name not cached is fetched and the evaluation
    runs again; a second message needs no lookup at all."""
    zone = {"test": [("chain.test", "TXT", "v=spf1 include:a.chain.test -all"),
                     ("a.chain.test", "TXT", "v=spf1 include:b.chain.test -all"),
                     ("b.chain.test", "TXT", "v=spf1 a:host.chain.test -all exp=exp.chain.test"),
                     ("exp.chain.test", "TXT", "not from here"),
                     ("host.chain.test", "A", "127.0.0.1")]}
    server = start_dns_server(tmp_path / "dns", zone)
    try:
        f = Filter(real, settings(server, tmp_path))
        try:
            from shared.resolver import resolver_for
            _, results = f.run(message(sender="a@chain.test"), sender="a@chain.test", helo="")
            assert results["spf"].result.result == "pass"
            resolver = resolver_for(f.ctx)
            before = resolver.lookups
            _, results = f.run(message(sender="a@chain.test"), sender="a@chain.test", helo="")
            assert results["spf"].result.result == "pass" and resolver.lookups == before
            _, results = f.run(message(sender="a@chain.test"), sender="a@chain.test", helo="", client="192.0.2.1")
            assert results["spf"].result.result == "fail"
        finally:
            f.close()
    finally:
        server.stop()


def test_strict_alignment_needs_the_exact_domain(filt):
    # SPF passes for mail.strict.test and the signature is d=mail.strict.test: relaxed would align
    # with From strict.test, strict does not.
    msg = signed(message(sender="a@strict.test"), domain="mail.strict.test")
    verdict, results = filt.run(msg, sender="a@mail.strict.test")
    assert results["spf"].result.result == "pass"
    assert results["dkim"].result.passed_domains() == ["mail.strict.test"]
    assert results["dmarc"].result.result == "fail" and verdict.action is Action.REJECT
    _, results = filt.run(signed(message(sender="a@sender.test"), domain="sender.test"), sender="a@mail.sender.test")
    assert results["dmarc"].result.result == "pass"        # relaxed (sender.test's adkim=r)


def test_mynetworks_are_not_spf_or_dmarc_checked(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, relay={"mynetworks": ["192.0.2.0/24"]}))
    try:
        verdict, results = f.run(message(sender="mallory@forged.test"), sender="mallory@forged.test",
                                 client="192.0.2.9")
        assert results["spf"].result.result == "skipped" and verdict.action is Action.CONTINUE
        assert results["dmarc"].result.log == "dmarc=skipped"
    finally:
        f.close()


def test_ed25519_signing_round_trip(real, dns, tmp_path):
    """A key from keygen --algorithm ed25519 signs; the check verifies it with the record."""
    path, record = keygen("sender.test", "ed", str(tmp_path), algorithm="ed25519")
    txt = "".join(record.split("(", 1)[1].rsplit(")", 1)[0].replace('"', "").split()).replace(";", "; ")
    assert txt.startswith("v=DKIM1; k=ed25519; p=")
    f = Filter(real, settings(dns, tmp_path, dkim_sign={"keys": [f"sender.test ed {path}"]}))
    try:
        _, results = f.run(message(), login="alice")
        sig = added(results, "DKIM-Signature")
        assert len(sig) == 1 and "a=ed25519-sha256" in sig[0]
        import dkim
        whole = f"DKIM-Signature: {sig[0]}\r\n".encode() + message()
        assert dkim.verify(whole, dnsfunc=lambda name, timeout=5: txt.encode())
    finally:
        f.close()


def test_a_dns_server_that_never_answers_is_a_temporary_error(real, tmp_path):
    import socket
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        f = Filter(real, parse("filter", {"next_hop": {"hosts": ["127.0.0.1:1"]},
                                          "queue": {"directory": str(tmp_path / "q")},
                                          "dns": {"nameservers": [f"127.0.0.1:{port}"], "timeout": 1}}))
        try:
            verdict, results = f.run(signed(message()))
            assert results["spf"].result.result == "temperror"
            assert [x.result for x in results["dkim"].result.signatures] == ["temperror"]
            assert results["dmarc"].result.result == "temperror"
            assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
        finally:
            f.close()
    finally:
        silent.close()


def test_check_config_lists_each_check_with_its_symbols_scores_and_the_thresholds(dns, tmp_path):
    from shared.checks.registry import describe
    s = settings(dns, tmp_path, actions={"scores": {"SPF_FAIL": 4.5}, "domains": {"strict.test": {"reject": 9}}})
    text = describe(s, tier_spec("filter"))
    lines = text.splitlines()
    order = [ln.split(". ", 1)[1].split(" (")[0] for ln in lines if "end_of_data" in ln and ". " in ln]
    assert order == ["antivirus", "urilists", "spf", "dkim", "arc", "dmarc", "auth_results", "spamd", "rspamd",
                     "actions", "greylist", "dkim_sign", "arc_seal"]
    assert any("symbols: SPF_PASS -0.2, SPF_FAIL 4.5, SPF_SOFTFAIL 1" in ln for ln in lines), text
    assert any("symbols: DKIM_VALID -0.5, DKIM_INVALID 1" in ln for ln in lines)
    assert any("thresholds: reject 15, add_header 6; scores: SPF_FAIL 4.5" in ln for ln in lines)
    assert any("recipients @strict.test: reject 9, add_header 6" in ln for ln in lines)
    assert any("dkim_sign (off)" in ln for ln in lines)


def test_recipients_of_another_score_profile_wait_for_their_own_transaction(dns, tmp_path, real):
    f = Filter(real, settings(dns, tmp_path, actions={"domains": {"strict.test": {"reject": 4}}}))
    try:
        actions = next(c for c in build_policies(f.ctx.settings, tier_spec("filter"), f.ctx)["default"].chain.checks
                       if c.name == "actions" and c.phase == "rcpt").fn
        rcpt = Request(phase="rcpt", client_address="192.0.2.1", sender="a@b.test")
        assert actions(rcpt.at("rcpt", recipient="x@example.test")).action is Action.CONTINUE
        assert actions(rcpt.at("rcpt", recipient="y@example.test", recipients=("x@example.test",))).action \
            is Action.CONTINUE
        v = actions(rcpt.at("rcpt", recipient="z@strict.test", recipients=("x@example.test",)))
        assert v.action is Action.TEMPFAIL and (v.reply.code, v.reply.enhanced) == (452, "4.5.3")
        assert actions(rcpt.at("rcpt", recipient="z@strict.test", recipients=("w@strict.test",))).action \
            is Action.CONTINUE
    finally:
        f.close()


def test_dmarc_quarantine_policy_can_quarantine(real, dns, tmp_path):
    f = Filter(real, settings(dns, tmp_path, dmarc={"quarantine_policy": "quarantine"}))
    try:
        verdict, results = f.run(message(sender="a@quar.test"), sender="a@quar.test", client="192.0.2.1")
        assert verdict.action is Action.CONTINUE
        assert results["dmarc"].quarantine == "DMARC p=quarantine of quar.test"
    finally:
        f.close()


def test_dkim_keygen_command(tmp_path, capsys):
    from shared.cli import main
    assert main(["dkim", "keygen", "Example.ORG", "s1", "--directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "example.org.s1.key").exists()
    assert 's1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert f'keys = ["example.org s1 {tmp_path}/example.org.s1.key"]' in out
    assert main(["dkim", "keygen", "example.org", "s1", "--directory", str(tmp_path)]) == 1
    assert "exists: not overwritten" in capsys.readouterr().err
    assert main(["dkim", "keygen", "example.org", "bad selector", "--directory", str(tmp_path)]) == 2
    assert main(["dkim", "keygen", "example.org", "s2", "--bits", "512", "--directory", str(tmp_path)]) == 2


def test_a_large_signed_message_is_verified_in_the_pool(filt):
    """Past 64 KB dkimpy runs in the checks' threads: same results."""
    big = signed(message(body="A line of a long message, to be hashed in a thread.\r\n" * 4000))
    assert len(big) > 150_000
    _, results = filt.run(big)
    assert [s.result for s in results["dkim"].result.signatures] == ["pass"]
    _, results = filt.run(big.replace(b"hashed in a thread", b"hashed in a thrEad", 1))
    assert [s.result for s in results["dkim"].result.signatures] == ["fail"]
