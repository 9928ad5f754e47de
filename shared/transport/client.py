"""The SMTP client on Twisted, and the relay client that delivers to next hops.

:class:`SMTPClientProtocol` adapts the sans-I/O :class:`ClientConnection`
(``shared.smtp.client``) to a Twisted transport: every command method returns
a Deferred that fires with the server's :class:`Reply` whatever its code (4xx
and 5xx are answers, the caller decides), and fails only when there is no
answer: :class:`SMTPTimeoutError` when a reply (or room to write message data)
does not come within the timeout, :class:`SMTPConnectionLost` when the
connection goes, :class:`RemoteProtocolError` when the server speaks garbage
(the connection is then aborted).  Timeouts run on an injected clock.

While message data is written the protocol registers a push producer with
the transport, so it learns when the transport's buffer is full;
:meth:`SMTPClientProtocol.is_writable` and
:meth:`SMTPClientProtocol.wait_writable` let a caller (the queue's body
reader, or a proxy pausing its own client) wait for room instead of
buffering a whole message in memory.

:class:`RelayClient` talks to a configured list of next hops, in order: a hop
that refuses, times out, or fails the greeting, EHLO, required STARTTLS or
XCLIENT is skipped for the next.  It opens sessions for a before-queue proxy
(:meth:`RelayClient.open_session`, with XCLIENT) and delivers queued messages
in batches over one connection (:meth:`RelayClient.deliver_batch`, with
XFORWARD IDENT), turning every connection problem into a 451 for the
recipients concerned: a message is never lost to a network error and never
bounced for one.

What it trusts: the configuration (next hops, TLS policy).  Nothing the next
hop says is trusted beyond its reply codes; with TLS policy "encrypt" the
next hop's certificate is verified against its configured host name.
"""
from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Coroutine, Iterable, Mapping, Sequence, TypeVar

from twisted.internet import error as net_error
from twisted.internet.defer import (CancelledError, Deferred, TimeoutError as DeferredTimeout,
                                    fail, succeed)
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shared.envelope import ClientInfo, Envelope
from shared.logging import debug_enabled
from shared.smtp.client import (NEED_DATA, UNAVAILABLE, ClientConnection, LocalProtocolError,
                                RemoteProtocolError, State)
from shared.smtp.reply import Reply
from shared.smtp.syntax import clip_name
from shared.transport.tcp import no_delay, writer

__all__ = [
    "SMTPClientError", "SMTPTimeoutError", "SMTPConnectionLost", "TLSUnavailable",
    "NextHopUnavailable", "SMTPClientProtocol", "NextHop", "Session", "RelayClient",
    "BODY_CHUNK",
]

BODY_CHUNK = 64 * 1024          # bytes read from a queue file at a time
_MAX_REASON = 400               # characters of failure text in a 451 reply

_T = TypeVar("_T")
_log = Logger(namespace="smarthost.relay")


class SMTPClientError(Exception):
    """No reply could be had from the server."""


class SMTPTimeoutError(SMTPClientError, TimeoutError):
    """The server did not answer (or did not read) in time."""


