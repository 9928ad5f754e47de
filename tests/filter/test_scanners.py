"""The spamd and rspamd checks against the real daemons (Debian's packages): GTUBE and ham, the
score folded into ours, the size cap, and each failure -- down, garbage, silent, one of two
servers down -- with its declared mode.  Also the parsers on their own."""
from __future__ import annotations


import pytest

from filter.scanclient import ScannerError
from filter.scanners import checkv2_head, parse_rspamd, parse_spamd
from shared.checks.core import Action, Request
from tests.filter.mailauth import message
from tests.filter.test_mailauth import Filter, added, dns, settings, symbols  # noqa: F401  (dns: the fixture)
from tests.rspamd import start_rspamd
from tests.spamd import GTUBE, start_spamd
from tests.support import GarbageServer, free_port, real, wait_until  # noqa: F401  (real: the fixture)

SCANNERS = ("spamd", "rspamd")


@pytest.fixture(scope="module")
def spamd_server(tmp_path_factory):
    server = start_spamd(tmp_path_factory.mktemp("spamd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rspamd_server(tmp_path_factory, dns):
    server = start_rspamd(tmp_path_factory.mktemp("rspamd"), dns.address[1])
    yield server
    server.stop()


@pytest.fixture
def daemon(request):
    """The running daemon of the scanner the test is parametrized with."""
    return request.getfixturevalue(f"{request.param}_server")


def gtube() -> bytes:
    return message(subject="Test spam mail (GTUBE)", body="This is the GTUBE, the\r\n" + GTUBE.decode() + "\r\n")


def run(real, dns, tmp_path, scanner: str, msg: bytes, **own):
    f = Filter(real, settings(dns, tmp_path, **{scanner: own}))
    try:
        return f.run(msg)
    finally:
        f.close()


def scored(results, name):
    return {n: s for n, s, _ in results["actions"].result.symbols}.get(name)


# -- against the real daemons -------------------------------------------------------------------

def test_spamd_gtube_is_over_our_reject_threshold(real, dns, tmp_path, spamd_server):
    verdict, results = run(real, dns, tmp_path, "spamd", gtube(), servers=[spamd_server.address], user="scanuser")
    r = results["spamd"].result
    wait_until(lambda: "identified spam" in spamd_server.log_tail(40) and " for scanuser:" in spamd_server.log_tail(40),
               10, "spamd's log of the scan for User scanuser")
    assert r.result == "scanned" and r.score >= 990 and r.required == 5.0     # GTUBE is 1000
    assert "GTUBE" in dict(r.rules)
    assert r.log.startswith(f"spamd={r.score:g}/5 (") and "GTUBE" in r.log
    assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
    assert verdict.check == "actions" and scored(results, "SPAMD") == pytest.approx(r.score)


def test_rspamd_gtube_counts_its_score_and_with_use_action_its_reject(real, dns, tmp_path, rspamd_server):
    verdict, results = run(real, dns, tmp_path, "rspamd", gtube(), servers=[rspamd_server.address])
    r = results["rspamd"].result
    assert r.result == "scanned" and r.action == "reject" and "GTUBE" in dict(r.rules)
    assert scored(results, "RSPAMD") == pytest.approx(r.score) and r.score >= 15
    assert r.log.startswith(f"rspamd={r.score:g}/{r.required:g} (") and "GTUBE" in r.log
    verdict, results = run(real, dns, tmp_path, "rspamd", gtube(), servers=[rspamd_server.address], use_action=True)
    assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
    assert verdict.check == "rspamd" and "actions" not in results


@pytest.mark.parametrize("daemon", SCANNERS, indirect=True)
def test_ham_scores_low_and_is_accepted_with_the_scanner_in_x_spam_status(real, dns, tmp_path, daemon, request):
    scanner = request.node.callspec.params["daemon"]
    verdict, results = run(real, dns, tmp_path, scanner, message(), servers=[daemon.address])
    r = results[scanner].result
    assert r.result == "scanned" and r.score < 3, r
    assert verdict.action is Action.CONTINUE and results["actions"].result.action == "no action"
    status = added(results, "X-Spam-Status")[0]
    assert status.startswith("No, ") and f"{scanner.upper()}(" in status


@pytest.mark.parametrize("daemon", SCANNERS, indirect=True)
def test_the_scanners_score_is_scaled_by_our_score_of_its_symbol(real, dns, tmp_path, daemon, request):
    scanner = request.node.callspec.params["daemon"]
    symbol = scanner.upper()
    _, results = run(real, dns, tmp_path, scanner, gtube(), servers=[daemon.address])
    full = scored(results, symbol)
    f = Filter(real, settings(dns, tmp_path, **{scanner: {"servers": [daemon.address]},
                                                "actions": {"scores": {symbol: 0.001}}}))
    try:
        verdict, results = f.run(gtube())
    finally:
        f.close()
    assert scored(results, symbol) == pytest.approx(round(full * 0.001, 2))
    assert verdict.action is Action.CONTINUE


@pytest.mark.parametrize("daemon", SCANNERS, indirect=True)
def test_a_message_over_max_size_is_not_sent(real, dns, tmp_path, daemon, request):
    scanner = request.node.callspec.params["daemon"]
    verdict, results = run(real, dns, tmp_path, scanner, gtube(), servers=[daemon.address], max_size=200)
    r = results[scanner].result
    assert r.result == "skipped" and "over 200" in r.detail and r.log.startswith(f"{scanner}=skipped (")
    assert f"{scanner.upper()}_SKIPPED" in symbols(results) and scanner.upper() not in symbols(results)
    assert verdict.action is Action.CONTINUE


@pytest.mark.parametrize("daemon", SCANNERS, indirect=True)
def test_two_servers_the_first_down_the_second_answers(real, dns, tmp_path, daemon, request):
    scanner = request.node.callspec.params["daemon"]
    dead = f"127.0.0.1:{free_port()}"
    verdict, results = run(real, dns, tmp_path, scanner, gtube(), servers=[dead, daemon.address], timeout=5)
    assert results[scanner].result.result == "scanned" and "GTUBE" in results[scanner].result.log


# -- failures, with no daemon needed -----------------------------------------------------------

@pytest.mark.parametrize("scanner", SCANNERS)
def test_down_fails_open_by_default_and_tempfails_when_configured(real, dns, tmp_path, scanner):
    dead = f"127.0.0.1:{free_port()}"
    verdict, results = run(real, dns, tmp_path, scanner, gtube(), servers=[dead], timeout=2)
    assert verdict.action is Action.CONTINUE and f"{scanner.upper()}_FAIL" in symbols(results)
    r = results[scanner].result
    assert r.result == "unavailable" and dead in r.detail and r.log.startswith(f"{scanner}=unavailable (")
    verdict, results = run(real, dns, tmp_path, scanner, gtube(), servers=[dead], timeout=2, on_failure="tempfail")
    assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    assert verdict.check == scanner and "actions" not in results


GARBAGE = {"spamd": [b"HELLO THERE\r\n", b"SPAMD/1.1 76 EX_PROTOCOL Bad header line\r\n\r\n",
                     b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\n\r\nOK"],
           "rspamd": [b"HELLO THERE\r\n", b"HTTP/1.1 500 Internal error\r\nContent-Length: 2\r\n\r\n{}",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",
                      b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"score": 1.0}']}


@pytest.mark.parametrize("scanner,answer", [(s, a) for s, answers in GARBAGE.items() for a in answers])
@pytest.mark.parametrize("on_failure", ["accept", "tempfail"])
def test_garbage_is_a_failure_of_that_server(real, dns, tmp_path, scanner, answer, on_failure):
    server = GarbageServer(answer)
    try:
        verdict, results = run(real, dns, tmp_path, scanner, message(), servers=[server.address], timeout=3,
                               on_failure=on_failure)
    finally:
        server.close()
    assert results[scanner].result.result == "unavailable"
    if on_failure == "accept":
        assert verdict.action is Action.CONTINUE and f"{scanner.upper()}_FAIL" in symbols(results)
    else:
        assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451


@pytest.mark.parametrize("scanner", SCANNERS)
def test_a_server_that_never_answers_times_out(real, dns, tmp_path, scanner):
    server = GarbageServer(None)
    try:
        verdict, results = run(real, dns, tmp_path, scanner, message(), servers=[server.address], timeout=1,
                               on_failure="tempfail")
    finally:
        server.close()
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    assert "no answer in 1s" in results[scanner].result.detail


@pytest.mark.parametrize("daemon", SCANNERS, indirect=True)
def test_a_silent_server_then_the_real_one(real, dns, tmp_path, daemon, request):
    scanner = request.node.callspec.params["daemon"]
    silent = GarbageServer(None)
    try:
        verdict, results = run(real, dns, tmp_path, scanner, gtube(), servers=[silent.address, daemon.address],
                               timeout=1)
    finally:
        silent.close()
    assert results[scanner].result.result == "scanned"


# -- the parsers --------------------------------------------------------------------------------

def test_parse_spamd():
    r = parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 17\r\nSpam: True ; 15.0 / 5.0\r\n\r\nBAYES_00,HTML_MSG")
    assert (r.score, r.required, r.rules_text) == (15.0, 5.0, "BAYES_00,HTML_MSG")
    assert r.log == "spamd=15/5 (BAYES_00,HTML_MSG)"
    r = parse_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; -1.5 / 5.0\r\n\r\n")
    assert (r.score, r.rules) == (-1.5, ())
    for bad in (b"", b"SPAMD/1.1 0 EX_OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n",
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1..0 / 5\r\n\r\n", b"SPAMD/1.1 74 EX_NOHOST\r\n\r\n"):
        with pytest.raises(ScannerError):
            parse_spamd(bad)


def test_parse_rspamd():
    body = (b'{"score": 7.25, "required_score": 15, "action": "add header", "symbols": '
            b'{"R_SPF_ALLOW": {"score": -0.2}, "BAD": {"score": 7.45}}}')
    r = parse_rspamd(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert (r.score, r.required, r.action, r.rules_text) == (7.25, 15.0, "add header", "BAD(7.45),R_SPF_ALLOW(-0.2)")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    assert parse_rspamd(chunked) == r
    for bad in (b"", b"HTTP/1.1 200 OK\r\n\r\n[]", b"HTTP/1.1 200 OK\r\n\r\n{\"score\": \"x\"}",
                b"HTTP/1.1 403 Forbidden\r\n\r\n", b'HTTP/1.1 200 OK\r\n\r\n{"score": NaN}'):
        with pytest.raises(ScannerError):
            parse_rspamd(bad)


def test_checkv2_headers_carry_the_envelope_and_nothing_unsafe():
    req = Request(phase="end_of_data", client_address="192.0.2.7", helo="mx.example\r\nX: y", sender="",
                  recipients=("a@example.test", "b@example.test"), queue_id="Q1", login="alice",
                  client_name="mx.example")
    head = checkv2_head(req, 123, "127.0.0.1:11333", "secret").decode()
    assert head.startswith("POST /checkv2 HTTP/1.1\r\n") and head.endswith("\r\n\r\n")
    lines = head.split("\r\n")
    for line in ("Content-Length: 123", "IP: 192.0.2.7", "Helo: mx.exampleX: y", "From: <>",
                 "Rcpt: a@example.test", "Rcpt: b@example.test", "Queue-Id: Q1", "User: alice",
                 "Hostname: mx.example", "Password: secret"):
        assert line in lines
    assert "Password" not in checkv2_head(req, 1, "h").decode()


def test_rspamd_is_given_the_original_client_and_the_envelope(real, dns, tmp_path, rspamd_server):
    f = Filter(real, settings(dns, tmp_path, rspamd={"servers": [rspamd_server.address]}))
    try:
        verdict, results = f.run(message(), sender="", client="192.0.2.77", helo="client.example", login="alice",
                                 recipients=("bob@example.test", "carol@example.test"))
    finally:
        f.close()
    assert results["rspamd"].result.result == "scanned"

    def logged():
        lines = [ln for ln in rspamd_server.daemon.log.read_text(errors="replace").splitlines()
                 if "ip: 192.0.2.77" in ln]
        return lines[-1] if lines else None
    line = wait_until(logged, 10, "rspamd's log line of the scan")
    assert "qid: <Q1>" in line and "user: alice" in line, line
    assert "rcpts: <bob@example.test,carol@example.test>" in line and "from: <" not in line, line   # <>: none
