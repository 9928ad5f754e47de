"""Events the SMTP server core hands to the application, and the core's sentinels.

The core (:mod:`shared.smtp.server`) turns bytes from the peer into these
events.  Two kinds:

* *decision* events (``needs_reply = True``): the core has stopped parsing and
  waits for the application to call ``ServerConnection.respond()`` with a
  :class:`~shared.smtp.reply.Reply` (or ``None`` for the standard positive
  reply).  Nothing further is parsed until then, which keeps pipelined replies
  in order.
* *information* events (``needs_reply = False``): the core has already written
  whatever reply was due; the application only takes note.

Every value in an event has been checked by the core: syntax, sequence and
parameter values.  Nothing in an event has been checked for *policy* (is the
sender allowed, does the recipient exist): that is the application's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .reply import Reply


class Sentinel(type):
    """Metaclass of the sentinels: a class that prints as its own name."""

    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=Sentinel):
    """``next_event()`` result: all buffered input is used up; call ``receive_data()``."""


class PAUSED(metaclass=Sentinel):
    """``next_event()`` result: nothing will be parsed until the application acts.

    Returned while a decision event waits for ``respond()``, before
    ``send_greeting()``, between a :class:`StartTLS` event and
    ``tls_started()``, and for good once the connection is closing.
    """


class LocalProtocolError(Exception):
    """The application used the core wrongly (a programming error, never the peer's fault)."""


class Event:
    """Base class of all events."""
    needs_reply: ClassVar[bool] = False


# -- decisions -----------------------------------------------------------------

@dataclass(frozen=True)
class Hello(Event):
    """HELO or EHLO.  On a positive answer the session has a HELO name."""
    needs_reply: ClassVar[bool] = True
    verb: str            # "HELO" or "EHLO"
    domain: str          # as the client sent it (one token, not validated further)


@dataclass(frozen=True)
class MailFrom(Event):
    """MAIL FROM with its RFC 1870 / 6152 / 6531 / 3461 parameters."""
    needs_reply: ClassVar[bool] = True
    sender: str                  # "" is the null sender; source route stripped
    size: int | None = None      # SIZE=, already checked against the limit
    body: str | None = None      # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None       # "FULL" or "HDRS"
    envid: str | None = None     # xtext-decoded


@dataclass(frozen=True)
class RcptTo(Event):
    """RCPT TO with its RFC 3461 parameters."""
    needs_reply: ClassVar[bool] = True
    recipient: str                        # "local@domain", or "postmaster"
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None              # decoded, e.g. "rfc822;user@example.org"


@dataclass(frozen=True)
class DataStart(Event):
    """DATA, or the first BDAT of a message, with at least one recipient accepted.

    Positive answer: 354 for DATA; for BDAT any positive answer (None, 354...)
    means "go on" and nothing is written: the chunk's octets follow the command
    without waiting.  A refusal is written, and a BDAT chunk's octets skipped.
    """
    needs_reply: ClassVar[bool] = True
    bdat: bool = False       # the message comes in BDAT chunks (RFC 3030), not after a 354


@dataclass(frozen=True)
class DataEnd(Event):
    """The real end of data (or the end of the LAST BDAT chunk) arrived and nothing
    was wrong with the content.

    There is no standard positive reply: the application must answer with its
    own (250 with a queue id once the message is safely stored, or a verdict).
    """
    needs_reply: ClassVar[bool] = True
    size: int            # octets of content after dot-unstuffing


@dataclass(frozen=True)
class XClient(Event):
    """XCLIENT from a trusted upstream.  Positive answer: the session starts over."""
    needs_reply: ClassVar[bool] = True
    attrs: dict[str, str]    # upper-case names, xtext-decoded values


@dataclass(frozen=True)
class XForward(Event):
    """XFORWARD from a trusted upstream.  Positive answer: 250 2.0.0 Ok."""
    needs_reply: ClassVar[bool] = True
    attrs: dict[str, str]


@dataclass(frozen=True)
class AuthStart(Event):
    """AUTH (RFC 4954) with a mechanism this connection offers, after the core checked
    sequence and TLS.  Answers: 334 with a challenge (:func:`shared.smtp.server.challenge`;
    the client's answer comes as :class:`AuthResponse`), 235 (authenticated), or a
    4xx/5xx refusal (535 5.7.8 wrong credentials, 454 4.7.0 temporary)."""
    needs_reply: ClassVar[bool] = True
    mechanism: str               # upper case, one of the offered mechanisms
    initial: bytes | None        # the decoded initial response; b"" for "=", None if absent


@dataclass(frozen=True)
class AuthResponse(Event):
    """The client's answer to a 334 challenge, base64-decoded.  Answers as AuthStart's."""
    needs_reply: ClassVar[bool] = True
    data: bytes


@dataclass(frozen=True)
class StartTLSRequest(Event):
    """STARTTLS (RFC 3207), well-formed and allowed now.  Positive answer: 220 2.0.0
    Ready to start TLS; a :class:`StartTLS` event follows, and whatever the client sent
    after the command is discarded, never read as if it had come over TLS.  A refusal
    (454 4.7.0: too many new TLS sessions) keeps the session in plaintext, and the
    client's next commands are read as usual."""
    needs_reply: ClassVar[bool] = True


# -- information ---------------------------------------------------------------

@dataclass(frozen=True)
class AuthAborted(Event):
    """The client cancelled the AUTH exchange ("*") or sent an answer that is not base64;
    the core answered 501 and the exchange is over."""
    reply: Reply


@dataclass(frozen=True)
class DataChunk(Event):
    """A piece of message content: dot-unstuffed (DATA), line endings as received."""
    data: bytes


@dataclass(frozen=True)
class DataAborted(Event):
    """The content was unacceptable; ``reply`` was already sent after the end of data
    (or of the BDAT chunk where the problem showed)."""
    reply: Reply


@dataclass(frozen=True)
class Reset(Event):
    """Forget the mail transaction (RSET, or HELO/EHLO during a transaction)."""


@dataclass(frozen=True)
class StartTLS(Event):
    """The core said 220 to STARTTLS (its :class:`StartTLSRequest` was answered yes):
    switch the transport, then call ``tls_started()``."""


@dataclass(frozen=True)
class Quit(Event):
    """The client said QUIT; the core answered 221 and is closing."""


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed the connection; any open transaction is abandoned."""


@dataclass(frozen=True)
class TooManyErrors(Event):
    """The client reached the error limit; the core answered 421 and is closing."""


DECISIONS = (Hello, MailFrom, RcptTo, DataStart, DataEnd, XClient, XForward, AuthStart, AuthResponse)
