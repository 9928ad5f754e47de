"""The SMTP client as a state machine that does no I/O.

Bytes from the server go in through :meth:`ClientConnection.receive_data`;
replies come out of :meth:`ClientConnection.next_reply`.  Each command is
built by a method that first checks that the command is allowed now and
returns the bytes to write.  Nothing here touches a socket, a clock or a
reactor; ``shared.transport.client`` adapts it to Twisted.

What it trusts: nothing that the server sends.  Reply lines are bounded
(:data:`MAX_LINE` bytes, :data:`MAX_REPLY_LINES` lines per reply) and anything
that is not a well-formed reply, a reply that nobody asked for, a reply of
the wrong class (354 to anything but DATA) or bytes sent after the STARTTLS
reply (plaintext that would be taken as coming over TLS) raise
:class:`RemoteProtocolError`, after which the connection is unusable.  A
command that the caller may not send now, or an argument that would break
the command line (CR, LF, other control characters, 8-bit text without
SMTPUTF8) raise :class:`LocalProtocolError` and change nothing.

States (the session as the client sees it once every command it has sent
has succeeded; a failed reply moves it back, see the table)::

    state      commands allowed            on success           on failure
    ---------  --------------------------  -------------------  ----------------
    CONNECTED  (waiting for the greeting)  220 -> GREETED       -> REFUSED
    GREETED    EHLO HELO XCLIENT NOOP QUIT 250 -> READY         stay GREETED
    READY      EHLO HELO STARTTLS XCLIENT  STARTTLS 220 -> GREETED (TLS)
               XFORWARD MAIL RSET NOOP     XCLIENT 220 -> GREETED
               QUIT                        MAIL -> MAIL         MAIL fails: READY
    MAIL       RCPT DATA RSET NOOP QUIT    DATA 354 -> BODY     DATA fails: MAIL
                                                                (READY if MAIL failed)
    BODY       message data, end of data   final reply -> READY (whatever the code)
    REFUSED    QUIT                        (greeting was not 2xx)
    CLOSED     nothing                     (QUIT sent, or 421 received)

RSET from READY or MAIL goes to READY.  A 421 reply, to any command or
unsolicited, means the server is closing the connection: the state becomes
CLOSED and every reply still awaited is dropped (:attr:`pending` is 0).

Pipelining (RFC 2920): a command may be written while replies are still
awaited only if the server advertised PIPELINING and every awaited command
is one that may stand inside a group (XFORWARD, MAIL, RCPT, RSET).  So MAIL,
RCPTs and DATA may go in one write; EHLO, STARTTLS, XCLIENT, DATA, NOOP,
QUIT and the end of data always end a group, and nothing at all is sent
before the greeting.

Extension parameters are added only when the server advertised the
extension: SIZE, BODY (8BITMIME), SMTPUTF8, and RET/ENVID/NOTIFY/ORCPT (DSN,
RFC 3461, with ENVID and ORCPT encoded as xtext).

XCLIENT and XFORWARD (Postfix extensions) carry only the attributes the
server listed on its EHLO line, xtext-encoded, each command line at most 512
bytes.  A server answers every accepted XCLIENT with a fresh 220 greeting and
resets the session, so all attributes should go in one command; they always
fit in practice.  :meth:`ClientConnection.attribute_groups` splits them into
several commands only when they cannot (the caller then sends one XCLIENT per
group, waiting for each 220), and replaces a single value too long for any
command line by ``[UNAVAILABLE]``.
"""
from __future__ import annotations

import enum
import re
from collections import deque
from typing import Final, Iterable, Mapping

from shared.smtp.syntax import xtext_encode
from shared.smtp.reply import Reply

__all__ = [
    "NEED_DATA", "MAX_LINE", "MAX_REPLY_LINES", "MAX_COMMAND_LINE",
    "State", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "ClientConnection", "DataEncoder",
]

