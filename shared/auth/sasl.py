"""The SASL interface between the SMTP engine and an authentication backend.

The server core (:mod:`shared.smtp.server`) owns the SMTP side of AUTH (RFC
4954): the command's syntax, the 334 continuation lines, base64, the client's
``*`` that cancels.  A *backend* owns the mechanism itself: it checks the
credentials, whether it holds the users (the embedded store,
:mod:`shared.auth.store`) or asks a server that does (Dovecot's authentication
service, :mod:`shared.auth.dovecot`), exactly as Postfix hands the whole SASL
exchange to Dovecot.

One AUTH command is one :class:`Exchange`::

    exchange = backend.start("PLAIN", client)
    step = yield exchange.step(initial_response)   # None: the client sent none
    while isinstance(step, Challenge):
        step = yield exchange.step(client_answer)  # bytes, base64-decoded by the core
    # step is Success(login) or Failure(reason, temporary)

``exchange.cancel()`` is called when the exchange ends early (the client
cancelled with ``*``, or went away); a backend frees what it holds for it.
A backend never raises into the engine: a backend that cannot answer (Dovecot
down, a timeout) answers ``Failure(reason, temporary=True)``, which the client
sees as 454 4.7.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class Challenge:
    """Send the client ``data`` in a 334 line (the core base64-encodes it)."""
    data: bytes


@dataclass(frozen=True)
class Success:
    """The client proved to be ``login`` (the name the backend knows it by)."""
    login: str


@dataclass(frozen=True)
class Failure:
    """Authentication failed.  ``temporary``: the backend could not decide (454 4.7.0),
    not a wrong password (535 5.7.8).  ``user``: the user name the client claimed, when
    known (failures are counted per client and per user name)."""
    reason: str
    temporary: bool = False
    user: str | None = None


Step = Challenge | Success | Failure


@dataclass(frozen=True)
class ClientContext:
    """What a backend may know about the client (Dovecot's AUTH parameters)."""
    remote_ip: str
    remote_port: int | None
    local_ip: str = ""
    local_port: int | None = None
    secured: bool = False            # the session is TLS-protected
    service: str = "smtp"
    session_id: str = ""


class Exchange(Protocol):
    def step(self, response: bytes | None) -> Deferred:
        """The client's next response (the first call: the initial response, or None);
        a Deferred firing with a :data:`Step`, never failing."""

    def cancel(self) -> None:
        """The exchange ends before a Success or Failure."""


class Backend(Protocol):
    name: str

    def mechanisms(self) -> tuple[str, ...]:
        """The mechanisms to advertise, in order (e.g. ("PLAIN", "LOGIN", "CRAM-MD5"))."""

    def start(self, mechanism: str, client: ClientContext) -> Exchange:
        """A new exchange for one of :meth:`mechanisms`."""

    def close(self) -> Deferred | None:
        """Release connections (the configuration that made the backend is retired)."""
