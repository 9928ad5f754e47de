"""AUTH in the sans-I/O server core (RFC 4954): offer, sequence, TLS-only, framing of
the exchange, and MAIL's requirements on a submission port (RFC 6409, RFC 8314)."""
from __future__ import annotations

import base64

import pytest

from shared.smtp import events as ev
from shared.smtp.events import NEED_DATA, PAUSED, LocalProtocolError
from shared.smtp.reply import Reply
from shared.smtp.server import AUTH_LINE, ServerConfig, ServerConnection, State, challenge

OK = Reply(235, "2.7.0", "Authentication successful")
WRONG = Reply(535, "5.7.8", "Error: authentication failed")
MECHS = ("PLAIN", "LOGIN", "CRAM-MD5")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Client:
    """Plays the adapter and a backend: PLAIN "u\\0u\\0pw" succeeds, LOGIN asks twice."""

    def __init__(self, *, tls=True, mechanisms=MECHS, tls_only=True, **kw) -> None:
        self.conn = ServerConnection(ServerConfig("mx.test", hard_error_limit=kw.pop("errors", 20)),
                                     tls_active=tls, auth_mechanisms=mechanisms, auth_tls_only=tls_only, **kw)
        self.conn.send_greeting()
        self.conn.data_to_send()
        self.events: list = []
        self.login_steps: list[bytes] = []

    def answer(self, e):
        if isinstance(e, ev.AuthStart):
            if e.mechanism == "PLAIN":
                return OK if e.initial == b"\0u\0pw" else (challenge(b"") if e.initial is None else WRONG)
            return challenge(b"Username:")
        if isinstance(e, ev.AuthResponse):
            self.login_steps.append(e.data)
            if len(self.login_steps) == 1 and not e.data.startswith(b"\0"):
                return challenge(b"Password:")
            return OK if e.data in (b"pw", b"\0u\0pw") else WRONG
        return None

    def say(self, data: bytes) -> list[str]:
        self.conn.receive_data(data)
        while True:
            e = self.conn.next_event()
            if e is NEED_DATA or e is PAUSED:
                break
            self.events.append(e)
            if e.needs_reply:
                self.conn.respond(self.answer(e))
        return self.conn.data_to_send().decode().splitlines()


def keywords(lines: list[str]) -> list[str]:
    return [line[4:] for line in lines]


def test_ehlo_offers_auth_over_tls_only():
    assert "AUTH PLAIN LOGIN CRAM-MD5" in keywords(Client(tls=True).say(b"EHLO c\r\n"))
    plain = Client(tls=False)
    assert not any("AUTH" in line for line in plain.say(b"EHLO c\r\n"))
    # ...unless told so (a listener that takes AUTH in plaintext, off by default)
    assert "AUTH PLAIN LOGIN CRAM-MD5" in keywords(Client(tls=False, tls_only=False).say(b"EHLO c\r\n"))


def test_plaintext_auth_is_refused_before_the_credentials_are_looked_at():
    c = Client(tls=False)
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"]
    assert not [e for e in c.events if isinstance(e, ev.AuthStart)]


def test_auth_not_enabled_without_mechanisms():
    c = Client(mechanisms=())
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH PLAIN =\r\n") == ["502 5.5.1 Error: authentication not enabled"]


def test_plain_with_initial_response():
    c = Client()
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n") == ["235 2.7.0 Authentication successful"]
    assert c.conn.authenticated
    assert c.events[-1] == ev.AuthStart("PLAIN", b"\0u\0pw")
    # once authenticated, AUTH is no longer advertised nor accepted
    assert c.say(b"AUTH PLAIN =\r\n") == ["503 5.5.1 Error: already authenticated"]
    assert not any(k.startswith("AUTH") for k in keywords(c.say(b"EHLO c\r\n")))


def test_plain_without_initial_response_gets_an_empty_challenge():
    c = Client()
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH plain\r\n") == ["334"]
    assert c.conn.state is State.AUTH
    assert c.say(b64(b"\0u\0pw") + b"\r\n") == ["235 2.7.0 Authentication successful"]


def test_login_two_challenges_and_a_wrong_password():
    c = Client()
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH LOGIN\r\n") == ["334 " + b64(b"Username:").decode()]
    assert c.say(b64(b"u") + b"\r\n") == ["334 " + b64(b"Password:").decode()]
    assert c.say(b64(b"nope") + b"\r\n") == ["535 5.7.8 Error: authentication failed"]
    assert c.conn.state is State.READY and not c.conn.authenticated


def test_empty_initial_response_is_the_equals_sign():
    c = Client()
    c.say(b"EHLO c\r\n")
    c.say(b"AUTH PLAIN =\r\n")
    assert c.events[-1] == ev.AuthStart("PLAIN", b"")


def test_star_cancels_and_a_bad_base64_line_ends_the_exchange():
    c = Client()
    c.say(b"EHLO c\r\n")
    c.say(b"AUTH LOGIN\r\n")
    assert c.say(b"*\r\n") == ["501 5.0.0 Authentication aborted"]
    assert isinstance(c.events[-1], ev.AuthAborted)
    c.say(b"AUTH LOGIN\r\n")
    assert c.say(b"not base64!\r\n") == ["501 5.5.2 Cannot decode response"]
    assert c.conn.state is State.READY
    assert c.say(b"AUTH PLAIN %%%\r\n") == ["501 5.5.2 Cannot decode response"]