MAX_LINE: Final = 4096          # bytes in one reply line, CRLF included
MAX_REPLY_LINES: Final = 100    # lines in one (multiline) reply
MAX_COMMAND_LINE: Final = 512   # RFC 5321 4.5.3.1.4, CRLF included


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`ClientConnection.next_reply` until a whole reply is buffered."""


class ProtocolError(Exception):
    """The SMTP dialogue cannot go on as it is."""


class LocalProtocolError(ProtocolError):
    """Our side asked for something SMTP does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The server sent something that is not valid SMTP."""


class State(enum.Enum):
    CONNECTED = "CONNECTED"
    GREETED = "GREETED"
    READY = "READY"
    MAIL = "MAIL"
    BODY = "BODY"
    REFUSED = "REFUSED"
    CLOSED = "CLOSED"


# Commands that may be followed by more commands before their reply arrives.
_GROUP_MIDDLE: Final = frozenset({"XFORWARD", "MAIL", "RCPT", "RSET"})

_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]|\Z)")
_EHLO_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOMAIN_ARG = re.compile(r"[\x21-\x7e]+\Z")
_NOTIFY: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})
UNAVAILABLE: Final = "[UNAVAILABLE]"


def _check_text(what: str, value: str) -> None:
    if _CONTROL.search(value):
        raise LocalProtocolError(f"{what} contains a control character: {value!r}")


class ClientConnection:
    """One SMTP client session, from the server's greeting to QUIT.

    ``extensions`` maps each EHLO keyword (upper case) to the rest of its
    line; it is empty before EHLO, after HELO and after STARTTLS (RFC 3207:
    forget what was learnt in plaintext).  ``pending`` is the number of
    replies still awaited; ``messages_sent`` counts end-of-data replies that
    were 2xx.
    """

    def __init__(self) -> None:
        self.state = State.CONNECTED
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.messages_sent = 0
        self._pending: deque[str] = deque(["GREETING"])
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._broken: RemoteProtocolError | None = None
        # The transaction as sent so far: did MAIL succeed, RCPTs sent and
        # accepted, and whether SMTPUTF8 was given on MAIL.
        self._mail_ok = True
        self._rcpts_sent = 0
        self.rcpts_accepted = 0
        self._utf8 = False
        self._encoder: DataEncoder | None = None
        # Set by a caller whose content was already checked for bare CR and LF
        # (a smarthost server core refuses them): the encoder then only stuffs dots.
        self.crlf_checked = False

    # ---- what the server offered -------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def max_size(self) -> int | None:
        """The SIZE limit the server announced, or None (none or unlimited)."""
        value = self.extensions.get("SIZE", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    def attributes_offered(self, verb: str) -> frozenset[str]:
        """The attribute names the server listed after XCLIENT or XFORWARD."""
        return frozenset(self.extensions.get(verb.upper(), "").upper().split())

    # ---- replies ------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the server."""
        self._buf += data

    def next_reply(self) -> Reply | _NeedData:
        """Return the next complete reply, or :data:`NEED_DATA`.

        The reply is matched to the oldest command still awaiting one and
        the state moves on accordingly.
        """
        if self._broken is not None:
            raise self._broken
        try:
            return self._next_reply()
        except RemoteProtocolError as exc:
            self._broken = exc
            self.state = State.CLOSED
            raise

    def _next_reply(self) -> Reply | _NeedData:
        buf = self._buf
        while True:
            end = buf.find(b"\n", 0, MAX_LINE)
            if end < 0:
                if len(buf) >= MAX_LINE:
                    raise RemoteProtocolError(f"reply line longer than {MAX_LINE} bytes")
                return NEED_DATA
            line = bytes(buf[:end])
            del buf[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            m = _REPLY_LINE.match(line)
            if m is None:
                raise RemoteProtocolError(f"malformed reply line: {line[:80]!r}")
            if self._lines and line[:3] != self._lines[0][:3]:
                raise RemoteProtocolError(
                    f"reply code changed inside a multiline reply: {line[:80]!r}")
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                raise RemoteProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
            if m.group(2) != b"-":
                lines, self._lines = self._lines, []
                reply = Reply.parse_lines(lines)
                self._on_reply(reply)
                return reply

    def _on_reply(self, reply: Reply) -> None:
        if not self._pending:
            if reply.code == 421:          # the server may say goodbye at any time
                self._close_by_server()
                return
            raise RemoteProtocolError(f"unexpected reply with no command pending: {reply}")
        command = self._pending.popleft()
        if reply.code // 100 == 3 and command != "DATA":
            raise RemoteProtocolError(f"intermediate reply {reply.code} to {command}")
        if reply.code == 421:
            self._close_by_server()
            return
        ok = reply.positive
        if command == "GREETING":
            self.state = State.GREETED if ok else State.REFUSED
        elif command in ("EHLO", "HELO"):
            if ok:
                self.extensions = _parse_ehlo(reply) if command == "EHLO" else {}
                self.state = State.READY
        elif command == "STARTTLS":
            if ok:
                if self._buf:
                    raise RemoteProtocolError(
                        "server sent data after its STARTTLS reply, before TLS started")
                self.tls = True
                self.extensions = {}
                self.state = State.GREETED
        elif command == "XCLIENT":
            if ok:
                self.state = State.GREETED       # session reset: EHLO again
        elif command == "MAIL":
            self._mail_ok = ok
        elif command == "RCPT":
            if ok:
                self.rcpts_accepted += 1
        elif command == "DATA":
            if reply.code == 354:
                self.state = State.BODY
                self._encoder = DataEncoder(crlf_checked=self.crlf_checked)
            elif ok:
                raise RemoteProtocolError(f"reply {reply.code} to DATA, expected 354")
            else:
                self.state = State.MAIL if self._mail_ok else State.READY
        elif command == ".":
            if ok:
                self.messages_sent += 1
        # RSET, XFORWARD, NOOP, QUIT: the state was set when they were sent.
        if not self._pending and self.state is State.MAIL and not self._mail_ok:
            self.state = State.READY         # MAIL was refused: no transaction open

    def _close_by_server(self) -> None:
        self._pending.clear()
        self.state = State.CLOSED
        self._encoder = None

    # ---- commands -----------------------------------------------------

    def _command(self, verb: str, allowed: Iterable[State]) -> None:
        """Check that ``verb`` may be sent now (state and pipelining)."""
        if self._broken is not None:
            raise LocalProtocolError(f"connection is broken: {self._broken}")
        if self.state not in allowed:
            raise LocalProtocolError(f"{verb} not allowed in state {self.state.name}")
        if self._pending and not (self.pipelining
                                  and all(c in _GROUP_MIDDLE for c in self._pending)):
            raise LocalProtocolError(
                f"{verb} must wait for the reply to {self._pending[-1]}")

    def _emit(self, verb: str, line: str) -> bytes:
        self._pending.append(verb)
        return line.encode("utf-8") + b"\r\n"

    def ehlo(self, name: str) -> bytes:
        return self._hello("EHLO", name)

    def helo(self, name: str) -> bytes:
        return self._hello("HELO", name)

    def _hello(self, verb: str, name: str) -> bytes:
        self._command(verb, (State.GREETED, State.READY))
        if not _DOMAIN_ARG.match(name):
            raise LocalProtocolError(f"bad {verb} name: {name!r}")
        return self._emit(verb, f"{verb} {name}")

    def starttls(self) -> bytes:
        self._command("STARTTLS", (State.READY,))
        if self.tls:
            raise LocalProtocolError("TLS is already active")
        if "STARTTLS" not in self.extensions:
            raise LocalProtocolError("the server did not offer STARTTLS")
        return self._emit("STARTTLS", "STARTTLS")

    def attribute_groups(self, verb: str, attrs: Mapping[str, str]) -> list[dict[str, str]]:
        """Split ``attrs`` for XCLIENT or XFORWARD into groups that each fit
        one command line, keeping only the attributes the server offered.

        Returns ``[]`` when the server offered none of them (or not the
        command at all).  Values are given decoded; they are encoded when the
        command is built.
        """
        verb = verb.upper()
        offered = self.attributes_offered(verb)
        groups: list[dict[str, str]] = []
        length = MAX_COMMAND_LINE          # forces a new group for the first item
        for name, value in attrs.items():
            name = name.upper()
            if name not in offered:
                continue
            item = len(name) + 2 + len(xtext_encode(value))            # " NAME=value"
            if len(verb) + item + 2 > MAX_COMMAND_LINE:
                value = UNAVAILABLE
                item = len(name) + 2 + len(value)
            if length + item + 2 > MAX_COMMAND_LINE:
                groups.append({})
                length = len(verb)
            groups[-1][name] = value
            length += item
        return groups

    def _attribute_command(self, verb: str, attrs: Mapping[str, str]) -> str:
        offered = self.attributes_offered(verb)
        items = [f"{name.upper()}={xtext_encode(value)}" for name, value in attrs.items()
                 if name.upper() in offered]
        if not items:
            raise LocalProtocolError(f"no {verb} attribute that the server accepts")
        line = " ".join([verb, *items])
        if len(line) + 2 > MAX_COMMAND_LINE:
            raise LocalProtocolError(
                f"{verb} line longer than {MAX_COMMAND_LINE} bytes; use attribute_groups()")
        return line

    def xclient(self, attrs: Mapping[str, str]) -> bytes:
        """One XCLIENT command with the offered attributes of ``attrs``.

        Values are decoded text (``"[UNAVAILABLE]"`` for an unknown value).
        The server answers 220 and resets the session: send EHLO again.
        """
        self._command("XCLIENT", (State.GREETED, State.READY))
        if "XCLIENT" not in self.extensions:
            raise LocalProtocolError("the server did not offer XCLIENT")
        return self._emit("XCLIENT", self._attribute_command("XCLIENT", attrs))

    def xforward(self, attrs: Mapping[str, str]) -> bytes:
        """One XFORWARD command, sent before MAIL; the server answers 250."""
        self._command("XFORWARD", (State.READY,))
        if "XFORWARD" not in self.extensions:
            raise LocalProtocolError("the server did not offer XFORWARD")
        return self._emit("XFORWARD", self._attribute_command("XFORWARD", attrs))

    def mail(self, sender: str, *, size: int | None = None, body: str | None = None,
             smtputf8: bool = False, ret: str | None = None,
             envid: str | None = None) -> bytes:
        """MAIL FROM:<sender> with the parameters the server supports.

        ``smtputf8`` is sent only when offered; without it, a non-ASCII
        ``sender`` (and later recipient) is a :class:`LocalProtocolError`.
        ``body`` is "7BIT" or "8BITMIME".  ``ret`` ("FULL"/"HDRS") and
        ``envid`` (decoded) need DSN.
        """
        self._command("MAIL", (State.READY,))
        ext = self.extensions
        utf8 = smtputf8 and "SMTPUTF8" in ext
        _check_text("sender", sender)
        if not utf8 and not sender.isascii():
            raise LocalProtocolError(f"non-ASCII sender without SMTPUTF8: {sender!r}")
        params = []
        if size is not None and "SIZE" in ext:
            if size < 0:
                raise LocalProtocolError(f"negative SIZE: {size}")
            params.append(f"SIZE={size}")
        if body is not None:
            body = body.upper()
            if body not in ("7BIT", "8BITMIME"):
                raise LocalProtocolError(f"unsupported BODY type: {body!r}")
            if "8BITMIME" in ext:
                params.append(f"BODY={body}")
        if utf8:
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if ret is not None:
                ret = ret.upper()
                if ret not in ("FULL", "HDRS"):
                    raise LocalProtocolError(f"bad RET value: {ret!r}")
                params.append(f"RET={ret}")
            if envid is not None:
                params.append(f"ENVID={xtext_encode(envid)}")
        line = " ".join([f"MAIL FROM:<{sender}>", *params])
        data = self._emit("MAIL", line)
        self.state = State.MAIL
        self._mail_ok = True
        self._rcpts_sent = 0
        self.rcpts_accepted = 0
        self._utf8 = utf8
        return data

    def rcpt(self, address: str, *, notify: Iterable[str] | None = None,
             orcpt: str | None = None) -> bytes:
        """RCPT TO:<address>; NOTIFY and ORCPT (decoded, "type;address") need DSN."""
        self._command("RCPT", (State.MAIL,))
        _check_text("recipient", address)
        if not address:
            raise LocalProtocolError("empty recipient address")
        if not self._utf8 and not address.isascii():
            raise LocalProtocolError(f"non-ASCII recipient without SMTPUTF8: {address!r}")
        params = []
        if "DSN" in self.extensions:
            if notify is not None:
                values = [n.upper() for n in notify]
                if not values or not (values == ["NEVER"] or set(values) <= _NOTIFY):
                    raise LocalProtocolError(f"bad NOTIFY value: {notify!r}")
                params.append("NOTIFY=" + ",".join(values))
            if orcpt is not None:
                addr_type, sep, original = orcpt.partition(";")
                if not sep:
                    addr_type, original = "rfc822", orcpt
                if not _EHLO_KEYWORD.match(addr_type):
                    raise LocalProtocolError(f"bad ORCPT address type: {orcpt!r}")
                params.append(f"ORCPT={addr_type};{xtext_encode(original)}")
        data = self._emit("RCPT", " ".join([f"RCPT TO:<{address}>", *params]))
        self._rcpts_sent += 1
        return data

    def data(self) -> bytes:
        """DATA, after at least one RCPT was sent.  After 354, write the
        message with :meth:`send_data` and :meth:`end_data`."""
        self._command("DATA", (State.MAIL,))
        if self._rcpts_sent == 0:
            raise LocalProtocolError("DATA without any RCPT")
        return self._emit("DATA", "DATA")

    def send_data(self, chunk: bytes) -> bytes:
        """Encode a piece of the message (dot-stuffed, CRLF line ends)."""
        if self.state is not State.BODY or self._encoder is None:
            raise LocalProtocolError(f"message data not allowed in state {self.state.name}")
        return self._encoder.encode(chunk)

    def end_data(self) -> bytes:
        """Finish the message: final CRLF if needed and the "." line."""
        if self.state is not State.BODY or self._encoder is None:
            raise LocalProtocolError(f"end of data not allowed in state {self.state.name}")
        data = self._encoder.finish()
        self._encoder = None
        self._pending.append(".")
        self.state = State.READY
        return data

    def rset(self) -> bytes:
        self._command("RSET", (State.READY, State.MAIL))
        data = self._emit("RSET", "RSET")
        self.state = State.READY
        return data

    def noop(self) -> bytes:
        self._command("NOOP", (State.GREETED, State.READY, State.MAIL))
        return self._emit("NOOP", "NOOP")

    def quit(self) -> bytes:
        self._command("QUIT", (State.GREETED, State.READY, State.MAIL, State.REFUSED))
        data = self._emit("QUIT", "QUIT")
        self.state = State.CLOSED
        return data


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """Keywords of an EHLO reply (lines after the first), upper-cased."""
    extensions: dict[str, str] = {}
    for line in reply.lines()[1:]:
        keyword, _, rest = line.strip().partition(" ")
        if _EHLO_KEYWORD.match(keyword):
            extensions[keyword.upper()] = rest.strip()
    return extensions


class DataEncoder:
    """Turn message content into DATA wire bytes, one chunk at a time.

    Every line end becomes CRLF (a bare CR or LF is taken as a line end, so
    no "\\n.\\n"-style terminator can reach a lenient server: SMTP
    smuggling), a "." at the start of a line is doubled (RFC 5321 4.5.2),
    and :meth:`finish` adds the final CRLF if missing and the "." line.  The
    work is a few bytes scans per chunk, never Python work per line.  A CR
    ending a chunk is held back until the next byte shows whether it starts
    a CRLF, and whether the output so far ends a line is remembered, so a
    chunk boundary anywhere gives the same bytes as no boundary.
    """

    _LINE_END = re.compile(rb"\r\n|\r|\n")

    def __init__(self, *, crlf_checked: bool = False) -> None:
        self._line_start = True  # the content starts at the beginning of a line
        self._held_cr = False    # a CR ended the last chunk: is it part of CRLF?
        # The content is known to hold no bare CR or LF (checked by our server
        # core as it arrived): skip the three line-end counts per chunk.
        self._crlf_checked = crlf_checked

    def encode(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if not self._crlf_checked:
            crlf = chunk.count(b"\r\n")
            if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
                chunk = self._LINE_END.sub(b"\r\n", chunk)
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        # Normalised output never ends in a bare CR, so the only line start
        # that straddles two chunks is a "." right after a chunk ending in CRLF.
        if self._line_start and chunk[:1] == b".":
            stuffed = b"." + stuffed
        self._line_start = chunk.endswith(b"\r\n")
        return stuffed

    def finish(self) -> bytes:
        out = self.encode(b"\n") if self._held_cr else b""     # a final bare CR ends a line
        if not self._line_start:
            out += b"\r\n"
        self._line_start = True
        return out + b".\r\n"
