"""The SMTP server as a state machine without I/O (RFC 5321, with ESMTP extensions).

Bytes go in with :meth:`ServerConnection.receive_data`, events come out of
:meth:`~ServerConnection.next_event`, the application answers decision events
with :meth:`~ServerConnection.respond`, and reply bytes come out of
:meth:`~ServerConnection.data_to_send`.  The core never touches a socket, a
clock or a thread; :mod:`shared.transport.server` adapts it to Twisted.

TRUST: every input byte comes from an untrusted peer.  Bad input never raises:
it gets an SMTP reply (and, past ``hard_error_limit``, a 421 and a close).  Only
misuse by the application raises :class:`LocalProtocolError`.  XCLIENT and
XFORWARD are honoured only when the adapter says the peer is a trusted
upstream (``xclient_allowed``).  AUTH is offered only with the mechanisms the
adapter passes (``auth_mechanisms``), and by default only over TLS: a plaintext
AUTH is refused 538 5.7.11 before any credential is looked at.

Who answers what
----------------
The core itself answers everything that depends only on syntax and sequence
(500, 501, 502, 503, 555, NOOP, RSET, VRFY, QUIT, the 250 to a BDAT chunk that
is not the last...).  At each point where policy decides (HELO/EHLO, STARTTLS,
MAIL, RCPT, DATA or the first BDAT of a message, end of data, XCLIENT,
XFORWARD, AUTH and each AUTH response) it emits a decision event and parses
nothing more until ``respond()`` is called.  Pipelined commands stay in the
input buffer meanwhile, so replies always leave in command order, however slowly
the application answers.

States and commands (the transition table)
------------------------------------------
::

    GREETING   --send_greeting(220)-->  CONNECTED   (4xx/5xx greeting --> CLOSED)
    CONNECTED  --HELO/EHLO ok-------->  READY
    READY      --MAIL ok------------->  MAIL        (HELO/EHLO again: stays READY)
    MAIL       --RCPT ok------------->  RCPT
    RCPT       --RCPT ok------------->  RCPT
    RCPT       --DATA, 354----------->  DATA
    DATA       --<CRLF>.<CRLF>------->  READY       (DataEnd or DataAborted)
    RCPT       --BDAT, ok------------>  CHUNK       (DataStart(bdat=True) first; no 354)
    BDAT       --BDAT---------------->  CHUNK
    CHUNK      --its octets---------->  BDAT        (250 <n> octets received)
    CHUNK      --its octets, LAST---->  READY       (DataEnd or DataAborted)
    CHUNK      --its octets, bad----->  READY       (DataAborted; see Framing)
    MAIL, RCPT, BDAT --RSET, HELO/EHLO-->  READY    (Reset event first)
    any but DATA, CHUNK --RSET------->  READY, or CONNECTED without HELO
    CONNECTED, READY --STARTTLS, 220->  TLS  --tls_started()-->  CONNECTED   (454: stays)
    CONNECTED, READY --XCLIENT ok---->  CONNECTED   (fresh 220 greeting)
    READY      --AUTH, 334----------->  AUTH  --response line--> (decision) --334--> AUTH
    AUTH       --235----------------->  READY, authenticated    (4xx/5xx, "*": READY)
    any        --QUIT, EOF, error limit, HTTP verb, a 421 answer-->  CLOSED

    command      needs                         else
    MAIL         HELO/EHLO, no transaction     503 5.5.1
    RCPT         MAIL                          503 5.5.1
    DATA         an accepted RCPT, no BDAT     554 5.5.1 (RCPTs all refused) / 503 5.5.1
    BDAT         an accepted RCPT              554 5.5.1 (RCPTs all refused) / 503 5.5.1
    RCPT         no BDAT yet                   503 5.5.1
    STARTTLS     offered, no transaction       502 5.5.1 / 503 5.5.1
    XCLIENT      trusted peer, no transaction  550 5.7.0 / 503 5.5.1
    XFORWARD     trusted peer, no transaction  550 5.7.0 / 503 5.5.1
    AUTH         offered; TLS (auth_tls_only);  503 5.5.1 / 538 5.7.11 /
                 EHLO; not yet authenticated;  503 5.5.1 / 503 5.5.1 /
                 no transaction; a mechanism   503 5.5.1 / 504 5.5.4
                 offered
    MAIL also    TLS when require_tls;          530 5.7.0
                 AUTH when require_auth        530 5.7.0

An AUTH response line may be up to ``AUTH_LINE`` octets (RFC 4954 4: 12288); it
is "*" (cancel: 501 5.0.0) or base64 (else 501 5.5.2), never a command.

Framing
-------
Command lines end with CRLF; a bare LF is accepted too (as Postfix does), a
bare CR never.  In DATA only ``<CRLF>.<CRLF>`` ends the message (the content
starts as if preceded by CRLF): ``<LF>.<LF>``, ``<CR>.<CR>`` and the mixed
forms never end it.  Content is scanned with C-level bytes operations, never
line by line in Python.  A bare CR or LF, an over-long line or an oversized
message makes the core stop handing out content; at the real end of data it
replies once and emits :class:`DataAborted`.  A line-start dot is removed from
every line (RFC 5321 4.5.2), which undoes dot-stuffing.

BDAT (CHUNKING, RFC 3030) frames by count: exactly ``<size>`` octets after the
CRLF of ``BDAT <size> [LAST]`` are content, whatever they hold, and are never
looked at for commands -- nor are those of a BDAT the core or the application
refuses: they are read and thrown away.  (A BDAT line with bad syntax is a 501
whose octets are skipped when its first word is a size; without one there is
no telling where they end, and what follows is read as commands.)  There is no
dot-stuffing to undo and no terminator to look for; the content goes through
the same checks as DATA's, with the scanning state carried from chunk to chunk
(a CRLF may straddle two chunks).  A message that does not end with CRLF gets
one, as a DATA message always has.  Content is handed out as it arrives, so a
chunk of any size streams.  A content problem is answered once, at the end of
the chunk where it shows (RFC 3030 2: the octets are read, then the reply), and
ends the transaction with :class:`DataAborted`; a refused first BDAT leaves the
transaction open, as a refused DATA does.  Either way the chunks of that
message still on their way (pipelined, up to its LAST) get the same reply and
are skipped, counted as junk commands rather than errors, so that a client
which checks only its last reply still sees the failure, and no later chunk
becomes a message with its beginning missing.  An empty chunk that is not the
last moves no mail either: it counts as a junk command too.
"""
from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from dataclasses import dataclass

