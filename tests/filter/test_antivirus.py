"""The antivirus check against a real clamd with the tests' signatures: EICAR and our own test
signature in several MIME shapes, clamd down or slow, several servers, the size cap."""
from __future__ import annotations

import io
import socket
import zipfile

import pytest

from shared.checks.core import Action
from tests.clamd import EICAR, TEST_VIRUS, start_clamd
from tests.filter.mailauth import attachment, message
from tests.filter.test_mailauth import Filter, settings, symbols
from tests.dnsserver import start_dns_server
from tests.filter.mailauth import zones
from tests.support import free_port, real  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = start_dns_server(tmp_path_factory.mktemp("dns"), zones())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clamav(tmp_path_factory):
    server = start_clamd(tmp_path_factory.mktemp("clamd"))
    yield server
    server.stop()


def zipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("inside/eicar.com", data)
    return out.getvalue()


@pytest.fixture
def av(real, dns, clamav, tmp_path):
    f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [clamav.address]}))
    yield f
    f.close()


def test_a_clean_message_passes(av):
    verdict, results = av.run(message())
    assert verdict.action is Action.CONTINUE
    assert results["antivirus"].result.log == "antivirus=clean"


@pytest.mark.parametrize("shape", ["base64", "nested", "zip", "own"])
def test_viruses_in_every_shape_are_refused_naming_the_signature(av, shape):
    msg = {"base64": lambda: attachment(EICAR, "eicar.com"),
           "nested": lambda: attachment(EICAR, "eicar.com", nested=True),
           "zip": lambda: attachment(zipped(EICAR), "eicar.zip"),
           "own": lambda: attachment(b"text before " + TEST_VIRUS + b" and after", "note.txt")}[shape]()
    verdict, results = av.run(msg)
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced) == (554, "5.7.1")
    name = "Smarthost-Test-Signature" if shape == "own" else "Eicar-Test-Signature"
    assert name in verdict.reply.text
    assert "spf" not in results                  # a virus ends the chain
    assert "AV_VIRUS" in symbols(results)


def _dead_port() -> int:
    return free_port()


def test_clamd_down_is_a_tempfail_by_default_and_fail_open_when_configured(real, dns, tmp_path):
    dead = f"127.0.0.1:{_dead_port()}"
    f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [dead], "timeout": 2}))
    try:
        verdict, results = f.run(attachment(EICAR))
        assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
        assert results["antivirus"].result.result == "unavailable"
    finally:
        f.close()
    f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [dead], "timeout": 2, "on_failure": "accept"}))
    try:
        verdict, results = f.run(message())
        assert verdict.action is Action.CONTINUE and "AV_FAIL" in symbols(results)
    finally:
        f.close()


def test_a_server_that_never_answers_times_out_and_the_next_is_tried(real, dns, clamav, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)                       # accepts (in the backlog), never answers
    try:
        port = silent.getsockname()[1]
        f = Filter(real, settings(dns, tmp_path, antivirus={
            "servers": [f"127.0.0.1:{port}", f"127.0.0.1:{_dead_port()}", clamav.address], "timeout": 1}))
        try:
            verdict, _ = f.run(attachment(EICAR))
            assert verdict.action is Action.REJECT and "Eicar" in verdict.reply.text
        finally:
            f.close()
    finally:
        silent.close()


def test_messages_over_the_size_cap_are_not_scanned(real, dns, clamav, tmp_path):
    for oversize, action, code in (("accept", Action.CONTINUE, None), ("tempfail", Action.TEMPFAIL, 451),
                                   ("reject", Action.REJECT, 552)):
        f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [clamav.address], "max_size": 200,
                                                            "oversize": oversize}))
        try:
            verdict, results = f.run(attachment(EICAR))
            assert verdict.action is action and (verdict.reply.code if verdict.reply else None) == code
            assert results["antivirus"].result.result == "skipped" and "AV_SKIPPED" in symbols(results)
        finally:
            f.close()