def test_a_response_line_is_never_a_command():
    """What follows a 334 is the answer even when it looks like a command: "MAIL FROM:<x>"
    is not base64, so it ends the exchange; it is not run as MAIL."""
    c = Client()
    c.say(b"EHLO c\r\n")
    replies = c.say(b"AUTH LOGIN\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\n")
    assert replies == ["334 " + b64(b"Username:").decode(), "501 5.5.2 Cannot decode response", "250 2.0.0 Ok"]
    assert not [e for e in c.events if isinstance(e, ev.MailFrom)]


def test_response_lines_may_be_long_but_not_endless():
    c = Client()
    c.say(b"EHLO c\r\n")
    c.say(b"AUTH LOGIN\r\n")
    long_ok = b64(b"x" * 6000)                         # 8000 octets: above the command limit
    assert len(long_ok) > 2048
    assert c.say(long_ok + b"\r\n") == ["334 " + b64(b"Password:").decode()]
    assert c.say(b"A" * (AUTH_LINE + 10) + b"\r\n")[0].startswith("500 5.5.2 Line too long")


def test_sequence_rules():
    c = Client()
    assert c.say(b"AUTH PLAIN =\r\n") == ["503 5.5.1 Error: send EHLO first"]
    c.say(b"HELO c\r\n")
    assert c.say(b"AUTH PLAIN =\r\n") == ["503 5.5.1 Error: send EHLO first"]
    c.say(b"EHLO c\r\n")
    assert c.say(b"AUTH DIGEST-MD5\r\n") == ["504 5.5.4 Unsupported authentication mechanism"]
    assert c.say(b"AUTH\r\n")[0].startswith("501 5.5.4")
    c.say(b"MAIL FROM:<a@b.test>\r\n")
    assert c.say(b"AUTH PLAIN =\r\n") == ["503 5.5.1 Error: MAIL transaction in progress"]


def test_failures_count_towards_the_error_limit():
    c = Client(errors=3)
    c.say(b"EHLO c\r\n")
    out = c.say(b"AUTH PLAIN " + b64(b"\0u\0x") + b"\r\n" + b"AUTH PLAIN " + b64(b"\0u\0y") + b"\r\n"
                + b"AUTH PLAIN " + b64(b"\0u\0z") + b"\r\n")
    assert out[-1] == "421 4.7.0 mx.test Error: too many errors"
    assert c.conn.closing


def test_starttls_forgets_the_authentication():
    c = Client(tls=False, tls_only=False, tls_available=True)
    c.say(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n")
    assert c.conn.authenticated
    c.say(b"STARTTLS\r\n")
    c.conn.tls_started()
    assert not c.conn.authenticated


def test_submission_requires_tls_then_auth_before_mail():
    c = Client(tls=False, tls_available=True, require_tls=True, require_auth=True)
    c.say(b"EHLO c\r\n")
    assert c.say(b"MAIL FROM:<a@b.test>\r\n") == ["530 5.7.0 Must issue a STARTTLS command first"]
    c = Client(tls=True, require_tls=True, require_auth=True)
    c.say(b"EHLO c\r\n")
    assert c.say(b"MAIL FROM:<a@b.test>\r\n") == ["530 5.7.0 Authentication required"]
    c.say(b"AUTH PLAIN " + b64(b"\0u\0pw") + b"\r\n")
    assert c.say(b"MAIL FROM:<a@b.test> AUTH=<>\r\n") == ["250 2.1.0 Ok"]


def test_auth_parameter_of_mail_only_where_auth_is_offered():
    c = Client(mechanisms=())
    c.say(b"EHLO c\r\n")
    assert c.say(b"MAIL FROM:<a@b.test> AUTH=<>\r\n") == ["555 5.5.4 Unsupported parameter AUTH"]


def test_answers_that_make_no_sense_are_the_applications_bug():
    conn = ServerConnection(ServerConfig("mx.test"), tls_active=True, auth_mechanisms=("PLAIN",))
    conn.send_greeting()
    conn.receive_data(b"EHLO c\r\n")
    conn.respond(None) if conn.next_event().needs_reply else None
    conn.receive_data(b"AUTH PLAIN =\r\n")
    assert isinstance(conn.next_event(), ev.AuthStart)
    with pytest.raises(LocalProtocolError):
        conn.respond(Reply(250, "2.0.0", "Ok"))


@pytest.mark.parametrize("split", [1, 3, 7])
def test_the_exchange_is_the_same_however_the_input_is_split(split):
    whole = Client()
    data = b"EHLO c\r\nAUTH LOGIN\r\n" + b64(b"u") + b"\r\n" + b64(b"pw") + b"\r\nNOOP\r\n"
    expect = whole.say(data)
    c = Client()
    got = []
    for i in range(0, len(data), split):
        got += c.say(data[i:i + split])
    assert got == expect
    assert "235 2.7.0 Authentication successful" in got
