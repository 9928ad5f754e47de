"""Tests of shared.auth.dovecot: the SASL backend that asks Dovecot's auth service.

Two parts:

- the wire format (tab-escaping, the AUTH line, addresses), without sockets;
- integration tests against a real Dovecot (tests.dovecot) over its UNIX
  socket and its TCP listener, on a private real reactor
  (tests.support.RealReactor).  Dovecot stopped, Dovecot's auth process
  frozen (SIGSTOP) or killed are the real failures the backend must turn into
  temporary ones.

Dovecot's penalty makes every request from an address that failed recently
wait seconds, so each client here gets an address of its own (``client()``).
What the backend says on the wire is checked where Dovecot shows it: its
debug log records every client connection and every AUTH line, and a
"BUG:" line whenever a client breaks the protocol.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import os
import signal
import socket
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        UNIXClientEndpoint)
from twisted.logger import capturedLogs

from shared.auth.dovecot import DovecotBackend, auth_request, escape, parse_address, unescape
from shared.auth.sasl import Challenge, ClientContext, Failure, Success
from tests.dovecot import TEMPFAIL_USER, USERS, dovecot, require_dovecot, start_dovecot  # noqa: F401
from tests.support import free_port, real  # noqa: F401  (real: the fixture)

CRAM, CRAM_PASSWORD = "cram", USERS["cram"][1]
HASHED, HASHED_PASSWORD = "hashed", USERS["hashed"][1]

_addresses = (ipaddress.ip_address("10.20.0.1") + n for n in itertools.count())


def client(**kwargs) -> ClientContext:
    """A client from an address no other test used (Dovecot's penalty is per address)."""
    defaults = dict(remote_ip=str(next(_addresses)), remote_port=40000, local_ip="127.0.0.1",
                    local_port=587, secured=True)
    return ClientContext(**{**defaults, **kwargs})


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return f"{authzid}\0{user}\0{password}".encode()


def cram_md5(user: str, password: str, challenge: bytes) -> bytes:
    return user.encode() + b" " + hmac.new(password.encode(), challenge, hashlib.md5).hexdigest().encode()


def auth_events(events) -> list[str]:
    return [e["log_format"] for e in events if e.get("log_namespace") == "smarthost.auth"]


# -- the wire format ------------------------------------------------------------------

def test_escape_leaves_no_tab_newline_or_carriage_return():
    assert escape("a\tb\nc\rd\x01e\x00f") == "a\x01tb\x01nc\x01rd\x011e\x010f"
    assert escape("plain user@example.org") == "plain user@example.org"


@pytest.mark.parametrize("value", ["", "x", "\t", "\n", "\x01", "\x01t", "a\x01\tb\n\r\x00", "ü\t✓"])
def test_unescape_undoes_escape(value):
    assert unescape(escape(value)) == value


def test_unescape_of_an_unknown_escape_keeps_the_byte_after_it():
    assert unescape("a\x01xb") == "axb"
    assert unescape("trailing\x01") == "trailing"


def test_auth_request_keeps_client_values_inside_their_fields():
    hostile = ClientContext(remote_ip="192.0.2.7", remote_port=2525, local_ip="[IPv6:2001:db8::1]",
                            local_port=25, secured=True, service="smtp",
                            session_id="s1\tresp=AGFkbWluAHg=\nAUTH\t9\tPLAIN")
    line = auth_request(5, "PLAIN", hostile, b"\0user\0pass")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    fields = line[:-1].decode().split("\t")
    assert fields == ["AUTH", "5", "PLAIN", "service=smtp", "nologin", "lip=2001:db8::1",
                      "rip=192.0.2.7", "lport=25", "rport=2525", "secured",
                      "session=s1\x01tresp=AGFkbWluAHg=\x01nAUTH\x01t9\x01tPLAIN",
                      "resp=AHVzZXIAcGFzcw=="]
    assert unescape(fields[10]) == "session=" + hostile.session_id


def test_auth_request_initial_response_none_empty_and_garbage_addresses():
    bare = ClientContext(remote_ip="unix-socket", remote_port=None, secured=False)
    assert auth_request(1, "LOGIN", bare, None) == b"AUTH\t1\tLOGIN\tservice=smtp\tnologin\n"
    assert auth_request(1, "PLAIN", bare, b"") == b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tresp=\n"


@pytest.mark.parametrize("address, kind", [
    ("/var/spool/postfix/private/auth", UNIXClientEndpoint),
    ("127.0.0.1:12345", TCP4ClientEndpoint),
    ("[::1]:12345", TCP6ClientEndpoint),
    ("dovecot.example.org:12345", HostnameEndpoint),
])
def test_parse_address(address, kind):
    assert isinstance(parse_address(MemoryReactor(), address, 5.0), kind)


@pytest.mark.parametrize("address", ["private/auth", "127.0.0.1", "::1:12345", "[nope]:1",
                                     "host:0", "host:65536", ":25", "bad_host!:25", "host:2x"])
def test_parse_address_refuses(address):
    with pytest.raises(ValueError, match="Dovecot auth address"):
        parse_address(MemoryReactor(), address, 5.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"mechanisms": ("GSSAPI",)}, "smarthost offers only"),
    ({"mechanisms": ()}, "smarthost offers only"),
    ({"timeout": 0}, "timeout must be positive"),
])
def test_backend_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DovecotBackend(object(), "/nonexistent/auth", **kwargs)