class SMTPConnectionLost(SMTPClientError, ConnectionError):
    """The connection closed while a reply was awaited; ``detail`` is the
    transport's reason (a TLS error, for instance)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class TLSUnavailable(SMTPClientError):
    """STARTTLS was asked for but the server does not offer it."""


class NextHopUnavailable(SMTPClientError):
    """No next hop could be used; ``reply`` is the 451 to give for it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _coro(coro: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    return Deferred.fromCoroutine(coro)


@implementer(IPushProducer)
class _WriteGate:
    """Registered with the transport during message data: the transport
    pauses it when its buffer is full and resumes it when drained."""

    def __init__(self) -> None:
        self.paused = False
        self.waiters: list[Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.paused = True      # the connection is going; connectionLost fails the waiters


class SMTPClientProtocol(Protocol):
    """One SMTP client connection driven by a :class:`ClientConnection`.

    ``clock`` provides ``callLater`` for timeouts: ``command_timeout`` for
    each reply (the greeting included), ``data_timeout`` for the reply to
    the end of data and for the transport to drain while message data is
    written.
    """

    def __init__(self, clock: IReactorTime, *, command_timeout: float = 300.0,
                 data_timeout: float = 600.0) -> None:
        self.clock = clock
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.conn = ClientConnection()
        self.helo_name: str | None = None
        self.greeting_reply: Reply | None = None
        self.lost: Failure | None = None            # set once no reply can come any more
        self._waiting: deque[tuple[Deferred[Reply], float, str]] = deque()
        self._timer: IDelayedCall | None = None
        self._gate: _WriteGate | None = None
        self._greeting_waiters: list[Deferred[Reply]] = []
        d: Deferred[Reply] = Deferred()
        d.addCallbacks(self._on_greeting, self._on_greeting_failed)
        self._waiting.append((d, command_timeout, "the initial server greeting"))

    # ---- Twisted plumbing -------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._write = writer(self.transport)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        while self.lost is None:
            try:
                reply = conn.next_reply()
            except RemoteProtocolError as exc:
                self._abort(Failure(exc))
                return
            if reply is NEED_DATA:
                return
            self._deliver(reply)

    def connectionLost(self, reason: Failure = Failure(net_error.ConnectionDone())) -> None:
        if self.lost is None:
            detail = reason.getErrorMessage()
            what = f" while waiting for {self._waiting[0][2]}" if self._waiting else ""
            exc = SMTPConnectionLost(f"connection lost{what}: {detail}", detail)
            exc.__cause__ = reason.value
            self._fail_all(Failure(exc))

    def _deliver(self, reply: Reply) -> None:
        """Hand a reply to whoever waits for it.  A 421 goes to every waiter
        and ends the session: later calls fail with SMTPConnectionLost."""
        waiters = [self._waiting.popleft()[0]] if self._waiting else []
        if reply.code == 421 and self.conn.state is State.CLOSED:
            waiters += [w[0] for w in self._waiting]
            self._waiting.clear()
            self._fail_all(Failure(SMTPConnectionLost(f"server closed the session: {reply}")))
            self.transport.loseConnection()
        else:
            self._arm()
        for waiter in waiters:
            waiter.callback(reply)

    def _expect(self, what: str, timeout: float | None = None) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred()
        self._waiting.append((d, self.command_timeout if timeout is None else timeout, what))
        if len(self._waiting) == 1:
            self._arm()
        return d

    def _arm(self) -> None:
        """(Re)start the timer for the oldest awaited reply.

        One timer per connection, moved with ``reset`` (no new timer per
        reply); with nothing awaited it is left to fire and do nothing.
        """
        if self._waiting and self.lost is None:
            timeout = self._waiting[0][1]
            if self._timer is not None and self._timer.active():
                self._timer.reset(timeout)
            else:
                self._timer = self.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiting and self.lost is None:
            what = self._waiting[0][2]
            self._abort(Failure(SMTPTimeoutError(f"timed out waiting for {what}")))

    def _abort(self, failure: Failure) -> None:
        self._fail_all(failure)
        self.transport.abortConnection()

    def _fail_all(self, failure: Failure) -> None:
        self.lost = failure
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting = [w[0] for w in self._waiting]
        self._waiting.clear()
        gate_waiters: list[Deferred[None]] = []
        if self._gate is not None:
            gate_waiters, self._gate.waiters = self._gate.waiters, []
        for d in waiting:
            d.errback(failure)
        for g in gate_waiters:
            g.errback(failure)

    def _on_greeting(self, reply: Reply) -> None:
        self.greeting_reply = reply
        waiters, self._greeting_waiters = self._greeting_waiters, []
        for d in waiters:
            d.callback(reply)

    def _on_greeting_failed(self, failure: Failure) -> None:
        waiters, self._greeting_waiters = self._greeting_waiters, []
        for d in waiters:
            d.errback(failure)

    def _send(self, build: Callable[..., bytes], *args: Any, what: str,
              timeout: float | None = None, **kw: Any) -> Deferred[Reply]:
        if self.lost is not None:
            return fail(self.lost)
        try:
            data = build(*args, **kw)
        except LocalProtocolError:
            return fail()
        d = self._expect(what, timeout)
        self._write(data)
        return d

    # ---- commands ---------------------------------------------------

    def greeting(self) -> Deferred[Reply]:
        """The server's greeting (220, or 421/554 when it will not talk)."""
        if self.greeting_reply is not None:
            return succeed(self.greeting_reply)
        if self.lost is not None:
            return fail(self.lost)
        d: Deferred[Reply] = Deferred()
        self._greeting_waiters.append(d)
        return d

    def ehlo(self, name: str) -> Deferred[Reply]:
        """EHLO, and HELO if the server answers EHLO with 5xx."""
        self.helo_name = name

        def fallback(reply: Reply) -> Reply | Deferred[Reply]:
            if reply.permanent and self.conn.state in (State.GREETED, State.READY):
                return self._send(self.conn.helo, name, what="the reply to HELO")
            return reply

        return self._send(self.conn.ehlo, name, what="the reply to EHLO").addCallback(fallback)

    def starttls(self, context_factory: Any) -> Deferred[Reply]:
        """STARTTLS, start TLS on the transport, and EHLO again.

        Fires with the STARTTLS reply if it was not 2xx (the session goes on
        in plaintext, the caller decides), else with the new EHLO reply.
        Fails with :class:`TLSUnavailable` if STARTTLS is not offered.
        """
        if self.lost is not None:
            return fail(self.lost)
        if "STARTTLS" not in self.conn.extensions or self.conn.tls:
            return fail(TLSUnavailable("STARTTLS is not offered"))
        name = self.helo_name
        if name is None:
            return fail(LocalProtocolError("STARTTLS before EHLO"))

        def started(reply: Reply) -> Reply | Deferred[Reply]:
            if not reply.positive:
                return reply
            self.transport.startTLS(context_factory)
            return self.ehlo(name)

        return self._send(self.conn.starttls, what="the reply to STARTTLS").addCallback(started)

    def xclient(self, attrs: Mapping[str, str]) -> Deferred[Reply | None]:
        """XCLIENT with the attributes the server offers, then EHLO again.

        Fires with None if none is offered (nothing sent), with the first
        XCLIENT reply that is not 2xx, or with the new EHLO reply.
        """
        return _coro(self._xclient(attrs))

    async def _xclient(self, attrs: Mapping[str, str]) -> Reply | None:
        groups = self.conn.attribute_groups("XCLIENT", attrs)
        if not groups:
            return None
        if self.helo_name is None:
            raise LocalProtocolError("XCLIENT before EHLO")
        for group in groups:
            reply = await self._send(self.conn.xclient, group, what="the reply to XCLIENT")
            if not reply.positive:
                return reply
        return await self.ehlo(self.helo_name)

    def xforward(self, attrs: Mapping[str, str]) -> Deferred[Reply | None]:
        """XFORWARD with the attributes the server offers; fires with None if
        none is offered, else with the first non-2xx or the last reply."""
        return _coro(self._xforward(attrs))

    async def _xforward(self, attrs: Mapping[str, str]) -> Reply | None:
        reply = None
        for group in self.conn.attribute_groups("XFORWARD", attrs):
            reply = await self._send(self.conn.xforward, group, what="the reply to XFORWARD")
            if not reply.positive:
                break
        return reply

    def mail(self, sender: str, **params: Any) -> Deferred[Reply]:
        """MAIL FROM; ``params`` as for :meth:`ClientConnection.mail`."""
        return self._send(self.conn.mail, sender, what="the reply to MAIL FROM", **params)

    def rcpt(self, address: str, **params: Any) -> Deferred[Reply]:
        return self._send(self.conn.rcpt, address, what="the reply to RCPT TO", **params)

    def data(self) -> Deferred[Reply]:
        return self._send(self.conn.data, what="the reply to DATA")

    def rset(self) -> Deferred[Reply]:
        return self._send(self.conn.rset, what="the reply to RSET")

    def noop(self) -> Deferred[Reply]:
        return self._send(self.conn.noop, what="the reply to NOOP")

    def quit(self) -> Deferred[Reply]:
        """QUIT; the connection is closed once the reply (or a failure) comes."""
        def close(result: Any) -> Any:
            if self.transport is not None:
                self.transport.loseConnection()
            return result

        return self._send(self.conn.quit, what="the reply to QUIT").addBoth(close)

    # ---- message data -----------------------------------------------

    def send_data(self, chunk: bytes) -> None:
        """Write a piece of the message (dot-stuffed here).  Check
        :meth:`is_writable` afterwards and wait with :meth:`wait_writable`."""
        if self.lost is not None:
            self.lost.raiseException()
        data = self.conn.send_data(chunk)
        if self._gate is None:
            self._gate = _WriteGate()
            self.transport.registerProducer(self._gate, True)
        if data:
            self._write(data)

    def is_writable(self) -> bool:
        """False while the transport's buffer is full (or the connection is gone)."""
        return self.lost is None and (self._gate is None or not self._gate.paused)

    def wait_writable(self) -> Deferred[None]:
        """Fires when more data may be written; fails with
        :class:`SMTPTimeoutError` after ``data_timeout`` without room."""
        if self.lost is not None:
            return fail(self.lost)
        if self._gate is None or not self._gate.paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._gate.waiters.append(d)
        timer = self.clock.callLater(self.data_timeout, self._write_stalled)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def _write_stalled(self) -> None:
        if self.lost is None:
            self._abort(Failure(SMTPTimeoutError("timed out sending message data")))

    def end_data(self) -> Deferred[Reply]:
        """Finish the message and wait (``data_timeout``) for the final reply."""
        if self.lost is not None:
            return fail(self.lost)
        try:
            data = self.conn.end_data()
        except LocalProtocolError:
            return fail()
        if self._gate is not None:
            # Whoever waits for room is told now: the message is complete, and a
            # waiter left behind would never be woken (the gate goes with it).
            gate, self._gate = self._gate, None
            self.transport.unregisterProducer()
            waiters, gate.waiters = gate.waiters, []
            for waiter in waiters:
                waiter.callback(None)
        d = self._expect("the reply to end of data", self.data_timeout)
        self._write(data)
        return d

    # ---- a whole envelope -------------------------------------------

    def send_envelope(self, env: Envelope, *, xforward: Mapping[str, str] | None = None,
                      size: int | None = None
                      ) -> Deferred[tuple[Reply, list[Reply], Reply | None]]:
        """Send [XFORWARD], MAIL, every RCPT and DATA for ``env``.

        With PIPELINING they go in one write (RFC 2920); without, one by
        one, stopping after a refused MAIL, and DATA only if a recipient was
        accepted.  Fires with ``(mail_reply, rcpt_replies, data_reply)``:
        one RCPT reply per recipient (the MAIL reply stands for recipients
        not sent), ``data_reply`` None if DATA was not sent.  When
        ``data_reply`` is 354 the caller writes the message; otherwise the
        transaction is already closed (RSET sent if needed).  A 354 with no
        recipient accepted is answered with an empty message at once and
        reported as a 554.
        """
        return _coro(self._send_envelope(env, xforward or {}, size))

    async def _send_envelope(self, env: Envelope, xforward: Mapping[str, str],
                             size: int | None) -> tuple[Reply, list[Reply], Reply | None]:
        conn = self.conn
        if self.lost is not None:
            self.lost.raiseException()
        mail_params = dict(size=size, body=env.body, smtputf8=env.smtputf8,
                           ret=env.ret, envid=env.envid)
        groups = conn.attribute_groups("XFORWARD", xforward) if xforward else []
        data_reply: Reply | None
        if conn.pipelining:
            names: list[str] = []
            chunks: list[bytes] = []
            try:
                for group in groups:
                    chunks.append(conn.xforward(group))
                    names.append("the reply to XFORWARD")
                chunks.append(conn.mail(env.sender, **mail_params))
                names.append("the reply to MAIL FROM")
                for r in env.recipients:
                    chunks.append(conn.rcpt(r.address, notify=r.notify, orcpt=r.orcpt))
                    names.append("the reply to RCPT TO")
                chunks.append(conn.data())
                names.append("the reply to DATA")
            except LocalProtocolError as exc:
                # Commands already built were never written: out of step for good.
                self._abort(Failure(exc))
                raise
            waiters = [self._expect(name) for name in names]
            self._write(b"".join(chunks))
            replies = await _all(waiters)
            mail_reply = replies[len(groups)]
            rcpt_replies = replies[len(groups) + 1:-1]
            data_reply = replies[-1]
        else:
            for group in groups:        # a refused XFORWARD only loses log detail
                await self._send(conn.xforward, group, what="the reply to XFORWARD")
            mail_reply = await self.mail(env.sender, **mail_params)
            if not mail_reply.positive:
                return mail_reply, [mail_reply] * len(env.recipients), None
            rcpt_replies = []
            for r in env.recipients:
                if conn.state is State.CLOSED:          # a 421 ended the session
                    rcpt_replies.append(rcpt_replies[-1])
                    continue
                rcpt_replies.append(await self.rcpt(r.address, notify=r.notify, orcpt=r.orcpt))
            data_reply = None
            if conn.rcpts_accepted and conn.state is State.MAIL:
                data_reply = await self.data()
        if data_reply is not None and data_reply.code == 354 and not conn.rcpts_accepted:
            await self.end_data()
            data_reply = Reply(554, "5.5.1", "Error: no valid recipients")
        if conn.state is State.MAIL:
            await self.rset()
        return mail_reply, rcpt_replies, data_reply


async def _all(waiters: Sequence[Deferred[_T]]) -> list[_T]:
    """Await Deferreds in order; on the first failure, swallow the others'
    (they fail together when the connection goes) and raise it."""
    results: list[_T] = []
    for i, d in enumerate(waiters):
        try:
            results.append(await d)
        except BaseException:
            for other in waiters[i + 1:]:
                other.addErrback(lambda _f: None)
            raise
    return results


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        proto = self._make()
        proto.factory = self
        return proto


# ---- the relay client ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class NextHop:
    host: str
    port: int = 25

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


TLS_POLICIES = ("none", "may", "encrypt")


class Session:
    """A connected, greeted (EHLO, STARTTLS, XCLIENT done) next-hop session.

    ``relay`` names it for logs and replies: ``host[addr]:port``.  The
    command methods are the protocol's; :meth:`close` sends QUIT and closes,
    and never fails.
    """

    def __init__(self, protocol: SMTPClientProtocol, hop: NextHop, address: str) -> None:
        self.protocol = protocol
        self.hop = hop
        self.address = address
        self.relay = f"{hop.host}[{address}]:{hop.port}"
        self.opened_at = 0.0             # reactor time of the connection
        self.announced = False           # it carried XCLIENT (it speaks for some client)
        self.mail = protocol.mail
        self.rcpt = protocol.rcpt
        self.data = protocol.data
        self.send_data = protocol.send_data
        self.is_writable = protocol.is_writable
        self.wait_writable = protocol.wait_writable
        self.end_data = protocol.end_data
        self.rset = protocol.rset
        self.noop = protocol.noop
        self.xforward = protocol.xforward
        self.send_envelope = protocol.send_envelope

    @property
    def extensions(self) -> dict[str, str]:
        return self.protocol.conn.extensions

    @property
    def tls(self) -> bool:
        return self.protocol.conn.tls

    @property
    def messages_sent(self) -> int:
        return self.protocol.conn.messages_sent

    @property
    def usable(self) -> bool:
        """Connected and between transactions."""
        return self.protocol.lost is None and self.protocol.conn.state is State.READY

    def close(self) -> Deferred[None]:
        proto = self.protocol
        if proto.lost is not None:
            return succeed(None)
        if proto.conn.pending or proto.conn.state not in (State.GREETED, State.READY,
                                                          State.MAIL):
            proto.transport.abortConnection()
            return succeed(None)
        return proto.quit().addBoth(lambda _: None)


class _HopFailed(Exception):
    def __init__(self, reason: str, tls_failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tls_failed = tls_failed


def _connect_error_text(exc: BaseException) -> str:
    if isinstance(exc, (net_error.TimeoutError, DeferredTimeout, CancelledError,
                        TimeoutError)):
        return "connection timed out"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, net_error.DNSLookupError):
        return "Host not found"
    if isinstance(exc, net_error.NoRouteError):
        return "No route to host"
    return str(exc) or type(exc).__name__


def _lost_text(exc: BaseException, relay: str, phase: str) -> str:
    if isinstance(exc, SMTPTimeoutError):
        return f"conversation with {relay} timed out while {phase}"
    if isinstance(exc, RemoteProtocolError):
        return f"protocol error from {relay} while {phase}: {exc}"
    if isinstance(exc, LocalProtocolError):
        return f"local protocol error talking to {relay} while {phase}: {exc}"
    if isinstance(exc, SMTPConnectionLost) and exc.detail and "TLS" in phase:
        return f"lost connection with {relay} while {phase}: {exc.detail[:120]}"
    return f"lost connection with {relay} while {phase}"


def xclient_attributes(info: ClientInfo) -> dict[str, str]:
    """XCLIENT attributes for the original client; unknown ones "[UNAVAILABLE]".

    Names are clipped to 255 octets (:func:`clip_name`): the command must fit the
    next hop's command line limit whatever HELO the client gave.
    """
    return {
        "NAME": clip_name(info.name) if info.name else UNAVAILABLE,
        "ADDR": _xclient_addr(info.addr),
        "PORT": str(info.port) if info.port is not None else UNAVAILABLE,
        "PROTO": info.proto or UNAVAILABLE,
        "HELO": clip_name(info.helo) if info.helo else UNAVAILABLE,
        "LOGIN": info.login or UNAVAILABLE,
    }


def _xclient_addr(addr: str | None) -> str:
    """XCLIENT and XFORWARD write IPv6 addresses as "IPV6:..." (Postfix)."""
    if not addr or addr.startswith("["):
        return addr or UNAVAILABLE
    try:
        if ipaddress.ip_address(addr).version == 6:
            return f"IPV6:{addr}"
    except ValueError:
        pass
    return addr


def _xforward_attributes(qid: str, info: ClientInfo) -> dict[str, str]:
    attrs = {"IDENT": qid}
    if info.name:
        attrs["NAME"] = clip_name(info.name)
    if info.addr:
        attrs["ADDR"] = _xclient_addr(info.addr)
    if info.port is not None:
        attrs["PORT"] = str(info.port)
    if info.proto:
        attrs["PROTO"] = info.proto
    if info.helo:
        attrs["HELO"] = clip_name(info.helo)
    return attrs


Message = tuple[str, Envelope, Callable[[], BinaryIO], int]


class RelayClient:
    """Delivers to the first usable of ``next_hops``.

    ``tls``: "none" (never STARTTLS), "may" (STARTTLS when offered, without
    certificate verification; a refused STARTTLS or failed handshake falls
    back to plaintext) or "encrypt" (STARTTLS required, certificate
    verified for the hop's host name against ``tls_trust_root``, a PEM CA
    file, or the platform's roots).  ``tls_options(host)`` overrides the
    TLS client options for either policy.  ``xclient``: give the original
    client to hops that offer XCLIENT in :meth:`open_session`.
    ``endpoint_factory(host, port)`` returns the client endpoint to connect
    with (default: a ``HostnameEndpoint``; an address connects directly).
    ``content_checked``: the messages given to :meth:`deliver_batch` hold no
    bare CR or LF (a queue fed by our server core, which refuses them), so the
    body is sent without counting line ends again (dot-stuffing still applies).

    Connection cache: a delivery connection that is still usable when its
    batch ends is kept for ``connection_cache_time`` seconds and given to the
    next batch, until it has carried ``max_messages_per_connection`` messages
    or is ``connection_reuse_time_limit`` seconds old.  A session from
    :meth:`open_session` that carried XCLIENT comes back through
    :meth:`release`; it is kept the same way but only ever given to the next
    :meth:`open_session` with a client, which announces its client with a
    new XCLIENT (and EHLO) instead of a new connection, greeting and EHLO.
    """

    def __init__(self, reactor: Any, next_hops: Iterable[NextHop | tuple[str, int]], *,
                 helo_name: str, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, data_timeout: float = 600.0,
                 tls: str = "none", tls_trust_root: str | None = None,
                 tls_options: Callable[[str], Any] | None = None, xclient: bool = False,
                 max_messages_per_connection: int = 100,
                 connection_cache_time: float = 2.0,
                 connection_reuse_time_limit: float = 300.0,
                 content_checked: bool = False,
                 endpoint_factory: Callable[[str, int], Any] | None = None,
                 log: Logger | None = None) -> None:
        self.reactor = reactor
        self.next_hops = [h if isinstance(h, NextHop) else NextHop(h[0], int(h[1]))
                          for h in next_hops]
        if not self.next_hops:
            raise ValueError("no next hop configured")
        if tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
        if max_messages_per_connection < 1:
            raise ValueError("max_messages_per_connection must be at least 1")
        if not helo_name or any(c.isspace() for c in helo_name):
            raise ValueError(f"bad helo_name: {helo_name!r}")
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.tls = tls
        self.xclient = xclient
        self.max_messages_per_connection = max_messages_per_connection
        self.connection_cache_time = connection_cache_time
        self.connection_reuse_time_limit = connection_reuse_time_limit
        self.content_checked = content_checked
        self._cached: list[tuple[Session, IDelayedCall]] = []
        self._trust_root = None
        if tls_trust_root is not None and tls_options is None:
            self._trust_root = _load_trust_root(tls_trust_root)
        self._tls_options = tls_options
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        self.log = log or _log

    def _default_endpoint(self, host: str, port: int) -> Any:
        """An address connects directly; a name goes through HostnameEndpoint
        (resolution in a thread, happy eyeballs over its addresses), which for
        an address literal would only add a resolver round trip per connection."""
        from twisted.internet.abstract import isIPAddress, isIPv6Address
        from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
        if isIPAddress(host):
            return TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)

    def _tls_context(self, host: str) -> Any:
        if self._tls_options is not None:
            return self._tls_options(host)
        from twisted.internet import ssl
        if self.tls == "encrypt":
            return ssl.optionsForClientTLS(host, trustRoot=self._trust_root)
        return ssl.CertificateOptions()         # "may": encrypt, do not verify

    # ---- sessions -----------------------------------------------------

    def open_session(self, client_info: ClientInfo | None = None) -> Deferred[Session]:
        """Connect to the first usable next hop: greeting, EHLO, STARTTLS as
        the policy says, XCLIENT with ``client_info`` when enabled and
        offered.  Fails with :class:`NextHopUnavailable` (its ``reply`` is a
        451 4.4.1 naming every hop tried and why).  With a client, a kept
        connection (see :meth:`release`) is used first when there is one."""
        if client_info is not None and self.xclient:
            kept = self._take_cached(announced=True)
            if kept is not None:
                return _coro(self._reannounce(kept, client_info))
        return _coro(self._open_session(client_info))

    async def _reannounce(self, session: Session, client_info: ClientInfo) -> Session:
        """XCLIENT (and EHLO) for a new client on a kept connection; a new
        connection if that does not work."""
        try:
            reply = await session.protocol.xclient(xclient_attributes(client_info))
        except Exception:
            reply = None
        if reply is not None and reply.positive and session.usable:
            return session
        session.protocol.transport.abortConnection()
        return await self._open_session(client_info)

    def release(self, session: Session) -> None:
        """Take back a session from :meth:`open_session` that its user is done
        with: kept for the next client if it is between transactions and may
        still be reused, else closed."""
        if session.announced and self._reusable(session):
            self._keep(session)
        else:
            session.close()

    def _reusable(self, session: Session) -> bool:
        return (session.usable and session.messages_sent < self.max_messages_per_connection
                and self.reactor.seconds() - session.opened_at < self.connection_reuse_time_limit)

    async def _open_session(self, client_info: ClientInfo | None) -> Session:
        reasons = []
        for hop in self.next_hops:
            try:
                return await self._try_hop(hop, client_info, self.tls != "none")
            except _HopFailed as exc:
                if not (exc.tls_failed and self.tls == "may"):
                    reasons.append(exc.reason)
                    continue
            try:                            # "may": the handshake failed, go plaintext
                return await self._try_hop(hop, client_info, False)
            except _HopFailed as exc:
                reasons.append(exc.reason)
        text = "; ".join(reasons)
        if len(text) > _MAX_REASON:
            text = text[:_MAX_REASON - 3] + "..."
        raise NextHopUnavailable(Reply(451, "4.4.1", text))

    async def _try_hop(self, hop: NextHop, client_info: ClientInfo | None,
                       use_tls: bool) -> Session:
        factory = _ClientFactory(lambda: SMTPClientProtocol(
            self.reactor, command_timeout=self.command_timeout, data_timeout=self.data_timeout))
        try:
            d = self._endpoint_factory(hop.host, hop.port).connect(factory)
            d.addTimeout(self.connect_timeout, self.reactor)
            proto = await d
        except Exception as exc:
            raise _HopFailed(f"connect to {hop}: {_connect_error_text(exc)}") from exc
        peer = proto.transport.getPeer()
        session = Session(proto, hop, str(getattr(peer, "host", hop.host)))
        session.opened_at = self.reactor.seconds()
        relay = session.relay
        phase = "receiving the initial server greeting"
        try:
            reply = await proto.greeting()
            if not reply.positive:
                raise _HopFailed(f"{relay} refused to talk to me: {reply}")
            phase = "performing the EHLO handshake"
            reply = await proto.ehlo(self.helo_name)
            if not reply.positive:
                raise _HopFailed(f"{relay} refused EHLO and HELO: {reply}")
            if use_tls:
                if "STARTTLS" not in proto.conn.extensions:
                    if self.tls == "encrypt":
                        raise _HopFailed(f"TLS is required, but was not offered by {relay}")
                else:
                    phase = "performing the STARTTLS handshake"
                    reply = await proto.starttls(self._tls_context(hop.host))
                    if not reply.positive and self.tls == "encrypt":
                        raise _HopFailed(f"{relay} refused STARTTLS: {reply}")
            if self.xclient and client_info is not None:
                phase = "sending XCLIENT"
                xreply = await proto.xclient(xclient_attributes(client_info))
                if xreply is not None and not xreply.positive:
                    raise _HopFailed(f"{relay} refused XCLIENT: {xreply}")
                session.announced = xreply is not None
        except _HopFailed:
            if proto.lost is None:
                proto.transport.loseConnection()
            raise
        except (SMTPClientError, ConnectionError, RemoteProtocolError, LocalProtocolError) as exc:
            if proto.lost is None:
                proto.transport.abortConnection()
            raise _HopFailed(_lost_text(exc, relay, phase),
                             tls_failed=proto.conn.tls) from exc
        return session

    # ---- queue delivery -------------------------------------------------

    def deliver_batch(self, messages: Sequence[Message]) -> Deferred[list[dict[str, Reply]]]:
        """Deliver ``(qid, envelope, open_body, body_len)`` messages, up to
        ``max_messages_per_connection`` per connection.

        ``open_body()`` returns a binary file positioned at the body, of
        which ``body_len`` bytes are sent.  Fires (never fails) with one
        dict per message, in order: recipient address -> the RCPT reply if
        it was not 2xx, else the reply to the end of data.  Connection
        problems give 451s: 4.4.1 if no hop could be used, 4.4.2 for a
        connection lost or timed out mid-batch.
        """
        return _coro(self._deliver_batch(list(messages)))

    async def _deliver_batch(self, messages: list[Message]) -> list[dict[str, Reply]]:
        out: list[dict[str, Reply]] = []
        session: Session | None = None
        gone: Reply | None = None          # the connection broke: the rest of the batch waits
        started = self.reactor.seconds()
        try:
            for qid, env, open_body, body_len in messages:
                if session is not None and session.messages_sent >= self.max_messages_per_connection:
                    await session.close()
                    session = None
                if session is None and gone is None:
                    try:
                        session = self._take_cached() or await self._open_session(None)
                    except NextHopUnavailable as exc:
                        gone = exc.reply
                if session is not None and gone is None and not session.usable:
                    gone = Reply(451, "4.4.2", f"lost connection with {session.relay} "
                                               "while delivering an earlier message")
                if gone is not None:
                    result = {r.address: gone for r in env.recipients}
                    relay = session.relay if session is not None else "none"
                else:
                    relay = session.relay
                    try:
                        result = await self._deliver_message(session, qid, env, open_body, body_len)
                    except Exception:                   # a bug: defer, never lose
                        self.log.failure("{qid}: delivery to {relay} failed", qid=qid, relay=relay)
                        session.protocol.transport.abortConnection()
                        reply = Reply(451, "4.3.0", "local error while delivering")
                        result = {r.address: reply for r in env.recipients}
                if debug_enabled():
                    self._log_message(qid, env, relay, started, result)
                out.append(result)
        finally:
            if session is not None:
                if self._reusable(session):
                    self._keep(session)
                else:
                    await session.close()
        return out

    def _take_cached(self, announced: bool = False) -> Session | None:
        """The newest kept session of the kind asked for (connections that
        carried XCLIENT serve only other clients' sessions) that may still be used."""
        for i in range(len(self._cached) - 1, -1, -1):
            session, timer = self._cached[i]
            if session.announced != announced:
                continue
            del self._cached[i]
            if timer.active():
                timer.cancel()
            if self._reusable(session):
                return session
            session.close()
        return None

    def _keep(self, session: Session) -> None:
        if self.connection_cache_time <= 0:
            session.close()
            return

        def expire() -> None:
            for i, (s, _t) in enumerate(self._cached):
                if s is session:
                    del self._cached[i]
                    break
            session.close()
        self._cached.append((session, self.reactor.callLater(self.connection_cache_time, expire)))

    def close_cached(self) -> Deferred[None]:
        """QUIT every cached connection (at shutdown)."""
        closing = []
        while self._cached:
            session, timer = self._cached.pop()
            if timer.active():
                timer.cancel()
            closing.append(session.close())
        from twisted.internet.defer import gatherResults
        return gatherResults(closing).addCallback(lambda _: None)

    async def _deliver_message(self, session: Session, qid: str, env: Envelope,
                               open_body: Callable[[], BinaryIO],
                               body_len: int) -> dict[str, Reply]:
        relay = session.relay
        rcpts = [r.address for r in env.recipients]

        def everyone(reply: Reply) -> dict[str, Reply]:
            return {a: reply for a in rcpts}

        ascii_only = env.sender.isascii() and all(a.isascii() for a in rcpts)
        if not ascii_only and "SMTPUTF8" not in session.extensions:
            return everyone(Reply(550, "5.6.7",
                                  f"SMTPUTF8 is required, but was not offered by host {relay}"))
        limit = session.protocol.conn.max_size
        if limit is not None and body_len > limit:
            return everyone(Reply(552, "5.3.4", f"message size {body_len} exceeds size "
                                                f"limit {limit} of server {relay}"))
        try:
            body = open_body()
        except OSError as exc:
            return everyone(Reply(451, "4.3.0", f"cannot open queue file: {exc.strerror or exc}"))
        session.protocol.conn.crlf_checked = self.content_checked
        with body:
            result: dict[str, Reply] = {}
            phase = "sending MAIL FROM"
            try:
                mail_reply, rcpt_replies, data_reply = await session.send_envelope(
                    env, xforward=_xforward_attributes(qid, env.client), size=body_len)
                if not mail_reply.positive:
                    return everyone(mail_reply)
                for address, reply in zip(rcpts, rcpt_replies):
                    if not reply.positive:
                        result[address] = reply
                if data_reply is None or data_reply.code != 354:
                    fallback = data_reply or Reply(554, "5.5.1", "Error: no valid recipients")
                    return {a: result.get(a, fallback) for a in rcpts}
                phase = "sending message body"
                await self._send_body(session, body, body_len)
                phase = "sending end of data -- message may be sent more than once"
                final = await session.end_data()
            except _LocalReadError as exc:
                session.protocol.transport.abortConnection()   # no "." for a partial message
                reply = Reply(451, "4.3.0", f"error reading queue file: {exc}")
                return {a: result.get(a, reply) for a in rcpts}
            except (SMTPClientError, ConnectionError, RemoteProtocolError,
                    LocalProtocolError) as exc:
                if session.protocol.lost is None:
                    session.protocol.transport.abortConnection()
                code = "4.5.0" if isinstance(exc, (RemoteProtocolError,
                                                   LocalProtocolError)) else "4.4.2"
                reply = Reply(451, code, _lost_text(exc, relay, phase))
                return {a: result.get(a, reply) for a in rcpts}
        return {a: result.get(a, final) for a in rcpts}

    @staticmethod
    async def _send_body(session: Session, body: BinaryIO, body_len: int) -> None:
        remaining = body_len
        while remaining > 0:
            try:
                chunk = body.read(min(BODY_CHUNK, remaining))
            except OSError as exc:
                raise _LocalReadError(exc.strerror or str(exc)) from exc
            if not chunk:
                raise _LocalReadError(f"file ends {remaining} bytes early")
            remaining -= len(chunk)
            session.send_data(chunk)
            if not session.is_writable():
                await session.wait_writable()

    def _log_message(self, qid: str, env: Envelope, relay: str, started: float,
                     result: dict[str, Reply]) -> None:
        now = self.reactor.seconds()
        delay = max(0.0, now - (env.received_at or started))
        replies = list(result.values())
        if all(r.positive for r in replies):
            status = "sent"
        elif all(r.permanent for r in replies):
            status = "bounced"
        elif all(r.transient for r in replies):
            status = "deferred"
        else:
            status = "partial"
        distinct: dict[Reply, list[str]] = {}
        for address, reply in result.items():
            distinct.setdefault(reply, []).append(address)
        if len(distinct) == 1:
            detail = str(replies[0]) if replies else ""
        else:
            detail = "; ".join(f"{','.join(f'<{a}>' for a in addrs)}: {reply}"
                               for reply, addrs in distinct.items())
        # The queue manager logs the per-recipient outcome; this line is the transport's view.
        self.log.debug(
            "{qid}: to={to}, relay={relay}, delay={delay:.2f}, status={status} ({detail})",
            qid=qid, to=",".join(f"<{a}>" for a in result), recipients=list(result),
            relay=relay, delay=delay, status=status, detail=detail,
            replies={a: str(r) for a, r in result.items()})


def _load_trust_root(path: str) -> Any:
    """The CA certificates of a PEM file (one or several) as a trust root."""
    from twisted.internet import ssl
    end = b"-----END CERTIFICATE-----"
    with open(path, "rb") as f:
        pem = f.read()
    blocks = [b + end for b in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate found")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


class _LocalReadError(Exception):
    """The queue file could not be read to the announced length."""