from . import events as ev
from .events import NEED_DATA, PAUSED, Event, LocalProtocolError
from .reply import Reply
from .syntax import (AddressError, ParameterError, parse_attributes, parse_envid, parse_notify,
                     parse_orcpt, parse_params, parse_path, split_path)

__all__ = ["ServerConfig", "ServerConnection", "State", "NEED_DATA", "PAUSED", "LocalProtocolError",
           "challenge"]


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    max_message_size: int = 10_240_000      # advertised with SIZE; 0 = no limit
    max_command_line: int = 2048            # octets including CRLF
    max_data_line: int = 1000               # octets including CRLF; 0 = no limit
    max_recipients: int = 1000              # per transaction; 0 = no limit
    hard_error_limit: int = 20              # client-caused 4xx/5xx replies before 421; 0 = no limit
    junk_command_limit: int = 100           # NOOP/RSET/VRFY/HELP before each one counts as an error; 0 = no limit
    max_buffered_input: int = 65536         # the adapter stops reading above this
    smtputf8: bool = True
    banner: str = "ESMTP"

    def __post_init__(self) -> None:
        if not self.hostname or re.search(r"[\s\x00-\x1f\x7f]", self.hostname):
            raise ValueError(f"bad server hostname {self.hostname!r}")
        if re.search(r"[\r\n]", self.banner):
            raise ValueError("banner must be one line")
        if self.max_command_line < 512:
            raise ValueError("max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)")
        for name in ("max_message_size", "max_data_line", "max_recipients", "hard_error_limit",
                     "junk_command_limit", "max_buffered_input"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class State(enum.Enum):
    GREETING = "greeting"      # connected, send_greeting() not called yet
    CONNECTED = "connected"    # greeted; HELO/EHLO needed
    READY = "ready"            # HELO/EHLO accepted, no mail transaction
    MAIL = "mail"              # MAIL accepted, no recipient accepted yet
    RCPT = "rcpt"              # at least one recipient accepted
    DATA = "data"              # reading message content
    BDAT = "bdat"              # a BDAT chunk accepted and read; the next one (or RSET...) awaited
    CHUNK = "chunk"            # reading the octets of an accepted BDAT chunk
    TLS = "tls"                # 220 to STARTTLS sent; waiting for tls_started()
    AUTH = "auth"              # 334 sent: the next line is the client's AUTH response
    CLOSED = "closed"          # closing; nothing more is parsed


# -- replies the core gives itself ----------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
DATA_GO_AHEAD = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
TLS_GO_AHEAD = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_REPLY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
AUTH_NOT_ENABLED = Reply(502, "5.5.1", "Error: authentication not enabled")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
AUTH_UNSUPPORTED = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad parameter syntax")
NO_PARAMETERS_AFTER_HELO = Reply(555, "5.5.4", "Parameters not allowed after HELO, use EHLO")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
NOT_AUTHORIZED = Reply(550, "5.7.0", "Insufficient authorization")
BARE_NEWLINE = Reply(554, "5.6.0", "Message contains bare CR or LF")
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message line too long")
HTTP_REFUSED = Reply(221, "2.7.0", "Error: this is an SMTP server, not an HTTP server")

# Postfix's XCLIENT attributes, and TLS (ours: the original client's TLS protocol and cipher).
XCLIENT_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT", "TLS")
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XCLIENT_SET = frozenset(XCLIENT_ATTRS)
_XFORWARD_SET = frozenset(XFORWARD_ATTRS)

# Verbs that mean a browser (or a cross-protocol attack) is talking to us.
_HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT"})

_CRLF = b"\r\n"
_TERMINATOR = b"\r\n.\r\n"
_CONTROL_IN_COMMAND = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # TAB tolerated
_DIGITS = re.compile(r"[0-9]{1,20}")
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.IGNORECASE)
_BDAT_SIZE = re.compile(r"[0-9]{1,20}(?= |$)")        # a size readable in a bad BDAT line
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
AUTH_LINE = 12288                  # octets of an AUTH response line, CRLF included (RFC 4954 4)


