"""Non-delivery reports: RFC 3464 delivery status notifications ("bounces").

:func:`make_bounce` builds the DSN for the recipients of one queued message
that failed (a 5xx reply, or the queue lifetime ran out) and returns its
envelope and bytes; the queue manager commits it to the same spool and
delivers it like any other message.

What it produces (RFC 3464, RFC 6522, RFC 3461 section 6)::

    multipart/report; report-type=delivery-status
      1. text/plain            what happened, for people
      2. message/delivery-status
           Reporting-MTA, Original-Envelope-Id (when ENVID was given),
           Arrival-Date; per recipient: Original-Recipient (when ORCPT was
           given), Final-Recipient, Action: failed, Status, Diagnostic-Code
      3. text/rfc822-headers   the original header (RET=HDRS or no RET), or
         message/rfc822        the whole message when RET=FULL and it is no
                               larger than ``return_limit`` (else headers only)

The message returned (or its header) is the message as it was to be sent:
with the header edits of the end-of-data checks applied (``Envelope.header_edits``;
the queue applies them as it sends, see ``shared.queue.delivery``), as Postfix
returns what its cleanup wrote, header_checks applied.  A field a check removed
is not given back to the sender either.

For a message that needed SMTPUTF8 the RFC 6533 types are used instead
(message/global-delivery-status, message/global, message/global-headers) and
non-ASCII recipients get the ``utf-8`` address type.

Rules kept here, so that no caller can forget them: no bounce to the null
sender (a bounce about a bounce would loop), and a recipient whose NOTIFY
does not include FAILURE (NOTIFY=NEVER, or only SUCCESS/DELAY) is left out;
when nobody is left, there is no bounce.  The bounce itself has the null
sender and ``Auto-Submitted: auto-replied`` (RFC 3834).

A message with the null sender that cannot be delivered (a bounce, ours or
another MTA's) is reported instead to the postmaster, as a *double bounce*
(``postmaster=``): every failed recipient is listed whatever its NOTIFY, and
the failed message is returned whole up to ``return_limit``.  Its envelope
says ``notice="double-bounce"``, so that the queue never reports a failed
double bounce again (it keeps it on hold for the administrator instead).

Every line of a report is shorter than 1000 octets (RFC 5321 4.5.3.1.6),
whatever the remote replies quoted in it: a report must pass the same line
limit as any other message on its way to the sender.

Trust: reply texts come from remote servers and addresses from clients;
control characters are replaced before they are written into header fields.
"""
from __future__ import annotations

import re
import secrets
import textwrap
import time
from email.utils import formatdate
from typing import Callable

from shared.envelope import Envelope, Recipient
from shared.message import HeaderEdits, HeaderRemover
from shared.smtp.reply import Reply

RETURN_LIMIT = 50_000          # RET=FULL returns the whole message up to this size
HEADER_LIMIT = 64_000          # never copy more header than this

_CTL = re.compile(r"[\x00-\x1f\x7f]+")


def wants_failure_notice(recipient: Recipient) -> bool:
    """RFC 3461 section 4.1: no NOTIFY means FAILURE (and DELAY)."""
    return recipient.notify is None or "FAILURE" in (n.upper() for n in recipient.notify)


