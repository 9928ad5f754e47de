"""RFC 3464 bounces, parsed back with the stdlib email package."""
from __future__ import annotations

import email
from email.message import Message

from shared.envelope import Recipient
from shared.message import HeaderEdits
from shared.queue.bounce import make_bounce
from shared.smtp.reply import Reply
from tests.shared.queue.helpers import BODY, PERM, envelope

NOW = 1_700_000_000.0


def reader(data: bytes):
    return lambda n: data[:n]


def parse(data: bytes) -> Message:
    assert b"\n" not in data.replace(b"\r\n", b"")          # CRLF line ends only
    return email.message_from_bytes(data)


def report_parts(msg: Message):
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert len(parts) == 3
    return parts


def test_bounce_for_5xx_is_rfc3464():
    env = envelope(rcpts=(Recipient("bob@example.net", None, "rfc822;Bob@Example.NET"),
                          "carol@example.net"), envid="ENV-42", upstream_id="UP7",
                   received_at=NOW - 60)
    result = make_bounce(env, "01QUEUEID000000000000", {"bob@example.net": PERM},
                         "mx.example.org", env.received_at, reader(BODY), now=NOW)
    assert result is not None
    benv, data = result
    assert benv.sender == ""
    assert [r.address for r in benv.recipients] == ["alice@example.org"]
    assert benv.upstream_id == "01QUEUEID000000000000"

    msg = parse(data)
    assert msg["From"].startswith("MAILER-DAEMON@mx.example.org")
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mx.example.org>")
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW

    human, status, returned = report_parts(msg)
    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode()
    assert "<bob@example.net>" in text and "550 5.1.1 User unknown" in text
    assert "carol" not in text

    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_message, *per_rcpt = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == NOW - 60
    assert len(per_rcpt) == 1
    r = per_rcpt[0]
    assert r["Original-Recipient"] == "rfc822; Bob@Example.NET"
    assert r["Final-Recipient"] == "rfc822; bob@example.net"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"

    assert returned.get_content_type() == "text/rfc822-headers"     # no RET: headers only
    payload = returned.get_payload()
    assert "Subject: test message" in payload
    assert "Hello Bob" not in payload