def challenge(data: bytes) -> Reply:
    """The 334 continuation carrying `data` (base64-encoded; empty data: "334 ")."""
    return Reply(334, None, base64.b64encode(data).decode("ascii"))


def decode_base64(text: bytes) -> bytes | None:
    """Strict base64 (RFC 4648 alphabet, padding, nothing else), or None."""
    if len(text) % 4 or not _BASE64.fullmatch(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class ServerConnection:
    """One SMTP session, server side.  See the module docstring for the protocol."""

    def __init__(self, config: ServerConfig, *, tls_available: bool = False, tls_active: bool = False,
                 xclient_allowed: bool = False, auth_mechanisms: tuple[str, ...] = (),
                 auth_tls_only: bool = True, require_tls: bool = False, require_auth: bool = False) -> None:
        """`auth_mechanisms`: the SASL mechanisms to offer (none: AUTH is not enabled);
        `auth_tls_only`: offer and take AUTH only over TLS; `require_tls` and
        `require_auth`: MAIL needs TLS / a successful AUTH first (530 5.7.0), as on
        a submission port (RFC 6409, RFC 8314)."""
        self.config = config
        self._tls_available = tls_available
        self._tls_active = tls_active
        self._xclient_allowed = xclient_allowed
        self._auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self._auth_tls_only = auth_tls_only
        self._require_tls = require_tls
        self._require_auth = require_auth
        self._authenticated = False
        self._state = State.GREETING
        self._buf = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._closing = False
        self._eof = False
        self._skip_line = False          # discarding the rest of an over-long command line
        self._errors = 0
        self._junk = 0                   # commands that move no mail (NOOP, RSET, VRFY, HELP)
        self._helo: str | None = None
        self._esmtp = False
        # mail transaction
        self._smtputf8 = False
        self._rcpt_tried = 0
        self._rcpt_accepted = 0
        # DATA scanning, carried across chunks
        self._prev2 = _CRLF              # the last two content octets (initially a virtual CRLF)
        self._line_len = 0               # octets of the current unterminated line
        self._size = 0                   # unstuffed octets so far
        self._bad_newline = False
        self._long_line = False
        self._too_big = False
        # BDAT
        self._chunk_left = 0             # octets of the current chunk not yet read (content or skipped)
        self._chunk_size = 0
        self._chunk_last = False
        self._chunking = False           # the transaction has had a BDAT: no DATA, no RCPT now
        self._chunk_failure: Reply | None = None   # said to the rest of a failed message's chunks

    # -- properties ----------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def buffered(self) -> int:
        """Input octets received but not yet processed."""
        return len(self._buf)

    @property
    def chunk_ahead(self) -> int:
        """Octets of the current BDAT chunk still to come: input that will be read as
        it is, never as commands (0 when no chunk is being read)."""
        return max(0, self._chunk_left - len(self._buf))

    @property
    def closing(self) -> bool:
        """The core wants the connection closed once data_to_send() is flushed."""
        return self._closing

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def helo(self) -> str | None:
        return self._helo

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def errors(self) -> int:
        """Client-caused errors so far (they start over after a delivered message)."""
        return self._errors

    @property
    def authenticated(self) -> bool:
        """A 235 was given to AUTH in this session (since the last STARTTLS or XCLIENT)."""
        return self._authenticated

    @property
    def in_transaction(self) -> bool:
        return self._state in (State.MAIL, State.RCPT, State.DATA, State.BDAT, State.CHUNK)

    # -- the public verbs -----------------------------------------------------------
    def send_greeting(self, reply: Reply | None = None) -> None:
        """Send the 220 greeting (or a 4xx/5xx refusal, after which the session closes)."""
        if self._state is not State.GREETING:
            raise LocalProtocolError("greeting already sent")
        if reply is None:
            reply = self._greeting()
        if reply.code == 220:
            self._write(reply)
            self._state = State.CONNECTED
        elif reply.code >= 400:
            self._write(reply)
            self._close()
        else:
            raise LocalProtocolError(f"a greeting must be 220, 4xx or 5xx, not {reply.code}")

    def receive_data(self, data: bytes) -> None:
        """Feed octets from the peer; ``b""`` means the peer closed (EOF)."""
        if self._closing or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._skip_line:
            data = bytes(data)
            nl = data.find(b"\n")
            if nl < 0:
                return
            self._skip_line = False
            data = data[nl + 1:]
        self._buf += data

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """The next event, or NEED_DATA (input used up) or PAUSED (waiting on the application)."""
        if self._events:
            return self._events.popleft()
        if self._closing or self._pending is not None:
            return PAUSED
        if self._eof:
            self._buf.clear()
            self._clear_transaction()
            self._close()
            return ev.ConnectionClosed()
        if self._state is State.GREETING or self._state is State.TLS:
            return PAUSED
        while not self._events and self._pending is None and not self._closing \
                and self._state is not State.TLS:
            state = self._state
            step = (self._data_step if state is State.DATA else
                    self._chunk_step if state is State.CHUNK else self._command_step)
            if not step():
                break
        if self._events:
            return self._events.popleft()
        if self._closing or self._pending is not None or self._state is State.TLS:
            return PAUSED
        return NEED_DATA

    def respond(self, reply: Reply | None = None) -> None:
        """Answer the pending decision event; ``None`` is the standard positive reply."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("no decision is pending")
        if reply is None:
            reply = self._standard_reply(event)
        elif not isinstance(reply, Reply):
            raise LocalProtocolError(f"respond() wants a Reply or None, not {type(reply).__name__}")
        bdat = isinstance(event, ev.DataStart) and event.bdat
        if isinstance(event, ev.DataStart):
            if reply.code < 400 and reply.code != 354 and not bdat:
                raise LocalProtocolError("a positive answer to DATA must be 354")
        elif isinstance(event, (ev.AuthStart, ev.AuthResponse)):
            if reply.code < 400 and reply.code not in (235, 334):
                raise LocalProtocolError(f"{reply.code} is not an answer to AUTH (235, 334 or 4xx/5xx)")
        elif isinstance(event, ev.StartTLSRequest):
            if reply.code < 400 and reply.code != 220:
                raise LocalProtocolError("a positive answer to STARTTLS must be 220")
        elif 300 <= reply.code < 400:
            raise LocalProtocolError(f"{reply.code} is not an answer to {type(event).__name__}")
        self._pending = None
        if isinstance(event, (ev.AuthStart, ev.AuthResponse)):
            # 334: the next line is the client's answer; anything else ends the exchange.
            self._state = State.AUTH if reply.code == 334 else State.READY
            if reply.code == 235:
                self._authenticated = True
        if reply.code < 400:
            if not bdat:                         # BDAT goes on without a word (RFC 3030 2)
                self._write(reply)
            self._accepted(event)
            return
        self._write(reply)
        if reply.code == 421:                    # "closing transmission channel" (RFC 5321 4.2.2)
            self._clear_transaction()
            self._close()
            return
        self._count_error()
        if bdat:                                 # its octets are skipped, and the message's next chunks
            self._chunking = True
            if not self._chunk_last:
                self._chunk_failure = reply

    def tls_started(self) -> None:
        """The adapter has switched the transport to TLS after a StartTLS event."""
        if self._state is not State.TLS:
            raise LocalProtocolError("tls_started() without a StartTLS event")
        self._tls_active = True
        self._helo = None
        self._esmtp = False
        self._authenticated = False     # RFC 3207 4.2: forget what the plaintext session said
        self._state = State.CONNECTED

    def data_to_send(self) -> bytes:
        """Drain the reply octets produced so far."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- internals: output, errors, session state ----------------------------------
    def _write(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _error(self, reply: Reply) -> None:
        """A 4xx/5xx reply caused by the client."""
        self._write(reply)
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        limit = self.config.hard_error_limit
        if limit and self._errors >= limit and not self._closing:
            self._write(Reply(421, "4.7.0", f"{self.config.hostname} Error: too many errors"))
            self._clear_transaction()
            self._close()
            self._events.append(ev.TooManyErrors())

    def _close(self) -> None:
        self._closing = True
        self._state = State.CLOSED
        self._buf.clear()

    def _greeting(self) -> Reply:
        banner = f" {self.config.banner}" if self.config.banner else ""
        return Reply(220, None, f"{self.config.hostname}{banner}")

    def _ehlo_reply(self) -> Reply:
        c = self.config
        lines = [c.hostname, "PIPELINING", f"SIZE {c.max_message_size}" if c.max_message_size else "SIZE",
                 "8BITMIME"]
        if c.smtputf8:
            lines.append("SMTPUTF8")
        lines += ["ENHANCEDSTATUSCODES", "DSN", "CHUNKING"]
        if self._tls_available and not self._tls_active:
            lines.append("STARTTLS")
        if self._auth_offered() and not self._authenticated:
            lines.append("AUTH " + " ".join(self._auth_mechanisms))
        if self._xclient_allowed:
            lines.append("XCLIENT " + " ".join(XCLIENT_ATTRS))
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRS))
        return Reply(250, None, "\n".join(lines))

    def _standard_reply(self, event: Event) -> Reply:
        if isinstance(event, ev.Hello):
            return self._ehlo_reply() if event.verb == "EHLO" else Reply(250, None, self.config.hostname)
        if isinstance(event, ev.MailFrom):
            return MAIL_OK
        if isinstance(event, ev.RcptTo):
            return RCPT_OK
        if isinstance(event, ev.DataStart):
            return DATA_GO_AHEAD
        if isinstance(event, ev.XClient):
            return self._greeting()
        if isinstance(event, ev.XForward):
            return OK
        if isinstance(event, ev.StartTLSRequest):
            return TLS_GO_AHEAD
        raise LocalProtocolError(f"{type(event).__name__} has no standard reply; answer it explicitly")

    def _accepted(self, event: Event) -> None:
        """The application said yes to `event`: move the state machine on."""
        if isinstance(event, ev.Hello):
            self._helo = event.domain
            self._esmtp = event.verb == "EHLO"
            self._state = State.READY
        elif isinstance(event, ev.MailFrom):
            self._smtputf8 = event.smtputf8
            self._rcpt_tried = self._rcpt_accepted = 0
            self._chunk_failure = None
            self._state = State.MAIL
        elif isinstance(event, ev.RcptTo):
            self._rcpt_accepted += 1
            self._state = State.RCPT
        elif isinstance(event, ev.DataStart):
            self._state = State.CHUNK if event.bdat else State.DATA
            self._chunking = event.bdat
            self._prev2 = _CRLF
            self._line_len = self._size = 0
            self._bad_newline = self._long_line = self._too_big = False
        elif isinstance(event, ev.DataEnd):
            self._errors = self._junk = 0     # mail was delivered: the counts start over
        elif isinstance(event, ev.StartTLSRequest):
            # Whatever followed STARTTLS in plaintext must not be read as if it came over TLS.
            self._buf.clear()
            self._state = State.TLS
            self._events.append(ev.StartTLS())
        elif isinstance(event, ev.XClient):
            self._helo = None          # the session starts over as the original client's
            self._esmtp = False
            self._authenticated = False
            self._errors = self._junk = 0
            self._state = State.CONNECTED

    def _clear_transaction(self) -> None:
        self._smtputf8 = False
        self._rcpt_tried = self._rcpt_accepted = 0
        self._chunking = False
        self._chunk_failure = None
        if self.in_transaction:
            self._state = State.READY

    def _decide(self, event: Event) -> None:
        self._pending = event
        self._events.append(event)

    # -- command mode ---------------------------------------------------------------
    def _command_step(self) -> bool:
        """Handle one command line from the buffer; False when no complete line is there."""
        buf = self._buf
        if self._chunk_left:                   # the octets of a refused BDAT chunk: skipped
            n = min(self._chunk_left, len(buf))
            del buf[:n]
            self._chunk_left -= n
            if self._chunk_left:
                return False
        auth = self._state is State.AUTH
        limit = max(AUTH_LINE, self.config.max_command_line) if auth else self.config.max_command_line
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) < limit:
                return False
            buf.clear()                # it can no longer fit: cut it, skip the rest of it
            self._skip_line = True
            self._error(LINE_TOO_LONG)
            return True
        line = bytes(buf[:nl])
        del buf[:nl + 1]
        if nl + 1 > limit:
            self._error(LINE_TOO_LONG)
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if auth:
            self._auth_response(line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        if not line.strip(b" \t") or _CONTROL_IN_COMMAND.search(line):
            self._error(BAD_SYNTAX)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(BAD_UTF8)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper() if verb.isascii() else ""
        handler = _COMMANDS.get(verb)
        if handler is not None:
            handler(self, verb, arg.strip(" "))
        elif verb in _HTTP_VERBS:
            self._write(HTTP_REFUSED)
            self._clear_transaction()
            self._close()
        else:
            self._error(UNKNOWN_COMMAND)

    def _cmd_hello(self, verb: str, arg: str) -> None:
        if not arg or " " in arg:
            self._error(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        if self.in_transaction:
            self._clear_transaction()
            self._events.append(ev.Reset())
        self._decide(ev.Hello(verb, arg))

    def _cmd_mail(self, verb: str, arg: str) -> None:
        if self._helo is None:
            return self._error(NEED_HELO)
        if self._state is not State.READY:
            return self._error(NESTED_MAIL)
        if self._require_tls and not self._tls_active:
            return self._error(NEED_STARTTLS)
        if self._require_auth and not self._authenticated:
            return self._error(NEED_AUTH)
        if not (arg[:5].isascii() and arg[:5].upper() == "FROM:"):
            return self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        try:
            path, param_text = split_path(arg[5:].lstrip(" "))
            sender = parse_path(path, allow_null=True, allow_utf8=True)
        except AddressError:
            return self._error(BAD_SENDER)
        params = self._params(param_text)
        if params is None:
            return
        values: dict = {}
        for name, value in params.items():
            if name == "SIZE" and value is not None and _DIGITS.fullmatch(value):
                values["size"] = int(value)
            elif name == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                values["body"] = value.upper()
            elif name == "SMTPUTF8" and value is None and self.config.smtputf8:
                values["smtputf8"] = True
            elif name == "RET" and value is not None and value.upper() in ("FULL", "HDRS"):
                values["ret"] = value.upper()
            elif name == "AUTH" and value is not None and self._auth_mechanisms:
                pass            # RFC 4954 5: who submitted it first; this hop says it by itself
            elif name == "ENVID" and value is not None:
                try:
                    values["envid"] = parse_envid(value)
                except ParameterError:
                    return self._error(Reply(501, "5.5.4", "Bad ENVID parameter"))
            elif name in ("SIZE", "BODY", "RET") or (name == "SMTPUTF8" and self.config.smtputf8):
                return self._error(Reply(501, "5.5.4", f"Bad {name} parameter"))
            else:
                return self._error(Reply(555, "5.5.4", f"Unsupported parameter {name[:32]}"))
        limit = self.config.max_message_size
        if limit and values.get("size", 0) > limit:
            return self._error(SIZE_EXCEEDED)
        if not sender.isascii() and not values.get("smtputf8"):
            return self._error(NEED_SMTPUTF8)
        self._decide(ev.MailFrom(sender, **values))

    def _cmd_rcpt(self, verb: str, arg: str) -> None:
        if self._chunking:
            return self._error(RCPT_AFTER_BDAT)
        if self._state not in (State.MAIL, State.RCPT):
            return self._error(NEED_MAIL)
        self._rcpt_tried += 1
        if not (arg[:3].isascii() and arg[:3].upper() == "TO:"):
            return self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        try:
            path, param_text = split_path(arg[3:].lstrip(" "))
            recipient = parse_path(path, allow_null=False, allow_utf8=True, allow_postmaster=True)
        except AddressError:
            return self._error(BAD_RECIPIENT)
        params = self._params(param_text)
        if params is None:
            return
        values: dict = {}
        for name, value in params.items():
            if name not in ("NOTIFY", "ORCPT"):
                return self._error(Reply(555, "5.5.4", f"Unsupported parameter {name[:32]}"))
            try:
                if value is None:
                    raise ParameterError("missing value")
                if name == "NOTIFY":
                    values["notify"] = parse_notify(value)
                else:
                    values["orcpt"] = parse_orcpt(value, allow_utf8=self._smtputf8)
            except ParameterError:
                return self._error(Reply(501, "5.5.4", f"Bad {name} parameter"))
        if not recipient.isascii() and not self._smtputf8:
            return self._error(NEED_SMTPUTF8)
        limit = self.config.max_recipients
        if limit and self._rcpt_accepted >= limit:
            self._write(TOO_MANY_RECIPIENTS)     # flow control (RFC 5321 4.5.3.1.10), not an error
            return
        self._decide(ev.RcptTo(recipient, **values))

    def _params(self, text: str) -> dict[str, str | None] | None:
        """Parse MAIL/RCPT parameters, or reply with the error and return None."""
        try:
            params = parse_params(text)
        except ParameterError:
            self._error(BAD_PARAMETER)
            return None
        if params and not self._esmtp:
            self._error(NO_PARAMETERS_AFTER_HELO)
            return None
        return params

    def _message_refusal(self) -> Reply | None:
        """Why DATA or a first BDAT cannot begin a message now, or None."""
        if self._state not in (State.MAIL, State.RCPT):
            return NEED_RCPT
        if self._rcpt_accepted == 0:
            return NO_VALID_RECIPIENTS if self._rcpt_tried else NEED_RCPT
        return None

    def _cmd_data(self, verb: str, arg: str) -> None:
        if self._chunking:                     # RFC 3030 2: not both in one transaction
            return self._error(DATA_AFTER_BDAT)
        refusal = self._message_refusal()
        if refusal is not None:
            return self._error(refusal)
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: DATA"))
        self._decide(ev.DataStart())

    def _cmd_bdat(self, verb: str, arg: str) -> None:
        m = _BDAT_ARGS.fullmatch(arg)
        if m is None:
            size = _BDAT_SIZE.match(arg)
            self._chunk_left = int(size.group()) if size else 0
            return self._error(BDAT_SYNTAX)
        size, last = int(m.group(1)), m.group(2) is not None
        self._chunk_left = size                # read as content if the chunk is taken, else skipped
        if self._chunk_failure is not None:    # a chunk of a message already refused
            self._write(self._chunk_failure)
            if last:
                self._chunk_failure = None
            self._count_junk()
            return
        if self._state is not State.BDAT:
            refusal = self._message_refusal()
            if refusal is not None:
                return self._error(refusal)
        self._chunk_size, self._chunk_last = size, last
        if self._state is State.BDAT:
            self._state = State.CHUNK
        else:
            self._decide(ev.DataStart(bdat=True))

    def _cmd_rset(self, verb: str, arg: str) -> None:
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: RSET"))
        self._clear_transaction()
        self._write(OK)
        self._events.append(ev.Reset())
        self._count_junk()

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._write(OK)
        self._count_junk()

    def _count_junk(self) -> None:
        """A client that only talks (a flood of NOOPs, RSETs...) keeps a session for
        nothing: past ``junk_command_limit`` such commands, each counts as an error,
        so the error limit ends the session (Postfix's smtpd_junk_command_limit)."""
        self._junk += 1
        limit = self.config.junk_command_limit
        if limit and self._junk > limit:
            self._count_error()

    def _cmd_quit(self, verb: str, arg: str) -> None:
        self._write(BYE)
        self._clear_transaction()
        self._close()
        self._events.append(ev.Quit())

    def _cmd_vrfy(self, verb: str, arg: str) -> None:
        if not arg:
            return self._error(Reply(501, "5.5.4", "Syntax: VRFY address"))
        self._write(VRFY_REPLY)
        self._count_junk()

    def _cmd_help(self, verb: str, arg: str) -> None:
        self._write(HELP_REPLY)
        self._count_junk()

    def _cmd_not_implemented(self, verb: str, arg: str) -> None:
        self._error(NOT_IMPLEMENTED)

    # -- AUTH (RFC 4954) ----------------------------------------------------------------
    def _auth_offered(self) -> bool:
        return bool(self._auth_mechanisms) and (self._tls_active or not self._auth_tls_only)

    def _cmd_auth(self, verb: str, arg: str) -> None:
        if not self._auth_mechanisms:
            return self._error(AUTH_NOT_ENABLED)
        if not self._auth_offered():          # before the argument is even looked at
            return self._error(AUTH_NEEDS_TLS)
        if not self._esmtp:
            return self._error(AUTH_NEEDS_EHLO)
        if self._authenticated:
            return self._error(ALREADY_AUTHENTICATED)
        if self.in_transaction:
            return self._error(IN_TRANSACTION)
        parts = arg.split(" ")
        if not parts[0] or len(parts) > 2:
            return self._error(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        mechanism = parts[0].upper()
        if mechanism not in self._auth_mechanisms:
            return self._error(AUTH_UNSUPPORTED)
        initial = None
        if len(parts) == 2:
            text = parts[1].encode("ascii", "replace")
            initial = b"" if text == b"=" else decode_base64(text)
            if initial is None or text == b"":
                return self._error(AUTH_BAD_BASE64)
        self._decide(ev.AuthStart(mechanism, initial))

    def _auth_response(self, line: bytes) -> None:
        """A line after a 334: the client's answer, "*" to cancel; never a command."""
        self._state = State.READY
        text = line.strip(b" \t")
        if text == b"*":
            reply = AUTH_CANCELLED
        else:
            data = decode_base64(text)
            if data is not None:
                self._state = State.AUTH        # until the application answers
                self._decide(ev.AuthResponse(data))
                return
            reply = AUTH_BAD_BASE64
        self._error(reply)
        self._events.append(ev.AuthAborted(reply))

    def _cmd_starttls(self, verb: str, arg: str) -> None:
        if self._tls_active:
            return self._error(TLS_ACTIVE)
        if not self._tls_available:
            return self._error(NOT_IMPLEMENTED)
        if arg:
            return self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.in_transaction:
            return self._error(IN_TRANSACTION)
        self._decide(ev.StartTLSRequest())

    def _cmd_xclient(self, verb: str, arg: str) -> None:
        self._x_command(verb, arg, _XCLIENT_SET, ev.XClient)

    def _cmd_xforward(self, verb: str, arg: str) -> None:
        self._x_command(verb, arg, _XFORWARD_SET, ev.XForward)

    def _x_command(self, verb: str, arg: str, allowed: frozenset[str], event_type) -> None:
        if not self._xclient_allowed:
            return self._error(NOT_AUTHORIZED)
        if self.in_transaction:
            return self._error(IN_TRANSACTION)
        try:
            attrs = parse_attributes(arg, allowed)
        except ParameterError as e:
            return self._error(Reply(501, "5.5.4", f"Bad {verb} syntax: {e}"))
        self._decide(event_type(attrs))

    # -- DATA mode --------------------------------------------------------------------
    def _data_step(self) -> bool:
        """Scan all buffered content; False when nothing could be used yet."""
        buf = self._buf
        if not buf:
            return False
        w = self._prev2 + buf                    # bytes: two octets of context, then new input
        end = w.find(_TERMINATOR)
        if end >= 0:
            stop = end + 2                       # content ends after the CRLF before the dot
            consumed = end + 3                   # ".\r\n" is used up too
        else:
            # Hold back a line-start dot (and a CR after it): it may begin the terminator.
            if w.endswith(b"\r\n."):
                stop = len(w) - 1
            elif w.endswith(b"\r\n.\r"):
                stop = len(w) - 2
            else:
                stop = len(w)
            consumed = stop - 2
            if consumed <= 0:
                return False
        del buf[:consumed]
        self._hand_out(self._scan(w[:stop]))
        if end >= 0:
            self._end_of_message()
        return True

    def _hand_out(self, content: bytes | None) -> None:
        if content:
            self._events.append(ev.DataChunk(content))

    # -- BDAT mode ----------------------------------------------------------------------
    def _chunk_step(self) -> bool:
        """Take what is buffered of the current chunk; at its end, answer for it."""
        buf = self._buf
        n = min(len(buf), self._chunk_left)
        if n:
            ctx = self._prev2 + buf[:n]
            del buf[:n]
            self._chunk_left -= n
            self._hand_out(self._scan(ctx, unstuff=False))
        if self._chunk_left:
            return False
        if self._chunk_last:
            if self._prev2 != _CRLF:           # end the last line (a lone CR there is bare)
                self._hand_out(self._scan(self._prev2 + _CRLF, unstuff=False))
            self._end_of_message()
            return True
        problem = self._content_problem()
        if problem is not None:
            self._end_of_message()
            self._chunk_failure = problem      # and to the chunks still on their way
        else:
            self._write(Reply(250, "2.0.0", f"{self._chunk_size} octets received"))
            self._state = State.BDAT
            if not self._chunk_size:
                self._count_junk()
        return True

    # -- content checks -------------------------------------------------------------------
    def _scan(self, ctx: bytes, unstuff: bool = True) -> bytes | None:
        """Check the content in ``ctx[2:]`` (``ctx[:2]`` is context) and return it,
        unstuffed when it came by DATA.

        Returns None once the message is known to be unacceptable.
        """
        n = len(ctx) - 2
        if n <= 0:
            return None
        prev2 = self._prev2
        if not self._bad_newline:
            # Every LF needs a CR before it and every CR an LF after it.  A CR at the
            # very end is judged with the next chunk (it is then in prev2).
            pairs = ctx.count(b"\r\n") - (prev2 == _CRLF)     # CRLFs whose LF is new
            lfs = ctx.count(b"\n", 2)
            crs = ctx.count(b"\r", 1) - (ctx[-1] == 13)       # CRs whose next octet is new
            if lfs != pairs or crs != pairs:
                self._bad_newline = True
        limit = self.config.max_data_line
        if limit and not self._long_line:
            self._check_line_lengths(ctx, limit)
        dots = ctx.count(b"\r\n.") if unstuff else 0           # line-start dots to remove
        self._size += n - dots
        if self.config.max_message_size and self._size > self.config.max_message_size:
            self._too_big = True
        self._prev2 = ctx[-2:]
        if self._bad_newline or self._long_line or self._too_big:
            return None
        return ctx.replace(b"\r\n.", b"\r\n")[2:] if dots else ctx[2:]

    def _check_line_lengths(self, ctx: bytes, limit: int) -> None:
        """Set _long_line if a line (LF included) in ctx[2:] exceeds `limit` octets.

        Jumps from line end to the last line end within the next `limit` octets,
        so the Python loop runs about len/limit times, not once per line.
        """
        end = len(ctx)
        first = ctx.find(b"\n", 2)
        if first < 0:
            self._line_len += end - 2
            if self._line_len >= limit:
                self._long_line = True
            return
        if self._line_len + first - 1 > limit:              # (first - 2) + 1 octets are new
            self._long_line = True
            return
        pos = first + 1
        while end - pos >= limit:
            p = ctx.rfind(b"\n", pos, pos + limit)
            if p < 0:
                self._long_line = True
                return
            pos = p + 1
        last = ctx.rfind(b"\n", pos)
        if last >= 0:
            pos = last + 1
        self._line_len = end - pos

    def _content_problem(self) -> Reply | None:
        if self._bad_newline:
            return BARE_NEWLINE
        if self._long_line:
            return DATA_LINE_TOO_LONG
        if self._too_big:
            return SIZE_EXCEEDED
        return None

    def _end_of_message(self) -> None:
        """The end of data, or of the last or a failed BDAT chunk: DataEnd to decide,
        or the content problem answered once."""
        problem = self._content_problem()
        size = self._size
        self._clear_transaction()
        if problem is None:
            self._decide(ev.DataEnd(size))
            return
        self._write(problem)
        self._events.append(ev.DataAborted(problem))
        self._count_error()


_COMMANDS = {
    "HELO": ServerConnection._cmd_hello,
    "EHLO": ServerConnection._cmd_hello,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_not_implemented,
    "HELP": ServerConnection._cmd_help,
    "BDAT": ServerConnection._cmd_bdat,
    "AUTH": ServerConnection._cmd_auth,
    "STARTTLS": ServerConnection._cmd_starttls,
    "XCLIENT": ServerConnection._cmd_xclient,
    "XFORWARD": ServerConnection._cmd_xforward,
}
