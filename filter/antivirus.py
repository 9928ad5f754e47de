"""Antivirus through ClamAV's clamd: the check ``antivirus``.

At end of data the message goes to clamd as it is, over clamd's INSTREAM protocol
("zINSTREAM\\0", then chunks each led by its length as 4 octets, big-endian, then a
zero length; the answer is one NUL-ended line: ``stream: OK``, ``stream: NAME
FOUND`` or ``... ERROR``).  clamd itself decodes MIME parts and unpacks archives
(its ScanMail and ScanArchive settings); with ``scan = "parts"`` the filter decodes
each MIME part itself and sends the parts one by one, for a clamd that does not.  The client is this module's Twisted
protocol, on the reactor: a hand-off to a thread for clamd's ``clamd`` package
would cost more than the few writes a message takes, and could not be cancelled
at the timeout.  The message is streamed from the one copy the end-of-data checks
share (:class:`shared.message.ReadOnce`), chunk by chunk as the socket takes them
(:class:`filter.scanclient.Exchange`), never copied whole.

- Infected: 554 5.7.1 naming the signature, to the original client at end of data
  (through the edge, in its transaction); nothing is queued.  Symbol AV_VIRUS.
- Larger than ``max_size``: not scanned, logged, symbol AV_SKIPPED, and what
  ``oversize`` says: accept (the default), tempfail (451 4.7.1) or reject (552 5.3.4).
  A message over clamd's own StreamMaxLength is treated so too.
- clamd down, slow (``timeout`` per server) or answering an error: the next of
  ``servers`` is tried; when none answers, ``on_failure = "tempfail"`` (the default:
  451 4.7.1, the client retries) or ``"accept"`` (fail open: logged, symbol AV_FAIL).
"""
from __future__ import annotations

import email
import email.policy
import struct
from dataclasses import dataclass

from twisted.internet import defer

from twisted.logger import Logger

from filter.mailauth import checks_pool, compute
from filter.scanclient import CHUNK, Exchange, ScannerError, Servers, server_setting, server_text
from shared.checks.core import Request, Symbol, Verdict, note, reject, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, bounded, choice, setting

log = Logger(namespace="smarthost.antivirus")

MIB = 1024 * 1024


@dataclass(frozen=True)
class AntivirusSettings:
    """antivirus through clamd at end of data (the check `antivirus`)"""
    servers: tuple = setting((), "clamd servers, host:port or the absolute path of its local socket, tried in "
                                 "turn (empty: no scanning)", server_setting)
    timeout: float = setting(30.0, "seconds one server may take for one message, then the next is tried", SECONDS)
    max_size: int = setting(25 * MIB, "messages larger than this are not scanned (clamd's StreamMaxLength must "
                                      "be at least this)", bounded(1, 1 << 40))
    oversize: str = setting("accept", "a message over max_size: accept (logged, symbol AV_SKIPPED), tempfail "
                                      "(451 4.7.1) or reject (552 5.3.4)", choice("accept", "tempfail", "reject"))
    scan: str = setting("message", "what goes to clamd: message (whole, as received: clamd decodes MIME itself "
                                   "with its ScanMail) or parts (each MIME part decoded here, sent on its own: "
                                   "for a clamd whose ScanMail is off)", choice("message", "parts"))
    on_failure: str = setting("tempfail", "no server answered: tempfail (451 4.7.1: the client retries) or accept "
                                          "(fail open: logged, symbol AV_FAIL)", choice("tempfail", "accept"))


class ClamdError(ScannerError):
    pass


class _TooBig(Exception):
    pass


@dataclass(frozen=True, slots=True)
class AvResult:
    result: str                 # clean | infected | skipped | unavailable
    detail: str = ""            # the signature, the size, or why no server answered

    @property
    def log(self) -> str:
        return f"antivirus={self.result}" + (f" ({self.detail})" if self.detail else "")


class _Instream(Exchange):
    """One INSTREAM exchange: the message out in chunks, each led by its length, the one
    NUL-ended answer in."""

    max_answer = 4096

    def __init__(self, message: bytes, answered) -> None:
        super().__init__([message], answered)

    def pieces(self):
        message = memoryview(self.request[0])
        yield b"zINSTREAM\0"
        for i in range(0, len(message), CHUNK):
            piece = message[i:i + CHUNK]
            yield struct.pack(">I", len(piece))
            yield piece
        yield b"\0\0\0\0"

    def complete(self, buf: bytes, closed: bool) -> bytes | None:
        return buf.split(b"\0", 1)[0] if b"\0" in buf else None