# -- a real Dovecot ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_dovecot()
    dovecot_server = start_dovecot(tmp_path_factory.mktemp("dovecot"))
    yield dovecot_server
    dovecot_server.cleanup()


@pytest.fixture
def backends(real):
    """Factory: ``backends(address, **kw) -> DovecotBackend`` on the test's reactor, closed after it."""
    made: list[DovecotBackend] = []

    def make(address: str, **kwargs) -> DovecotBackend:
        kwargs.setdefault("timeout", 5.0)
        backend = DovecotBackend(real.reactor, address, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        closing = backend.close()
        if closing is not None:
            real.wait(closing)


def address_of(server, transport: str) -> str:
    return server.socket if transport == "unix" else server.tcp_address


def waiting_login(real, backend):
    """A LOGIN exchange that Dovecot has asked for the user name (its request waits there)."""
    exchange = backend.start("LOGIN", client())
    assert run(real, exchange, None) == [Challenge(b"Username:")]
    return exchange


def run(real, exchange, *responses):
    """Step `exchange` with `responses` in turn while it challenges; every step it answered."""
    steps = []
    for response in responses:
        steps.append(real.wait(exchange.step(response)))
        if not isinstance(steps[-1], Challenge):
            break
    return steps


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_plain_right_and_wrong_password(server, real, backends, transport):
    backend = backends(address_of(server, transport))
    assert run(real, backend.start("PLAIN", client()), plain(HASHED, HASHED_PASSWORD)) == [Success(HASHED)]
    assert run(real, backend.start("PLAIN", client()), plain(HASHED, "wrong")) == [
        Failure("authentication failed", temporary=False, user=HASHED)]
    # the login is the name Dovecot knows the user by (auth_username_format lower-cases it)
    assert run(real, backend.start("plain", client()), plain("CRAM", CRAM_PASSWORD)) == [Success(CRAM)]


def test_tcp_over_ipv6(dovecot, real, backends):
    server = dovecot(host="::1")
    assert server.tcp_address.startswith("[::1]:")
    backend = backends(server.tcp_address)
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]


def test_plain_without_initial_response_answers_dovecots_empty_challenge(server, real, backends):
    backend = backends(server.socket)
    assert run(real, backend.start("PLAIN", client()), None, plain(CRAM, CRAM_PASSWORD)) == [
        Challenge(b""), Success(CRAM)]


def test_empty_initial_response_is_sent_as_an_empty_resp(server, real, backends):
    backend = backends(server.socket)
    steps = run(real, backend.start("PLAIN", client(session_id="empty-initial-response")), b"")
    assert steps == [Failure("authentication failed", temporary=False)]
    line, = [l for l in server.log_text().splitlines() if "session=empty-initial-response" in l]
    assert line.endswith("resp=<hidden>")             # "resp=" was sent (Dovecot hides its value)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_login_asks_for_the_user_name_then_the_password(server, real, backends, transport):
    backend = backends(address_of(server, transport))
    assert run(real, backend.start("LOGIN", client()), None, CRAM.encode(), CRAM_PASSWORD.encode()) == [
        Challenge(b"Username:"), Challenge(b"Password:"), Success(CRAM)]
    assert run(real, backend.start("LOGIN", client()), HASHED.encode(), b"wrong") == [
        Challenge(b"Password:"), Failure("authentication failed", temporary=False, user=HASHED)]


