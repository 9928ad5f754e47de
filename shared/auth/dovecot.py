"""Dovecot's authentication service as a SASL backend (Postfix's ``smtpd_sasl_type = dovecot``).

:class:`DovecotBackend` hands each AUTH exchange to Dovecot's auth service
over its client protocol (version 1.2; Dovecot's ``auth-client`` socket, or a
``service auth`` ``inet_listener``) and turns the answers into the steps of
:mod:`shared.auth.sasl`.  The protocol, as this module speaks it:

- lines end with LF; fields are separated by TAB; a value that holds TAB, LF,
  CR, NUL or the escape byte itself is written with Dovecot's tab-escaping
  (``\\x01`` then ``t``, ``n``, ``r``, ``0`` or ``1``), so nothing a client
  supplies can end a field or a line (:func:`escape`, :func:`unescape`);
- we send ``VERSION 1 2`` and ``CPID <our pid>``; the server sends
  ``VERSION``, one ``MECH <name> [flags]`` per mechanism, ``SPID``, ``CUID``,
  ``COOKIE`` and ``DONE``.  A major version other than 1 ends the connection.
  SPID, CUID and COOKIE serve Dovecot's own login processes (which hand a
  login to a mail process); a mail relay has no use for them;
- ``AUTH <id> <mech> service=smtp nologin lip= rip= lport= rport= [secured]
  [session=] [resp=<base64>]`` starts an exchange (``resp`` last: Dovecot
  drops a client that sends parameters after it; ``nologin``, as Postfix sends
  it, says no mail process will take the login over); ``CONT <id> <base64>``
  carries each further response;
- the server answers ``CONT <id> <base64 challenge>``, ``OK <id> user=...``
  or ``FAIL <id> [user=...] [reason=...] [temp | code=temp_fail]``
  (Dovecot 2.3 says ``code=temp_fail`` where older versions said ``temp``).

One connection serves every exchange of a backend, multiplexed by id.  Ids
count up per connection and are not reused while their exchange lives here;
Dovecot drops a client that reuses an id it still holds, and it still holds
the request of an exchange we abandoned until it times it out itself: the
protocol as documented has no command to abandon one (Dovecot's own client
library sends an undocumented CANCEL; we do not, because a Dovecot that does
not know a command drops the connection, and every exchange on it).  So an
abandoned id only comes round again after 2**32 - 1 others.  Dovecot also drops a client that
asks for a mechanism it did not list, so an exchange for one is answered
here, as is a response too long for the protocol's line limit.

Failures, all ``Failure(reason, temporary=True)`` (454 4.7.0), never an
exception and never a hang: Dovecot not running or not reachable; no
handshake within ``timeout``; an exchange not answered within ``timeout``
(its late answer is ignored); the connection lost while an exchange was under
way.  Mind Dovecot's own delays: ``auth_failure_delay`` (2 s by default) and
its penalty for addresses that failed before (up to 15 s) come before a
FAIL, and an answer later than ``timeout`` becomes a temporary failure.

Connection life: the backend connects at construction.  An exchange that
finds no connection starts an attempt at once (so while Dovecot is down each
one fails quickly, and the first after it is back connects); without
exchanges, the backend reconnects 1 s after a connection is lost, and after a
failed attempt tries again after 1 s, 2 s, 4 s ... at most 30 s (a Dovecot
that drops every connection is not hammered).  One line is logged (namespace
``smarthost.auth``) when Dovecot becomes unreachable and one when it is back,
never one per exchange.

Mechanisms: smarthost advertises at most PLAIN, LOGIN and CRAM-MD5
(:data:`SUPPORTED`), and of those what Dovecot lists and the configuration
allows; before the first handshake, the configured list, so that an AUTH
meanwhile gets a temporary failure instead of the mechanism vanishing from
EHLO.  Dovecot's mechanism flags: a mechanism flagged ``private`` is never
advertised; ``plaintext`` (PLAIN, LOGIN: the password crosses the wire as it
is) is reported by :meth:`DovecotBackend.plaintext`, because Dovecot's auth
service itself does not refuse plaintext mechanisms on sessions without TLS
(its login processes do, before asking it): that is the engine's TLS policy
(AUTH only over TLS by default).  ``secured`` is sent when the session is
TLS-protected, so Dovecot's own rules and logs see it.

What it trusts: Dovecot's verdicts, which is the point.  What Dovecot sends
is parsed defensively: unknown commands and parameters are ignored (the
protocol says so), a malformed answer ends the connection (every exchange on
it fails temporarily), and an answer for an id we no longer hold is dropped.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from typing import Iterable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        UNIXClientEndpoint)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from shared.auth.sasl import Challenge, ClientContext, Failure, Step, Success
from shared.dns import client_ip, valid_hostname

__all__ = ["DovecotBackend", "SUPPORTED", "escape", "unescape", "auth_request", "parse_address"]

SUPPORTED = ("PLAIN", "LOGIN", "CRAM-MD5")
PLAINTEXT = frozenset({"PLAIN", "LOGIN"})     # until Dovecot's flags say otherwise

PROTOCOL_VERSION = ("1", "2")
MAX_REQUEST_LINE = 8192      # the oldest documented line limit (16384 since); longer may cost the connection
MAX_ANSWER_LINE = 65536      # Dovecot's own lines stay under 16384
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
_ID_MAX = 2 ** 32 - 1

log = Logger(namespace="smarthost.auth")


# -- the wire format -----------------------------------------------------------------

_ESCAPE = {"\x01": "\x011", "\t": "\x01t", "\n": "\x01n", "\r": "\x01r", "\x00": "\x010"}
_UNESCAPE = {"1": "\x01", "t": "\t", "n": "\n", "r": "\r", "0": "\x00"}
_NEEDS_ESCAPE = re.compile("[\x00\x01\t\n\r]")
_ESCAPED = re.compile("\x01(.?)", re.DOTALL)


def escape(value: str) -> str:
    """`value` as one protocol field: no TAB, LF or CR left in it."""
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPE[m.group()], value)


def unescape(value: str) -> str:
    """The value a received field stands for (``\\x01`` before any other byte stands for that byte)."""
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), value)


def _line(fields: Iterable[str]) -> bytes:
    return ("\t".join(escape(f) for f in fields) + "\n").encode("utf-8", "replace")


def _fields(line: bytes) -> list[str]:
    return [unescape(f) for f in line.decode("utf-8", "replace").split("\t")]


def _parameters(fields: Iterable[str]) -> dict[str, str]:
    """``name=value`` fields as a dict; a boolean (no ``=``) maps to ""."""
    parameters = {}
    for field in fields:
        name, _, value = field.partition("=")
        parameters[name] = value
    return parameters


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _address(text: str) -> str | None:
    try:
        return str(client_ip(text))
    except ValueError:
        return None


def _port(port: int | None) -> str | None:
    return str(port) if isinstance(port, int) and 0 < port < 65536 else None


def auth_request(request_id: int, mechanism: str, client: ClientContext,
                 response: bytes | None) -> bytes:
    """The AUTH line that starts an exchange (`response`: the initial response, or None)."""
    fields = ["AUTH", str(request_id), mechanism, f"service={client.service}", "nologin"]
    for name, value in (("lip", _address(client.local_ip)), ("rip", _address(client.remote_ip)),
                        ("lport", _port(client.local_port)), ("rport", _port(client.remote_port))):
        if value is not None:
            fields.append(f"{name}={value}")
    if client.secured:
        fields.append("secured")
    if client.session_id:
        fields.append(f"session={client.session_id}")
    if response is not None:
        fields.append("resp=" + _b64(response))
    return _line(fields)


def parse_address(reactor, address: str, timeout: float):
    """The client endpoint for `address`: an absolute UNIX socket path, or ``host:port``
    (an IPv4 address, ``[IPv6 address]`` or a host name).  ValueError says what is wrong."""
    if address.startswith("/"):
        return UNIXClientEndpoint(reactor, address, timeout=timeout)
    host, colon, port_text = address.rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"Dovecot auth address {address!r}: expected an absolute UNIX socket path "
                         f"or host:port with a port from 1 to 65535")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"Dovecot auth address {address!r}: {host} is not an IPv6 address") from None
        return TCP6ClientEndpoint(reactor, str(ip), port, timeout=timeout)
    try:
        return TCP4ClientEndpoint(reactor, str(ipaddress.IPv4Address(host)), port, timeout=timeout)
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(f"Dovecot auth address {address!r}: write an IPv6 address in brackets, [addr]:port")
    if not valid_hostname(host.lower()):
        raise ValueError(f"Dovecot auth address {address!r}: {host!r} is neither an address nor a host name")
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _claimed_user(mechanism: str, response: bytes) -> str | None:
    """The user name a client response claims (PLAIN's authcid, LOGIN's first answer,
    CRAM-MD5's name), or None when this response names none."""
    if mechanism == "PLAIN":
        parts = response.split(b"\x00")
        name = parts[1] if len(parts) == 3 else b""
    elif mechanism == "LOGIN":
        name = response
    elif mechanism == "CRAM-MD5":
        name = response.rpartition(b" ")[0]
    else:
        name = b""
    return name.decode("utf-8", "replace") if name else None


# -- one exchange ---------------------------------------------------------------------

class _Exchange:
    """One AUTH command: its first step sends AUTH, each later one CONT; Dovecot's
    CONT, OK or FAIL answers the step that is waiting."""

    def __init__(self, backend: "DovecotBackend", mechanism: str, client: ClientContext) -> None:
        self._backend = backend
        self.mechanism = mechanism
        self.client = client
        self.user: str | None = None          # the user name the client claimed
        self.connection: _Connection | None = None
        self.id: int | None = None
        self.initial: bytes | None = None
        self._started = False
        self._ended: str | None = None        # why the exchange is over
        self._waiter: Deferred | None = None
        self._timer = None

    # the Exchange interface

    def step(self, response: bytes | None) -> Deferred:
        if self._ended is not None:
            return succeed(Failure(self._ended, temporary=True, user=self.user))
        if self._waiter is not None:
            return succeed(Failure("the previous step is still waiting for Dovecot", temporary=True,
                                   user=self.user))
        if response is not None and self.user is None:
            self.user = _claimed_user(self.mechanism, response)
        waiter = self._waiter = Deferred(lambda _: self.cancel())
        self._timer = self._backend.reactor.callLater(self._backend.timeout, self._timed_out)
        if not self._started:
            self._started = True
            self.initial = response
            self._backend._submit(self)
        else:
            self.send(_line(["CONT", str(self.id), _b64(response or b"")]))
        return waiter

    def cancel(self) -> None:
        self._backend._unqueue(self)
        self._finish(Failure("the exchange was cancelled", temporary=True, user=self.user),
                     "the exchange was cancelled")

    # called by the connection and the backend

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def send(self, line: bytes) -> None:
        if len(line) > MAX_REQUEST_LINE:
            self.answer(Failure("the response is too long", user=self.user))
        else:
            self.connection.transport.write(line)

    def answer(self, step: Step) -> None:
        """Dovecot's answer (or ours) to the step that is waiting; all but a Challenge end it."""
        if isinstance(step, Challenge):
            self._fire(step)
        else:
            self._finish(step, "the exchange is over")

    def fail(self, reason: str) -> None:
        """End the exchange with a temporary failure (Dovecot cannot answer it)."""
        self._finish(Failure(reason, temporary=True, user=self.user), reason)

    def _timed_out(self) -> None:
        self._timer = None
        self._backend._unqueue(self)
        self.fail(f"Dovecot did not answer within {self._backend.timeout:g} s")

    def _finish(self, step: Step, why: str) -> None:
        if self._ended is None:
            self._ended = why
        if self.connection is not None and self.connection.exchanges.get(self.id) is self:
            del self.connection.exchanges[self.id]      # a late answer now finds nobody
        self._fire(step)

    def _fire(self, step: Step) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(step)


# -- one connection -------------------------------------------------------------------

class _Connection(LineOnlyReceiver):
    """The client side of Dovecot's auth protocol on one connection."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_ANSWER_LINE

    def __init__(self, backend: "DovecotBackend") -> None:
        self._backend = backend
        self.ready = False                    # DONE received
        self.mechanisms: dict[str, frozenset[str]] = {}
        self.exchanges: dict[int, _Exchange] = {}
        self.problem: str | None = None       # why we ended the connection
        self.closed = Deferred()
        self._version_seen = False
        self._last_id = 0

    def connectionMade(self) -> None:
        self.transport.write(_line(["VERSION", *PROTOCOL_VERSION]) + _line(["CPID", str(os.getpid())]))

    def abort(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
        self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.abort(f"Dovecot sent a line longer than {self.MAX_LENGTH} bytes")

    def lineReceived(self, line: bytes) -> None:
        fields = _fields(line)
        if self.ready:
            self._answer(fields)
        elif not self._version_seen:
            if fields[0] != "VERSION" or len(fields) < 3 or fields[1] != PROTOCOL_VERSION[0]:
                self.abort(f"Dovecot does not speak auth protocol version 1: {line[:80]!r}")
                return
            self._version_seen = True
        elif fields[0] == "MECH" and len(fields) > 1:
            self.mechanisms[fields[1].upper()] = frozenset(flag.lower() for flag in fields[2:])
        elif fields[0] == "DONE":
            self.ready = True
            self._backend._ready(self)

    def _answer(self, fields: list[str]) -> None:
        command = fields[0]
        if command not in ("OK", "CONT", "FAIL"):
            return                            # unknown commands are for newer clients
        if len(fields) < 2 or not fields[1].isdigit():
            self.abort(f"Dovecot sent a malformed {command} line")
            return
        exchange = self.exchanges.get(int(fields[1]))
        if exchange is None:
            return                            # a late answer to an exchange that is over
        if command == "CONT":
            try:
                challenge = base64.b64decode(fields[2] if len(fields) > 2 else "", validate=True)
            except binascii.Error:
                exchange.fail("Dovecot sent a challenge that is not base64")
                return
            exchange.answer(Challenge(challenge))
            return
        parameters = _parameters(fields[2:])
        user = parameters.get("user") or exchange.user
        if command == "OK":
            exchange.answer(Success(user or ""))
        else:
            temporary = "temp" in parameters or parameters.get("code") == "temp_fail"
            exchange.answer(Failure(parameters.get("reason") or "authentication failed",
                                    temporary=temporary, user=user))

    def start(self, exchange: _Exchange) -> None:
        """Send `exchange`'s AUTH under a fresh id."""
        if exchange.ended:
            return
        if exchange.mechanism not in self.mechanisms:
            exchange.fail(f"Dovecot does not offer {exchange.mechanism}")
            return
        while True:
            self._last_id = self._last_id % _ID_MAX + 1
            if self._last_id not in self.exchanges:
                break
        exchange.connection, exchange.id = self, self._last_id
        self.exchanges[exchange.id] = exchange
        exchange.send(auth_request(exchange.id, exchange.mechanism, exchange.client, exchange.initial))

    def connectionLost(self, reason) -> None:
        self.ready = False
        self._backend._lost(self, self.problem or reason.getErrorMessage())
        self.closed.callback(None)


class _Factory(Factory):
    noisy = False

    def __init__(self, backend: "DovecotBackend") -> None:
        self._backend = backend

    def buildProtocol(self, addr) -> _Connection:
        return _Connection(self._backend)


# -- the backend ------------------------------------------------------------------------

class DovecotBackend:
    """A :class:`shared.auth.sasl.Backend` that asks Dovecot's auth service (see the module docstring).

    `address`: an absolute UNIX socket path (``/var/spool/postfix/private/auth``)
    or ``host:port`` (``[addr]:port`` for IPv6).  `mechanisms`: the ones to
    advertise at most, of :data:`SUPPORTED` (None: all that Dovecot offers).
    `timeout`: for the connection and handshake, and for each answer.
    """

    name = "dovecot"

    def __init__(self, reactor, address: str, *, mechanisms: tuple[str, ...] | None = None,
                 timeout: float = 10.0) -> None:
        if not timeout > 0:
            raise ValueError(f"Dovecot auth timeout must be positive, not {timeout!r}")
        if mechanisms is not None:
            mechanisms = tuple(dict.fromkeys(m.upper() for m in mechanisms))
            unknown = [m for m in mechanisms if m not in SUPPORTED]
            if unknown or not mechanisms:
                raise ValueError(f"Dovecot auth mechanisms {list(mechanisms)!r}: smarthost offers only "
                                 f"{', '.join(SUPPORTED)}")
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self._endpoint = parse_address(reactor, address, timeout)
        self._configured = mechanisms
        self._offered: dict[str, frozenset[str]] | None = None     # Dovecot's MECH list, once known
        self._connection: _Connection | None = None                # handshake done
        self._connecting: Deferred | None = None
        self._handshaking: _Connection | None = None
        self._attempt_timer = None
        self._attempt_problem: str | None = None
        self._retry = None
        self._failures = 0
        self._unreachable = False
        self._queue: list[_Exchange] = []
        self._closed = False
        self._connect()

    # the Backend interface

    def mechanisms(self) -> tuple[str, ...]:
        wanted = self._configured or SUPPORTED
        if self._offered is None:
            return wanted
        usable = [m for m, flags in self._offered.items() if m in SUPPORTED and "private" not in flags]
        if self._configured is None:
            return tuple(usable)
        return tuple(m for m in wanted if m in usable)

    def start(self, mechanism: str, client: ClientContext) -> _Exchange:
        exchange = _Exchange(self, mechanism.upper(), client)
        if exchange.mechanism not in (self._configured or SUPPORTED):
            exchange.fail(f"{exchange.mechanism} is not offered")
        return exchange

    def close(self) -> Deferred | None:
        """Close the connection; exchanges still under way fail temporarily."""
        self._closed = True
        self._cancel_timers()
        if self._connecting is not None:
            self._connecting.cancel()
        for exchange in self._take_queue():
            exchange.fail("the Dovecot backend is closed")
        connections = [c for c in (self._handshaking, self._connection) if c is not None]
        self._handshaking = self._connection = None
        for connection in connections:
            self._fail_exchanges(connection, "the Dovecot backend is closed")
            connection.transport.loseConnection()
        return gatherResults([c.closed for c in connections]) if connections else None

    def plaintext(self, mechanism: str) -> bool:
        """True if `mechanism` sends the password as it is (Dovecot's ``plaintext`` flag;
        PLAIN and LOGIN before the first handshake).  Such a mechanism belongs on TLS."""
        mechanism = mechanism.upper()
        if self._offered is not None and mechanism in self._offered:
            return "plaintext" in self._offered[mechanism]
        return mechanism in PLAINTEXT

    # connecting

    def _connect(self) -> None:
        if self._closed or self._connection or self._connecting or self._handshaking:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._attempt_problem = None
        self._attempt_timer = self.reactor.callLater(self.timeout, self._attempt_timed_out)
        self._connecting = self._endpoint.connect(_Factory(self))
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: _Connection) -> None:
        self._connecting = None
        if self._closed:
            connection.transport.loseConnection()
        else:
            self._handshaking = connection

    def _connect_failed(self, failure) -> None:
        self._connecting = None
        if not self._closed:
            self._attempt_failed(self._attempt_problem or failure.getErrorMessage())

    def _attempt_timed_out(self) -> None:
        self._attempt_timer = None
        self._attempt_problem = f"no handshake within {self.timeout:g} s"
        if self._connecting is not None:
            self._connecting.cancel()           # its errback ends the attempt
        elif self._handshaking is not None:
            connection, self._handshaking = self._handshaking, None
            connection.abort(self._attempt_problem)
            self._attempt_failed(self._attempt_problem)

    def _ready(self, connection: _Connection) -> None:
        if connection is not self._handshaking:
            return
        self._cancel_timers()
        self._handshaking, self._connection = None, connection
        self._offered = dict(connection.mechanisms)
        self._failures = 0
        if self._unreachable:
            self._unreachable = False
            log.info("Dovecot auth service {address} is reachable again", address=self.address)
        for exchange in self._take_queue():
            connection.start(exchange)

    def _lost(self, connection: _Connection, reason: str) -> None:
        if connection is self._handshaking:
            self._handshaking = None
            self._attempt_failed(reason)
        elif connection is self._connection:
            self._connection = None
            self._retry = self.reactor.callLater(RETRY_FIRST, self._connect)
            self._fail_exchanges(connection, f"connection to Dovecot lost: {reason}")

    def _attempt_failed(self, reason: str) -> None:
        self._cancel_timers()
        self._failures += 1
        if not self._closed:
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._failures - 1))
            self._retry = self.reactor.callLater(delay, self._connect)
        if not self._unreachable:
            self._unreachable = True
            log.warn("Dovecot auth service {address} is unreachable: {reason}; AUTH fails "
                     "temporarily until it is back", address=self.address, reason=reason)
        for exchange in self._take_queue():
            exchange.fail(f"Dovecot auth service unreachable: {reason}")

    # exchanges

    def _submit(self, exchange: _Exchange) -> None:
        if self._closed:
            exchange.fail("the Dovecot backend is closed")
        elif self._connection is not None:
            self._connection.start(exchange)
        else:
            self._queue.append(exchange)
            self._connect()

    def _unqueue(self, exchange: _Exchange) -> None:
        if exchange in self._queue:
            self._queue.remove(exchange)

    def _take_queue(self) -> list[_Exchange]:
        queue, self._queue = self._queue, []
        return queue

    @staticmethod
    def _fail_exchanges(connection: _Connection, reason: str) -> None:
        exchanges = list(connection.exchanges.values())
        connection.exchanges.clear()
        for exchange in exchanges:
            exchange.fail(reason)

    def _cancel_timers(self) -> None:
        for name in ("_attempt_timer", "_retry"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