def parse_answer(answer: str) -> AvResult:
    """clamd's answer to INSTREAM as a result; raises ClamdError or _TooBig for its errors."""
    text = answer.partition(": ")[2] if answer.startswith("stream") else answer
    if text == "OK":
        return AvResult("clean")
    if text.endswith(" FOUND"):
        return AvResult("infected", text[:-len(" FOUND")].strip()[:200])
    if "size limit exceeded" in text:
        raise _TooBig(text)
    raise ClamdError(f"clamd answered {answer[:200]!r}")


MAX_PARTS = 200           # scan = "parts": parts sent at most (a message of more is sent whole too)


def decoded_parts(message: bytes) -> list[bytes]:
    """scan = "parts": every leaf MIME part with content, its transfer encoding (base64,
    quoted-printable) undone, in order; the message itself when it has no parts to decode
    or more than MAX_PARTS (then the rest goes whole, clamd decoding it)."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    out = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload:
            out.append(payload)
        if len(out) > MAX_PARTS:
            return out[:MAX_PARTS] + [message]
    return out or [message]


class Antivirus:
    name = "antivirus"

    def __init__(self, own: AntivirusSettings, reactor, pool=None) -> None:
        self.own = own
        self.reactor = reactor
        self.pool = pool
        self.servers = Servers(reactor, own.servers, own.timeout, "clamd")

    def scan(self, message: bytes):
        """The first answer of the servers in turn (AvResult), or the last failure raised."""
        return self.servers.first(lambda server, answered: _Instream(message, answered),
                                  lambda answer: parse_answer(answer.decode("utf-8", "replace").strip()),
                                  final=(_TooBig,))

    @defer.inlineCallbacks
    def scan_parts(self, message: bytes):
        """scan = "parts": each decoded part in turn; the first virus ends it."""
        parts = yield defer.maybeDeferred(compute, self.pool, len(message), decoded_parts, message)
        result = AvResult("clean")
        for part in parts:
            result = yield self.scan(part)
            if result.result == "infected":
                return result
        return result

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note()
        if message.size > self.own.max_size:
            return self._oversize(f"{message.size} octets, over {self.own.max_size}")
        d = message.read_body()
        d.addCallback(self.scan_parts if self.own.scan == "parts" else self.scan)
        return d.addCallbacks(self._verdict, self._failed)

    def _verdict(self, result: AvResult) -> Verdict:
        if result.result == "infected":
            v = reject(554, "5.7.1", f"Virus found: {result.detail}")
            return Verdict(v.action, v.reply, result=result, symbols=(Symbol("AV_VIRUS", result.detail),))
        return note(result)

    def _oversize(self, why: str) -> Verdict:
        result = AvResult("skipped", why)
        symbols = (Symbol("AV_SKIPPED", why),)
        if self.own.oversize == "tempfail":
            v = tempfail(451, "4.7.1", "Message could not be scanned for viruses: try again later")
        elif self.own.oversize == "reject":
            v = reject(552, "5.3.4", "Message too big to be scanned for viruses")
        else:
            return note(result, symbols=symbols)
        return Verdict(v.action, v.reply, result=result, symbols=symbols)

    def _failed(self, failure) -> Verdict:
        if failure.check(_TooBig):
            return self._oversize(str(failure.value))
        failure.trap(ScannerError)
        why = str(failure.value)
        result = AvResult("unavailable", why[:300])
        log.error("antivirus: no clamd answered ({why}); {what}", why=why,
                  what="tempfail" if self.own.on_failure == "tempfail" else "accepted unscanned (on_failure = accept)")
        if self.own.on_failure == "accept":
            return note(result, symbols=(Symbol("AV_FAIL", why[:100]),))
        v = tempfail(451, "4.7.1", "Virus scanner unavailable: try again later")
        return Verdict(v.action, v.reply, result=result)


def _build(own: AntivirusSettings, ctx):
    if not own.servers:
        return None
    return Antivirus(own, ctx.reactor, checks_pool(ctx) if own.scan == "parts" else None)


ANTIVIRUS = CheckType(
    "antivirus", phases=("end_of_data",), build=_build, section=Section.of("antivirus", AntivirusSettings),
    timeout=lambda s: s.antivirus.timeout * max(1, len(s.antivirus.servers)) + 5,
    active=lambda own, s: bool(own.servers),
    doc="scan the message with clamd (INSTREAM); a virus is refused 554 5.7.1",
    summary=lambda own, s: "clamd: " + ", ".join(server_text(x) for x in own.servers),
    symbols={"AV_VIRUS": (20.0, "clamd found a virus (the message is refused)"),
             "AV_SKIPPED": (0.0, "not scanned: over max_size"),
             "AV_FAIL": (0.0, "no clamd answered and on_failure = accept: not scanned")})
