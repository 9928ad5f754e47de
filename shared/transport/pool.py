"""The next-hop session pool: connections to the configured next hops, kept for reuse.

:class:`RelayClient` talks to a configured list of next hops, in order: a hop
that refuses, times out, or fails the greeting, EHLO, required STARTTLS or
XCLIENT is skipped for the next; when none can be used the caller gets
:class:`NextHopUnavailable` with the 451 4.4.1 to give (every hop tried and
why).  It opens sessions for a before-queue proxy (:meth:`RelayClient.open_session`,
with XCLIENT, given back with :meth:`RelayClient.release`) and for queue delivery
(:meth:`RelayClient.take_session`, given back with :meth:`RelayClient.put_back`;
the delivery itself is ``shared.queue.delivery``), and keeps a session that is
still usable for a short while, so that the next client or batch skips the
connection, greeting, EHLO and STARTTLS.

What it trusts: the configuration (next hops, TLS policy).  Nothing the next
hop says is trusted beyond its reply codes; with TLS policy "encrypt" the
next hop's certificate is verified against its configured host name.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet import error as net_error
from twisted.internet.defer import (CancelledError, Deferred, TimeoutError as DeferredTimeout,
                                    gatherResults, succeed)
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from shared.envelope import ClientInfo
from shared.smtp.client import UNAVAILABLE, LocalProtocolError, RemoteProtocolError, State
from shared.smtp.reply import Reply
from shared.smtp.syntax import clip_name
from shared.transport.client import (ClientFactory, SMTPClientError, SMTPClientProtocol,
                                     SMTPConnectionLost, SMTPTimeoutError)

__all__ = ["NextHopUnavailable", "NextHop", "Session", "RelayClient", "TLS_POLICIES",
           "xclient_attributes", "xforward_attributes", "failure_text"]

_MAX_REASON = 400               # characters of failure text in a 451 reply

_log = Logger(namespace="smarthost.relay")


class NextHopUnavailable(SMTPClientError):
    """No next hop could be used; ``reply`` is the 451 to give for it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


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

    def abort(self) -> None:
        """Drop the connection now: no QUIT, and no final dot for a message under way."""
        if self.protocol.transport is not None:
            self.protocol.transport.abortConnection()

    def content_checked(self, checked: bool = True) -> None:
        """What this session sends passed our own server core (no bare CR or LF): the
        client skips its line-end pass (dot-stuffing still applies).  Takes effect
        from the next DATA."""
        self.protocol.conn.crlf_checked = checked

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


def failure_text(exc: BaseException, relay: str, phase: str) -> str:
    """What went wrong talking to ``relay`` while in ``phase`` ("sending MAIL FROM"),
    for a 451 reply and the log; ``exc`` is one of the errors a session raises."""
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
        # Our own attribute: the client's TLS protocol and cipher.  Sent only to a next
        # hop that offers it (smarthost tiers do; Postfix does not know it).
        "TLS": clip_name(info.tls) if info.tls else UNAVAILABLE,
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


def xforward_attributes(qid: str, info: ClientInfo) -> dict[str, str]:
    """XFORWARD attributes for a queued message: its queue id as IDENT (so the
    next hop's log names it) and what is known of the original client."""
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


class RelayClient:
    """Sessions with the first usable of ``next_hops``.

    ``tls``: "none" (never STARTTLS), "may" (STARTTLS when offered, without
    certificate verification; a refused STARTTLS or failed handshake falls
    back to plaintext) or "encrypt" (STARTTLS required, certificate
    verified for the hop's host name against ``tls_trust_root``, a PEM CA
    file, or the platform's roots).  ``tls_options(host)`` overrides the
    TLS client options for either policy.  ``xclient``: give the original
    client to hops that offer XCLIENT in :meth:`open_session`.
    ``endpoint_factory(host, port)`` returns the client endpoint to connect
    with (default: a ``HostnameEndpoint``; an address connects directly).

    Connection cache: a delivery connection (:meth:`take_session`) that is
    still usable when its batch ends (:meth:`put_back`) is kept for
    ``connection_cache_time`` seconds and given to the next batch, until it has carried ``max_messages_per_connection`` messages
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
                return Deferred.fromCoroutine(self._reannounce(kept, client_info))
        return Deferred.fromCoroutine(self._open_session(client_info))

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

    def take_session(self) -> Deferred[Session]:
        """A session for queue delivery (no XCLIENT: it speaks for no client):
        the newest kept one that may still be used, else a new connection as
        :meth:`open_session` makes it.  Give it back with :meth:`put_back`."""
        kept = self._take_cached()
        if kept is not None:
            return succeed(kept)
        return Deferred.fromCoroutine(self._open_session(None))

    def put_back(self, session: Session) -> Deferred[None]:
        """Take back a session from :meth:`take_session` once its batch is
        done: kept for the next batch if it may still be used (between
        transactions, under ``max_messages_per_connection`` and
        ``connection_reuse_time_limit``), else closed.  Fires when it is
        closed, at once when it is kept; never fails."""
        if self._reusable(session):
            self._keep(session)
            return succeed(None)
        return session.close()

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
        factory = ClientFactory(lambda: SMTPClientProtocol(
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
            raise _HopFailed(failure_text(exc, relay, phase),
                             tls_failed=proto.conn.tls) from exc
        return session

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
        return gatherResults(closing).addCallback(lambda _: None)


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
