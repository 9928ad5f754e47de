"""SMTP replies (RFC 5321 section 4.2) with enhanced status codes (RFC 3463).

A :class:`Reply` is a value: a three-digit code, an optional enhanced status
code and text that may span several lines.  It serialises itself with the
multiline ``250-`` form when the text has several lines.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None:
            if not _ENHANCED.match(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"bad enhanced status code {self.enhanced!r} for {self.code}")

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self) -> bytes:
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
        return head + " / ".join(self.lines())

    @classmethod
    def parse_lines(cls, lines: list[bytes]) -> "Reply":
        """Build a reply from its raw lines (without CRLF), as a client reads them.

        The enhanced status code is taken from the first line when present.
        """
        code = int(lines[0][:3])
        texts = [ln[4:].decode("utf-8", "replace") for ln in lines]
        enhanced = None
        m = _LEADING_ENHANCED.match(texts[0])
        if m and m.group(1)[0] == str(code)[0]:
            enhanced = m.group(1)
            prefix = len(enhanced)
            texts = [t[prefix:].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
        return cls(code, enhanced, "\n".join(texts))


_LEADING_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)")

# Replies the engine gives in more than one place.
TEMPFAIL_LOCAL = Reply(451, "4.3.0", "Error: queue file write error")
TEMPFAIL_CHECK = Reply(451, "4.3.0", "Temporary local problem, try again later")
TEMPFAIL_NEXT_HOP = Reply(451, "4.4.1", "Next hop not reachable, try again later")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")


def storage_error(exc: BaseException, otherwise: Reply = TEMPFAIL_LOCAL) -> Reply:
    """The reply for a failed write: a full disk or quota is 452 4.3.1 (RFC 3463: mail
    system full), anything else `otherwise`."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return INSUFFICIENT_STORAGE
    return otherwise