def make_bounce(envelope: Envelope, qid: str, failures: dict[str, Reply],
                reporting_mta: str, arrival: float,
                body_reader: Callable[[int], bytes], *,
                expired: frozenset[str] | set[str] = frozenset(),
                now: float | None = None,
                return_limit: int = RETURN_LIMIT,
                postmaster: str | None = None) -> tuple[Envelope, bytes] | None:
    """The DSN for ``failures`` (recipient address -> the reply that failed it).

    ``expired`` names the recipients that failed because the queue lifetime ran
    out: their Status is 4.4.7 and their Diagnostic-Code the last reply.
    ``body_reader(n)`` returns at most the first n bytes of the original
    message.  Returns None when no bounce is due (null sender, or no failed
    recipient asked for one).  With ``postmaster``, the report is the double
    bounce of a message with the null sender, addressed to ``postmaster``.
    """
    if (envelope.sender == "") != (postmaster is not None):
        return None
    by_addr = {r.address: r for r in envelope.recipients}
    entries = []
    for addr, reply in failures.items():
        rcpt = by_addr.get(addr, Recipient(addr))
        if postmaster is not None or wants_failure_notice(rcpt):
            entries.append((rcpt, reply, addr in expired))
    if not entries:
        return None
    if envelope.header_edits:
        body_reader = _edited(body_reader, envelope.header_edits)
    to = postmaster if postmaster is not None else envelope.sender

    now = time.time() if now is None else now
    host = _clean(reporting_mta) or "localhost"
    utf8 = envelope.smtputf8 or not _is_ascii(envelope.sender) or any(
        not _is_ascii(r.address) or not _is_ascii(r.orcpt or "") for r, _, _ in entries)

    human = _human_part(host, entries, double=postmaster is not None)
    status = _status_part(envelope, host, arrival, entries, now)
    returned_type, returned = _returned_part(envelope, body_reader, return_limit, utf8,
                                             full=postmaster is not None)

    boundary = _boundary(human + status + returned)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers = [
        f"Date: {formatdate(now, usegmt=True)}",
        f"From: MAILER-DAEMON@{host} (Mail Delivery System)",
        f"To: <{_clean(to)}>",
        "Subject: " + ("Undeliverable Bounce Sent to the Postmaster" if postmaster is not None
                       else "Undelivered Mail Returned to Sender"),
        f"Message-ID: <{int(now)}.{qid}.{secrets.token_hex(4)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = bytearray("\r\n".join(headers).encode("utf-8") + b"\r\n")
    b = boundary.encode("ascii")
    eight_bit_returned = not _is_ascii_bytes(returned)
    parts = [
        (b"Content-Description: Notification\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n"
         + (b"Content-Transfer-Encoding: 8bit\r\n" if not _is_ascii_bytes(human) else b""),
         human),
        (b"Content-Description: Delivery report\r\n"
         b"Content-Type: " + status_type.encode() + b"\r\n"
         + (b"Content-Transfer-Encoding: 8bit\r\n" if not _is_ascii_bytes(status) else b""),
         status),
        (b"Content-Description: " + (b"Undelivered Message" if returned_type.endswith(
            ("rfc822", "global")) else b"Undelivered Message Headers") + b"\r\n"
         b"Content-Type: " + returned_type.encode() + b"\r\n"
         + (b"Content-Transfer-Encoding: 8bit\r\n" if eight_bit_returned else b""),
         returned),
    ]
    for head, body in parts:
        # Each body ends with CRLF; the CRLF before the next delimiter belongs to it.
        out += b"--" + b + b"\r\n" + head + b"\r\n" + body
        out += b"\r\n" if body.endswith(b"\r\n") else b"\r\n\r\n"
    out += b"--" + b + b"--\r\n"
    # Every part is built with CRLF line ends; normalising once more makes it a
    # guarantee: what the queue holds has no bare CR or LF (see QueueDelivery's content_checked).
    data = _short_lines(_crlf(bytes(out)))

    bounce_env = Envelope(
        sender="",
        recipients=[Recipient(to)],
        body="8BITMIME" if not _is_ascii_bytes(data) else "7BIT",
        smtputf8=utf8,
        upstream_id=qid,
        received_at=now,
        notice="double-bounce" if postmaster is not None else "bounce",
    )
    return bounce_env, data


def _human_part(host: str, entries: list[tuple[Recipient, Reply, bool]], double: bool = False) -> bytes:
    lines = [f"This is the mail system at host {host}.", ""]
    if double:
        lines += ["A message with the null sender (a delivery notification) could not be delivered",
                  "to one or more recipients, so it cannot be returned to its sender either.",
                  "It is attached below.", ""]
    else:
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It is attached below (or its header, if the whole message was not asked for).", ""]
    for rcpt, reply, expired in entries:
        lines.append(f"<{_clean(rcpt.address)}>:")
        if expired:
            lines.append("    delivery time expired: the message stayed in the queue too long;")
            lines.extend(_wrap(f"last reply: {_clean(str(reply))}", "    "))
        else:
            lines.extend(_wrap(_clean(str(reply)), "    "))
        lines.append("")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _wrap(text: str, indent: str, width: int = 78) -> list[str]:
    """Text as indented lines of at most `width` characters (long words are cut)."""
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [indent.rstrip()]


MAX_LINE = 998          # octets before the CRLF (RFC 5321 4.5.3.1.6)


def _short_lines(data: bytes) -> bytes:
    """Cut every line longer than MAX_LINE, continuing it on a line that starts with a
    space (a folded header field in the header sections; a visible break in text)."""
    if all(len(line) <= MAX_LINE for line in data.split(b"\r\n")):
        return data
    out = []
    for line in data.split(b"\r\n"):
        while len(line) > MAX_LINE:
            cut = MAX_LINE
            while 0x80 <= line[cut] < 0xC0 and cut > MAX_LINE - 4:   # not inside a UTF-8 character
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _status_part(envelope: Envelope, host: str, arrival: float,
                 entries: list[tuple[Recipient, Reply, bool]], now: float) -> bytes:
    msg = [f"Reporting-MTA: dns; {host}"]
    if envelope.envid:
        msg.insert(0, f"Original-Envelope-Id: {_envid(envelope.envid)}")
    msg.append(f"Arrival-Date: {formatdate(arrival, usegmt=True)}")
    blocks = ["\r\n".join(msg)]
    for rcpt, reply, expired in entries:
        fields = []
        if rcpt.orcpt:
            fields.append(f"Original-Recipient: {_typed_address(rcpt.orcpt)}")
        addr = _clean(rcpt.address)
        atype = "rfc822" if _is_ascii(addr) else "utf-8"
        fields.append(f"Final-Recipient: {atype}; {addr}")
        fields.append("Action: failed")
        fields.append(f"Status: {'4.4.7' if expired else _status_code(reply)}")
        fields.append(_fold(f"Diagnostic-Code: smtp; {_clean(_reply_text(reply))}"))
        fields.append(f"Last-Attempt-Date: {formatdate(now, usegmt=True)}")
        blocks.append("\r\n".join(fields))
    return ("\r\n\r\n".join(blocks) + "\r\n").encode("utf-8")


def _returned_part(envelope: Envelope, body_reader: Callable[[int], bytes],
                   limit: int, utf8: bool, full: bool = False) -> tuple[str, bytes]:
    full_type = "message/global" if utf8 else "message/rfc822"
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    if full or (envelope.ret or "").upper() == "FULL":
        data = body_reader(limit + 1)
        if len(data) <= limit:
            return full_type, _crlf(data)
    else:
        data = body_reader(HEADER_LIMIT)
    return headers_type, _header_block(data)


def _edited(body_reader: Callable[[int], bytes], edits: HeaderEdits) -> Callable[[int], bytes]:
    """``body_reader`` for the message with ``edits`` applied: the added fields first,
    the removed ones gone.  When the edited message has at least n bytes, n are
    returned, however much was removed, so that a message over the return limit is
    still seen to be over it."""
    prefix = edits.prefix()

    def read(n: int) -> bytes:
        want = n
        while True:
            data = body_reader(want)
            whole = len(data) < want
            remover = edits.remover()
            out = prefix + remover.feed(data) + (remover.flush() if whole else b"")
            if whole or len(out) >= n:
                return out[:n]
            want += n - len(out)        # removed fields made room: read that much more

    return read


def _header_block(data: bytes) -> bytes:
    """The header section of a message prefix, CRLF line ends, no blank line."""
    data = data[:HEADER_LIMIT]
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if ends:
        data = data[:min(ends)]
    elif len(data) >= HEADER_LIMIT:
        data = data[:data.rfind(b"\n") + 1]     # cut at the last complete line
    return _crlf(data).rstrip(b"\r\n") + b"\r\n"


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _status_code(reply: Reply) -> str:
    if reply.enhanced:
        return reply.enhanced
    return f"{str(reply.code)[0]}.0.0"


def _reply_text(reply: Reply) -> str:
    head = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    return head + " ".join(line.strip() for line in reply.lines())


def _typed_address(value: str) -> str:
    """ORCPT "type;address" as an RFC 3464 typed address."""
    atype, sep, addr = value.partition(";")
    if not sep:
        atype, addr = "rfc822", value
    return f"{_clean(atype.strip()) or 'rfc822'}; {_clean(addr.strip())}"


def _envid(envid: str) -> str:
    """ENVID as RFC 3461 xtext unless it is plain printable ASCII."""
    if all(33 <= ord(c) <= 126 and c not in "+=" for c in envid):
        return envid
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in envid)


def _fold(line: str, width: int = 78) -> str:
    """Fold a long header field at spaces (continuation lines start with a space)."""
    if len(line) <= width:
        return line
    out, cur = [], ""
    for word in line.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            out.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    out.append(cur)
    return "\r\n ".join(out)


def _clean(text: str) -> str:
    return _CTL.sub(" ", text).strip()


def _is_ascii(text: str) -> bool:
    return text.isascii()


def _is_ascii_bytes(data: bytes) -> bool:
    return data.isascii()


def _boundary(content: bytes) -> str:
    while True:
        b = f"=_bounce_{secrets.token_hex(12)}"
        if b.encode() not in content:
            return b