def test_clamd_stopped_mid_load_gives_451s_never_a_pass(real, dns, tmp_path):
    server = start_clamd(tmp_path)
    f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [server.address], "timeout": 2}))
    try:
        assert f.run(attachment(EICAR))[0].action is Action.REJECT
        server.stop()
        for _ in range(3):
            verdict, _ = f.run(attachment(EICAR))
            assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    finally:
        f.close()
        server.stop()


def test_a_large_message_is_streamed_in_chunks_and_scanned_whole(av):
    """5 MB with the virus at the end: every chunk reached clamd (a lost or reordered one would
    hide the signature or break the stream)."""
    filler = b"".join(b"line %07d of a long report, nothing to see\r\n" % i for i in range(110_000))
    msg = attachment(filler + TEST_VIRUS, "report.txt")
    assert len(msg) > 5 * 1024 * 1024
    verdict, results = av.run(msg)
    assert verdict.action is Action.REJECT and "Smarthost-Test-Signature" in verdict.reply.text, results
    clean, results = av.run(attachment(filler, "report.txt"))
    assert clean.action is Action.CONTINUE and results["antivirus"].result.result == "clean"


def test_the_checks_of_one_message_share_one_read_of_it():
    from twisted.internet import defer
    from shared.message import ReadOnce
    calls, pending = [], defer.Deferred()

    def reader():
        calls.append(1)
        return pending
    read = ReadOnce(reader)
    got = []
    read().addCallback(got.append)
    read().addCallback(got.append)
    assert calls == [1] and got == []
    body = b"x" * 100
    pending.callback(body)
    read().addCallback(got.append)
    assert len(calls) == 1 and len(got) == 3 and all(g is body for g in got)
    failing = ReadOnce(lambda: defer.fail(OSError("gone")))
    errors = []
    failing().addErrback(errors.append)
    assert errors and errors[0].check(OSError)


@pytest.mark.parametrize("answer", [b"HELLO THERE\r\n", b"stream: something odd\0", b"x" * 5000])
def test_garbage_from_clamd_is_a_failure_never_a_pass(real, dns, tmp_path, answer):
    """Something that is not clamd on its port: an answer cut short, one that is neither OK
    nor FOUND, one far too long; tempfail by default, fail open when configured."""
    from tests.support import GarbageServer
    server = GarbageServer(answer)
    try:
        for on_failure, action in (("tempfail", Action.TEMPFAIL), ("accept", Action.CONTINUE)):
            f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [server.address], "timeout": 3,
                                                                "on_failure": on_failure}))
            try:
                verdict, results = f.run(attachment(EICAR, "eicar.com"))
            finally:
                f.close()
            assert verdict.action is action, (answer, on_failure, verdict)
            assert results["antivirus"].result.result == "unavailable"
            if on_failure == "accept":
                assert "AV_FAIL" in symbols(results)
            else:
                assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    finally:
        server.close()


@pytest.mark.parametrize("shape", ["base64", "nested", "zip", "own"])
def test_with_scan_parts_each_decoded_part_goes_to_clamd(real, dns, clamav, tmp_path, shape):
    msg = {"base64": lambda: attachment(EICAR, "eicar.com"),
           "nested": lambda: attachment(EICAR, "eicar.com", nested=True),
           "zip": lambda: attachment(zipped(EICAR), "eicar.zip"),
           "own": lambda: attachment(b"text before " + TEST_VIRUS + b" and after", "note.txt")}[shape]()
    from filter.antivirus import decoded_parts
    assert EICAR in decoded_parts(msg) or shape in ("zip", "own")
    f = Filter(real, settings(dns, tmp_path, antivirus={"servers": [clamav.address], "scan": "parts"}))
    try:
        verdict, results = f.run(msg)
        clean, _ = f.run(attachment(b"just a report", "report.txt"))
    finally:
        f.close()
    assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.enhanced) == (554, "5.7.1")
    assert ("Smarthost-Test-Signature" if shape == "own" else "Eicar-Test-Signature") in verdict.reply.text
    assert clean.action is Action.CONTINUE
