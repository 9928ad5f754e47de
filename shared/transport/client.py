"""The SMTP client on Twisted.

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
:meth:`SMTPClientProtocol.wait_writable` let a caller (the queue's delivery,
or a proxy pausing its own client) wait for room instead of buffering a whole
message in memory.

Connections to next hops, and the sessions kept on them, are
``shared.transport.pool``; the delivery of queued messages over them is
``shared.queue.delivery``.

What it trusts: nothing the server says beyond its reply codes (the
sans-I/O core bounds and checks every reply).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Coroutine, Mapping, Sequence, TypeVar

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from shared.envelope import Envelope
from shared.smtp.client import (NEED_DATA, ClientConnection, LocalProtocolError,
                                RemoteProtocolError, State)
from shared.smtp.reply import Reply
from shared.transport.tcp import no_delay, writer

__all__ = [
    "SMTPClientError", "SMTPTimeoutError", "SMTPConnectionLost", "TLSUnavailable",
    "SMTPClientProtocol", "ClientFactory",
]

_T = TypeVar("_T")


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


class ClientFactory(Factory):
    """Builds one protocol with ``make()`` for a connection attempt (quietly:
    no log line per connection)."""

    noisy = False

    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        proto = self._make()
        proto.factory = self
        return proto