def test_cram_md5_answers_dovecots_challenge_with_the_hmac(server, real, backends):
    backend = backends(server.socket)
    exchange = backend.start("CRAM-MD5", client())
    challenge = real.wait(exchange.step(None))
    assert isinstance(challenge, Challenge) and challenge.data.startswith(b"<") and b"@" in challenge.data
    assert real.wait(exchange.step(cram_md5(CRAM, CRAM_PASSWORD, challenge.data))) == Success(CRAM)

    exchange = backend.start("CRAM-MD5", client())
    challenge = real.wait(exchange.step(None))
    assert real.wait(exchange.step(cram_md5(CRAM, "wrong", challenge.data))) == Failure(
        "authentication failed", temporary=False, user=CRAM)


def test_cram_md5_fails_for_a_user_whose_stored_hash_cannot_do_it(server, real, backends):
    backend = backends(server.socket)
    exchange = backend.start("CRAM-MD5", client())
    challenge = real.wait(exchange.step(None))
    assert real.wait(exchange.step(cram_md5(HASHED, HASHED_PASSWORD, challenge.data))) == Failure(
        "authentication failed", temporary=False, user=HASHED)
    # the same password is right for the plaintext mechanisms
    assert run(real, backend.start("PLAIN", client()), plain(HASHED, HASHED_PASSWORD)) == [Success(HASHED)]


def test_dovecots_temporary_failure_is_temporary(server, real, backends):
    backend = backends(server.socket)
    step, = run(real, backend.start("PLAIN", client()), plain(TEMPFAIL_USER, "anything"))
    assert step == Failure("authentication failed", temporary=True, user=TEMPFAIL_USER)