def test_ret_full_returns_message_up_to_limit():
    env = envelope(ret="FULL", received_at=NOW)
    _, data = make_bounce(env, "01Q0000000000000000A", {"bob@example.net": PERM},
                          "mx.example.org", NOW, reader(BODY), now=NOW)
    returned = report_parts(parse(data))[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "test message"
    assert "Hello Bob" in inner.get_payload()

    big = BODY + b"x" * 2000 + b"\r\n"
    _, data = make_bounce(env, "01Q0000000000000000A", {"bob@example.net": PERM},
                          "mx.example.org", NOW, reader(big), now=NOW, return_limit=1000)
    returned = report_parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"     # too big: headers only
    assert "xxxx" not in returned.get_payload()


def test_the_returned_message_has_the_header_edits_of_the_checks():
    edits = HeaderEdits(add=(("X-Spam-Status", "Yes, score=9"),), remove=frozenset({"Message-ID"}))
    for ret in ("FULL", "HDRS"):
        env = envelope(ret=ret, received_at=NOW, header_edits=edits)
        _, data = make_bounce(env, "01Q0000000000000000A", {"bob@example.net": PERM},
                              "mx.example.org", NOW, reader(BODY), now=NOW)
        returned = report_parts(parse(data))[2]
        fields = returned.get_payload()[0] if ret == "FULL" else email.message_from_string(
            returned.get_payload())
        assert fields.keys()[:2] == ["X-Spam-Status", "Received"]
        assert fields["Message-ID"] is None and fields["Subject"] == "test message"

    # The edited message is shorter than the original.  At a limit it fits only once
    # edited, it is returned whole, not cut where the original was cut; one byte less
    # and it is headers only.
    edited = len(BODY) + len(edits.prefix()) - len(b"Message-ID: <m1@example.org>\r\n")
    assert edited < len(BODY)
    env = envelope(ret="FULL", received_at=NOW, header_edits=edits)
    for limit, kind in ((edited, "message/rfc822"), (edited - 1, "text/rfc822-headers")):
        _, data = make_bounce(env, "01Q0000000000000000A", {"bob@example.net": PERM},
                              "mx.example.org", NOW, reader(BODY), now=NOW, return_limit=limit)
        returned = report_parts(parse(data))[2]
        assert returned.get_content_type() == kind
        if kind == "message/rfc822":
            assert returned.get_payload()[0].get_payload() == "Hello Bob,\r\nthis is the body.\r\n"


def test_expired_recipient_gets_447_and_last_reply():
    env = envelope(received_at=NOW - 6 * 86400)
    last = Reply(451, "4.4.1", "Connection refused")
    _, data = make_bounce(env, "01Q0000000000000000B", {"bob@example.net": last},
                          "mx.example.org", env.received_at, reader(BODY),
                          expired={"bob@example.net"}, now=NOW)
    human, status, _ = report_parts(parse(data))
    r = status.get_payload()[1]
    assert r["Action"] == "failed"
    assert r["Status"] == "4.4.7"
    assert r["Diagnostic-Code"] == "smtp; 451 4.4.1 Connection refused"
    assert "delivery time expired" in human.get_payload(decode=True).decode()


def test_null_sender_never_bounced():
    env = envelope(sender="")
    assert make_bounce(env, "01Q0000000000000000C", {"bob@example.net": PERM},
                       "mx.example.org", NOW, reader(BODY), now=NOW) is None


def test_notify_respected():
    env = envelope(rcpts=(Recipient("never@example.net", ("NEVER",)),
                          Recipient("success@example.net", ("SUCCESS",)),
                          Recipient("fail@example.net", ("SUCCESS", "FAILURE")),
                          Recipient("default@example.net")))
    failures = {r.address: PERM for r in env.recipients}
    _, data = make_bounce(env, "01Q0000000000000000D", failures, "mx.example.org", NOW,
                          reader(BODY), now=NOW)
    finals = [b["Final-Recipient"] for b in report_parts(parse(data))[1].get_payload()[1:]]
    assert finals == ["rfc822; fail@example.net", "rfc822; default@example.net"]
    only_never = {"never@example.net": PERM, "success@example.net": PERM}
    assert make_bounce(env, "01Q0000000000000000D", only_never, "mx.example.org", NOW,
                       reader(BODY), now=NOW) is None


def test_hostile_reply_text_cannot_inject_fields():
    env = envelope()
    evil = Reply(550, None, "no such user\nX-Injected: yes\r\nStatus: 2.0.0")
    _, data = make_bounce(env, "01Q0000000000000000E", {"bob@example.net": evil},
                          "mx.example.org", NOW, reader(BODY), now=NOW)
    r = report_parts(parse(data))[1].get_payload()[1]
    assert r["X-Injected"] is None
    assert r.get_all("Status") == ["5.0.0"]                 # derived from the 5xx code
    assert "X-Injected: yes" in r["Diagnostic-Code"]
    # the queue's promise: no bare CR or LF in anything it holds (the relay client relies on it)
    assert data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")


def test_long_diagnostic_is_folded():
    env = envelope()
    reply = Reply(550, "5.7.1", " ".join(["word"] * 60))
    _, data = make_bounce(env, "01Q0000000000000000F", {"bob@example.net": reply},
                          "mx.example.org", NOW, reader(BODY), now=NOW)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    r = report_parts(parse(data))[1].get_payload()[1]
    assert " ".join(r["Diagnostic-Code"].split()) == "smtp; 550 5.7.1 " + " ".join(["word"] * 60)


def test_utf8_message_uses_global_types():
    env = envelope(sender="alice@example.org", rcpts=("bj\u00f6rn@ex\u00e4mple.net",),
                   smtputf8=True)
    body = "Subject: gr\u00fc\u00dfe\r\n\r\nhi\r\n".encode()
    benv, data = make_bounce(env, "01Q0000000000000000G", {"bj\u00f6rn@ex\u00e4mple.net": PERM},
                             "mx.example.org", NOW, reader(body), now=NOW)
    assert benv.smtputf8 and benv.body == "8BITMIME"
    _, status, returned = report_parts(parse(data))
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global-headers"
    assert "utf-8; bj\u00f6rn@ex\u00e4mple.net".encode() in data


def test_a_failed_null_sender_message_is_reported_to_the_postmaster_as_a_double_bounce():
    env = envelope(sender="", rcpts=(Recipient("gone@example.org", ("NEVER",)),), received_at=NOW - 60)
    assert make_bounce(env, "01QUEUEID000000000000", {"gone@example.org": PERM},
                       "mx.example.org", env.received_at, reader(BODY), now=NOW) is None
    result = make_bounce(env, "01QUEUEID000000000000", {"gone@example.org": PERM}, "mx.example.org",
                         env.received_at, reader(BODY), now=NOW, postmaster="postmaster@example.org")
    assert result is not None                      # NOTIFY=NEVER does not silence the postmaster
    benv, data = result
    assert benv.sender == "" and benv.notice == "double-bounce"
    assert [r.address for r in benv.recipients] == ["postmaster@example.org"]
    msg = parse(data)
    assert msg["To"] == "<postmaster@example.org>"
    human, status, returned = report_parts(msg)
    assert "<gone@example.org>" in human.get_payload(decode=True).decode()
    assert returned.get_content_type() == "message/rfc822"       # the whole failed message
    # a message with a real sender is never a double bounce
    normal = envelope(rcpts=("bob@example.net",))
    assert make_bounce(normal, "01QUEUEID000000000000", {"bob@example.net": PERM}, "mx.example.org",
                       NOW, reader(BODY), now=NOW, postmaster="postmaster@example.org") is None
    benv, _ = make_bounce(normal, "01QUEUEID000000000000", {"bob@example.net": PERM}, "mx.example.org",
                          NOW, reader(BODY), now=NOW)
    assert benv.notice == "bounce"


def test_every_line_of_a_report_fits_the_line_limit_whatever_the_remote_said():
    """A remote reply may be many long lines, or one long word: quoted as it is, the report
    would be refused by the next hop (line too long) and the failure would never be told."""
    long_reply = Reply(550, "5.7.1", "\n".join(["x" * 500] * 6 + ["é" * 1500]))
    env = envelope(rcpts=("bob@example.net",), ret="FULL")
    _, data = make_bounce(env, "01QUEUEID000000000000", {"bob@example.net": long_reply},
                          "mx.example.org", NOW, reader(BODY), now=NOW)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    data.decode("utf-8")                            # never cut inside a character
    human, status, _ = report_parts(parse(data))
    assert "x" * 70 in human.get_payload(decode=True).decode()
