"""Trace headers: the Received header a tier adds, and counting existing ones.

Counting looks only at the header section, which the engine collects from the
first DATA chunks (bounded), with one C-level regex scan: no per-line work.
"""
from __future__ import annotations

import re
from email.utils import formatdate

from shared.smtp.syntax import clip_name

_RECEIVED = re.compile(rb"(?:^|\n)received[ \t]*:", re.IGNORECASE)
# A whole header: its first line and any folded continuation lines.
_HEADER = re.compile(rb"\n([^\r\n]*)((?:\r?\n[ \t][^\r\n]*)*)")
_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?(<[\x21-\x7e]{1,500}?>)",
                         re.IGNORECASE)
_OURS = re.compile(rb"^received[ \t]*:.*\sby\s+\S+\s+\(smarthost\)", re.IGNORECASE | re.DOTALL)
# What a tier writes above its own Received field when it passes a message on: the
# filter's results and signatures.  Between the pipeline's Received fields they do not
# end the count of its hops.
_RESULTS = re.compile(rb"^(?:authentication-results|received-spf|x-spam-[a-z]+|dkim-signature|arc-seal"
                      rb"|arc-message-signature|arc-authentication-results|subject)[ \t]*:", re.IGNORECASE)
HEADER_SCAN_LIMIT = 256 * 1024


def _clip(value: str | None) -> str:
    return clip_name(value) if value else "unknown"


def received_header(*, helo: str | None, client_name: str | None, client_addr: str | None,
                    hostname: str, protocol: str, queue_id: str, recipients: list[str],
                    now: float | None = None, tls: str | None = None) -> bytes:
    """RFC 5321 section 4.4 trace line; 'for' only when there is one recipient.

    Every line stays far below 998 octets: names are clipped to 255 octets
    (:func:`~shared.smtp.syntax.clip_name`), an address literal and a path
    (RFC 5321: at most 256 octets) are short.
    """
    addr = _clip(client_addr)
    literal = f"IPv6:{addr}" if ":" in addr else addr
    name = _clip(client_name)
    parts = [f"Received: from {_clip(helo)} ({name} [{literal}])"]
    if tls:                # "TLSv1.3 TLS_AES_256_GCM_SHA384 256/256 bits", as the session saw it
        version, _, rest = clip_name(tls).partition(" ")
        cipher, _, bits = rest.partition(" ")
        parts.append(f"\t(using {version} with cipher {cipher}" + (f" ({bits}))" if bits else ")"))
    parts.append(f"\tby {hostname} (smarthost) with {protocol} id {queue_id}")
    date = formatdate(now, localtime=True)      # the real offset ("-0000" says it is unknown)
    if len(recipients) == 1:
        parts.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        parts[-1] += ";"
        parts.append(f"\t{date}")
    return ("\r\n".join(parts) + "\r\n").encode("utf-8", "replace")


def with_protocol(esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The 'with' keyword of RFC 3848 / RFC 6531."""
    if not esmtp:
        return "SMTP"
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if auth else "")


class HeaderScanner:
    """Collects the header section from the first chunks of a message.

    `done` turns true at the blank line that ends the header section, or once
    HEADER_SCAN_LIMIT bytes have been seen (everything is counted up to there).
    """

    __slots__ = ("buf", "done")

    def __init__(self) -> None:
        self.buf = bytearray(b"\n")      # the message starts at a line start
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        start = max(0, len(self.buf) - 3)
        self.buf += chunk
        end = self.buf.find(b"\r\n\r\n", start)
        if self.buf.startswith(b"\n\r\n"):          # no header section at all
            end = 0
        if end >= 0:
            del self.buf[end + 2:]
            self.done = True
        elif len(self.buf) >= HEADER_SCAN_LIMIT:
            del self.buf[HEADER_SCAN_LIMIT:]
            self.done = True

    def received_count(self) -> int:
        return len(_RECEIVED.findall(self.buf))

    def message_id(self) -> str | None:
        """The Message-ID field's <id> (printable ASCII only, for the log), or None."""
        m = _MESSAGE_ID.search(self.buf)
        return m.group(1).decode("ascii") if m else None

    def pipeline_hops(self) -> int:
        """How many Received headers at the top were added by smarthost tiers.

        Only meaningful from a trusted upstream tier: the loop limit is enforced
        on the full count where mail enters the pipeline, and the tiers behind
        it do not count the pipeline's own hops again.
        """
        n = 0
        for m in _HEADER.finditer(self.buf):
            field = m.group(1) + m.group(2)
            if _OURS.match(field):
                n += 1
            elif not _RESULTS.match(field):
                break
        return n