@pytest.mark.parametrize("name", ["cram\tuser=hashed", "cram\nOK\t1\tuser=cram", "cram\x01tx", "cram\r\n"])
def test_user_names_with_tab_or_newline_fail_cleanly(server, real, backends, name):
    backend = backends(server.socket)
    assert run(real, backend.start("PLAIN", client()), plain(name, CRAM_PASSWORD)) == [
        Failure("authentication failed", temporary=False, user=name)]
    steps = run(real, backend.start("LOGIN", client()), None, name.encode(), CRAM_PASSWORD.encode())
    assert steps[0] == Challenge(b"Username:")          # Dovecot refuses the name before the password
    assert steps[-1] == Failure("authentication failed", temporary=False, user=name)
    hostile_session = client(session_id=f"id\t{name}\nOK\t7")
    assert run(real, backend.start("PLAIN", hostile_session), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert server.protocol_errors() == []


def test_many_concurrent_exchanges_share_one_connection(server, real, backends):
    before = server.client_connections()
    backend = backends(server.socket)

    @defer.inlineCallbacks
    def login(n: int):
        exchange = backend.start("LOGIN", client())
        assert (yield exchange.step(None)) == Challenge(b"Username:")
        assert (yield exchange.step(CRAM.encode())) == Challenge(b"Password:")
        return (yield exchange.step(CRAM_PASSWORD.encode()))

    @defer.inlineCallbacks
    def cram(n: int):
        exchange = backend.start("CRAM-MD5", client())
        challenge = yield exchange.step(None)
        return (yield exchange.step(cram_md5(CRAM, CRAM_PASSWORD, challenge.data)))

    def plain_login(n: int):
        user, password = (CRAM, CRAM_PASSWORD) if n % 4 else (HASHED, HASHED_PASSWORD)
        return backend.start("PLAIN", client()).step(plain(user, password))

    flows = [(plain_login, login, cram)[n % 3](n) for n in range(300)]
    results = real.wait(defer.gatherResults(flows), limit=60)
    expected = [Success(HASHED) if n % 3 == 0 and n % 4 == 0 else Success(CRAM) for n in range(300)]
    assert results == expected
    assert server.client_connections() - before == 1
    assert server.protocol_errors() == []


def test_mechanisms_are_what_dovecot_offers_and_the_configuration_allows(dovecot, real, backends):
    server = dovecot(mechanisms="plain login")
    before = server.client_connections()
    configured = backends(server.socket, mechanisms=("cram-md5", "PLAIN"))
    everything = backends(server.socket)
    # before the first handshake: the configured list (AUTH then fails temporarily)
    assert configured.mechanisms() == ("CRAM-MD5", "PLAIN")
    assert everything.mechanisms() == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert run(real, configured.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert run(real, everything.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert configured.mechanisms() == ("PLAIN",)
    assert everything.mechanisms() == ("PLAIN", "LOGIN")
    assert everything.plaintext("PLAIN") and everything.plaintext("login")

    # a mechanism Dovecot does not offer is answered here: asking Dovecot would cost the connection
    step, = run(real, configured.start("CRAM-MD5", client()), None)
    assert step.temporary and "does not offer CRAM-MD5" in step.reason
    step, = run(real, configured.start("LOGIN", client()), None)                  # not configured
    assert step.temporary and "not offered" in step.reason
    assert run(real, configured.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert server.client_connections() - before == 2 and server.protocol_errors() == []


def test_dovecots_mechanism_flags(server, real, backends):
    backend = backends(server.socket)
    run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD))
    assert backend.mechanisms() == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert [backend.plaintext(m) for m in backend.mechanisms()] == [True, True, False]


def test_dovecot_stopped_then_started_again(dovecot, real, backends):
    server = dovecot()
    backend = backends(server.socket, timeout=3.0)
    with capturedLogs() as events:
        assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
        waiting = waiting_login(real, backend)
        server.stop()

        started = time.monotonic()
        step, = run(real, waiting, b"cram")                 # its connection is gone
        assert step.temporary and "lost" in step.reason
        for _ in range(3):
            step, = run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD))
            assert step.temporary and step.user == CRAM
        assert time.monotonic() - started < 1.0             # none waited for the 3 s timeout
        real.wait(deferLater(real.reactor, 1.5))            # a background retry fails meanwhile
        assert backend.mechanisms() == ("PLAIN", "LOGIN", "CRAM-MD5")     # the last known list
        assert auth_events(events) == [
            "Dovecot auth service {address} is unreachable: {reason}; AUTH fails temporarily until it is back"]

        server.start()
        assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
        assert run(real, backend.start("PLAIN", client()), plain(HASHED, HASHED_PASSWORD)) == [Success(HASHED)]
    assert auth_events(events)[1:] == ["Dovecot auth service {address} is reachable again"]


def spin_until(real, predicate, limit: float):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        real.reactor.iterate(0.01)


def test_the_backend_reconnects_by_itself_when_dovecot_is_back(dovecot, real, backends):
    server = dovecot()
    backend = backends(server.socket)
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    with capturedLogs() as events:
        server.stop()
        spin_until(real, lambda: auth_events(events), limit=3.0)          # a retry 1 s after the loss
        before = server.client_connections()
        server.start()
        spin_until(real, lambda: len(auth_events(events)) == 2, limit=5.0)
    assert auth_events(events)[1] == "Dovecot auth service {address} is reachable again"
    # the fixture's two probes, and the backend's one connection that no exchange asked for
    # (Dovecot logs a connection a moment after accepting it: wait for its line)
    spin_until(real, lambda: server.client_connections() - before >= 3, limit=3.0)
    settle = time.monotonic() + 0.3                   # and no fourth one follows
    spin_until(real, lambda: time.monotonic() >= settle, limit=1.0)
    assert server.client_connections() - before == 2 + 1


def test_reconnection_backs_off_while_connections_are_dropped(real, backends):
    """A listener that hangs up at once (not a Dovecot): attempts at 0 s, 1 s, 3 s, 7 s ..."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        backends("127.0.0.1:%d" % listener.getsockname()[1], timeout=1.0)
        accepted = 0
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            real.reactor.iterate(0.01)
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                continue
            connection.close()
            accepted += 1
    assert accepted == 3


def test_an_auth_process_that_dies_fails_the_exchange_under_way_at_once(dovecot, real, backends):
    server = dovecot()
    backend = backends(server.socket, timeout=5.0)
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    auth = server.pause()
    in_flight = backend.start("PLAIN", client()).step(plain(CRAM, CRAM_PASSWORD))
    real.wait(deferLater(real.reactor, 0.2))
    started = time.monotonic()
    os.kill(auth, signal.SIGKILL)                 # Dovecot's master starts a new auth process
    step = real.wait(in_flight)
    assert step.temporary and "lost" in step.reason and time.monotonic() - started < 2.0
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]


def test_an_unanswered_exchange_times_out_and_its_late_answer_is_ignored(dovecot, real, backends):
    server = dovecot()
    before = server.client_connections()
    backend = backends(server.socket, timeout=1.0)
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    auth = server.pause()
    started = time.monotonic()
    step, = run(real, backend.start("PLAIN", client()), plain(HASHED, HASHED_PASSWORD))
    assert step == Failure("Dovecot did not answer within 1 s", temporary=True, user=HASHED)
    assert 0.9 <= time.monotonic() - started < 2.5
    server.resume(auth)                            # Dovecot now answers OK for "hashed": nobody listens
    assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert server.client_connections() - before == 1 and server.protocol_errors() == []


def test_a_handshake_that_never_completes_is_a_temporary_failure(dovecot, real, backends):
    server = dovecot()
    auth = server.pause()                          # connections are accepted, nothing is said
    backend = backends(server.socket, timeout=1.0)
    with capturedLogs() as events:
        started = time.monotonic()
        step, = run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD))
        assert step.temporary and "no handshake within 1 s" in step.reason
        assert time.monotonic() - started < 2.5
        server.resume(auth)
        assert run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD)) == [Success(CRAM)]
    assert [e.get("reason") for e in events if e.get("log_namespace") == "smarthost.auth"] == [
        "no handshake within 1 s", None]                    # unreachable, then reachable again


def test_dovecot_not_running_at_all(real, backends):
    for address in ("/nonexistent/dovecot/auth", f"127.0.0.1:{free_port()}"):
        backend = backends(address, timeout=2.0)
        with capturedLogs() as events:
            started = time.monotonic()
            for _ in range(3):
                step, = run(real, backend.start("LOGIN", client()), None)
                assert step.temporary and "unreachable" in step.reason
            assert time.monotonic() - started < 2.0
        assert len(auth_events(events)) == 1
        assert backend.mechanisms() == ("PLAIN", "LOGIN", "CRAM-MD5")


def test_cancel_frees_the_exchange_and_a_late_answer_is_ignored(dovecot, real, backends):
    server = dovecot()
    before = server.client_connections()
    backend = backends(server.socket)
    waiting = waiting_login(real, backend)
    waiting.cancel()
    step, = run(real, waiting, b"cram")
    assert step.temporary and "cancelled" in step.reason

    auth = server.pause()
    exchange = backend.start("PLAIN", client())
    in_flight = exchange.step(plain(HASHED, HASHED_PASSWORD))
    exchange.cancel()
    step = real.wait(in_flight, limit=0.5)            # at once, not after the timeout
    assert step.temporary and "cancelled" in step.reason
    server.resume(auth)
    for _ in range(3):
        assert run(real, backend.start("LOGIN", client()), CRAM.encode(), CRAM_PASSWORD.encode()) == [
            Challenge(b"Password:"), Success(CRAM)]
    assert server.client_connections() - before == 1 and server.protocol_errors() == []


def test_close_fails_what_is_under_way_and_does_not_reconnect(dovecot, real, backends):
    server = dovecot()
    before = server.client_connections()
    backend = backends(server.socket)
    waiting = waiting_login(real, backend)
    real.wait(backend.close())
    step, = run(real, waiting, b"cram")
    assert step.temporary
    step, = run(real, backend.start("PLAIN", client()), plain(CRAM, CRAM_PASSWORD))
    assert step.temporary and "closed" in step.reason
    real.wait(deferLater(real.reactor, 1.5))          # a lost connection is retried after 1 s: not this one
    assert server.client_connections() - before == 1

