"""The client side of an outside scanner (clamd, spamd, rspamd): servers tried in turn.

An :class:`Exchange` is one connection: the request streamed (the message among its byte
strings, sent in slices of 64 KB as the socket takes them: never copied whole), the answer read until the scanner's protocol says it is
whole (or the connection ends), at most ``max_answer`` octets.  :class:`Servers` holds a
scanner's ``servers`` (host:port, or the absolute path of a local socket) and its per-server
``timeout``: :meth:`Servers.ask` gives one server's answer within it (past it the connection
is aborted), :meth:`Servers.first` the first server whose answer parses, trying the next on a
refused connection, a timeout or an answer that does not parse, each failure logged; when none
answers, one :class:`ScannerError` naming every server's failure.  All on the reactor: a few
writes and reads per message, no thread, and cancellable at the timeout.
"""
from __future__ import annotations

import ipaddress
from typing import Callable

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from shared.config.schema import hostport, hostport_text, path

log = Logger(namespace="smarthost.scanners")

CHUNK = 64 * 1024


class ScannerError(Exception):
    """A scanner is down, slow or answered something unusable."""


def server_setting(value: str):
    """host:port, or the absolute path of the scanner's local (UNIX) socket."""
    return path(value) if value.startswith("/") else hostport(value)


def server_text(server) -> str:
    return server if isinstance(server, str) else hostport_text(*server)


@implementer(IPullProducer)
class Exchange(protocol.Protocol):
    """One request and its answer; :meth:`complete` says when the answer is whole.

    The request goes out as the transport's pull producer: :meth:`pieces` is asked for the
    next piece each time the socket has taken the last, so beside the message at most one
    piece (a 64 KB slice) is held, however large the message."""

    max_answer = 1 << 20

    def __init__(self, request: list[bytes], answered: defer.Deferred) -> None:
        self.request = request
        self.answered = answered
        self.buf = b""
        self.sending = None

    def pieces(self):
        """The request's bytes in the order they go: each part, in slices of :data:`CHUNK`."""
        for part in self.request:
            view = memoryview(part)
            for i in range(0, len(view), CHUNK):
                yield view[i:i + CHUNK]

    def _next(self) -> bytes | None:
        """The next write: pieces joined up to :data:`CHUNK` octets (a small message goes in
        one write, its framing with it); None at the end."""
        out, size = [], 0
        for piece in self.sending:
            out.append(piece)
            size += len(piece)
            if size >= CHUNK:
                break
        return b"".join(out) if out else None

    def connectionMade(self) -> None:
        self.sending = self.pieces()
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sending is None:
            return
        piece = self._next()
        if piece is None:
            self.sending = self.request = None
            self.transport.unregisterProducer()
            return
        self.transport.write(piece)

    def stopProducing(self) -> None:
        self.sending = self.request = None

    def complete(self, buf: bytes, closed: bool) -> bytes | None:
        """The answer in `buf` once it is whole, else None (`closed`: no more will come)."""
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        self.buf += data
        if len(self.buf) > self.max_answer:
            self.transport.abortConnection()
            self.answered.errback(ScannerError(f"an answer over {self.max_answer} octets"))
            return
        answer = self.complete(self.buf, False)
        if answer is not None:
            self.transport.loseConnection()
            self.answered.callback(answer)

    def connectionLost(self, reason) -> None:
        self.sending = self.request = None
        if self.answered.called:
            return
        answer = self.complete(self.buf, True) if self.buf else None
        if answer is None:
            self.answered.errback(ScannerError(f"connection closed before the answer ({reason.getErrorMessage()})"))
        else:
            self.answered.callback(answer)


class Servers:
    """One scanner's servers, tried in turn, each given `timeout` seconds."""

    def __init__(self, reactor, servers: tuple, timeout: float, what: str) -> None:
        self.reactor = reactor
        self.servers = tuple(servers)
        self.timeout = timeout
        self.what = what             # "clamd", "spamd", "rspamd": for the log

    def endpoint(self, server):
        if isinstance(server, str):
            return endpoints.UNIXClientEndpoint(self.reactor, server, timeout=self.timeout)
        host, port = server
        try:
            family = ipaddress.ip_address(host).version
        except ValueError:
            return endpoints.HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        endpoint = endpoints.TCP4ClientEndpoint if family == 4 else endpoints.TCP6ClientEndpoint
        return endpoint(self.reactor, host, port, timeout=self.timeout)

    def ask(self, server, make: Callable[[defer.Deferred], protocol.Protocol]) -> defer.Deferred:
        """One server's answer (`make(answered)` is the protocol), within `timeout` (the
        connection aborted past it)."""
        answered: defer.Deferred = defer.Deferred()
        factory = protocol.Factory.forProtocol(lambda: make(answered))
        factory.noisy = False                 # no "Starting factory" line per message
        connecting = self.endpoint(server).connect(factory)
        state = {}

        def connected(proto):
            state["proto"] = proto
        connecting.addCallbacks(connected, lambda f: answered.called or answered.errback(f))

        def expired():
            proto = state.get("proto")
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            elif not connecting.called:
                connecting.cancel()
            if not answered.called:
                answered.errback(ScannerError(f"no answer in {self.timeout:g}s"))
        timer = self.reactor.callLater(self.timeout, expired)

        def done(result):
            if timer.active():
                timer.cancel()
            return result
        return answered.addBoth(done)

    @defer.inlineCallbacks
    def first(self, make: Callable[[object, defer.Deferred], protocol.Protocol], parse: Callable[[bytes], object],
              final: tuple[type, ...] = ()):
        """`parse` of the first server's answer that parses (`make(server, answered)` is the
        protocol for each); an exception of `final` from `parse` ends the search at once;
        else the next server; none: ScannerError."""
        failures = []
        for server in self.servers:
            where = server_text(server)
            try:
                answer = yield self.ask(server, lambda answered, server=server: make(server, answered))
                return parse(answer)
            except final:
                raise
            except Exception as e:          # down, slow, garbage: the next server
                failures.append(f"{where}: {e}")
                log.warn("{what} {where} failed: {why}", what=self.what, where=where, why=str(e))
        raise ScannerError("; ".join(failures) or f"no {self.what} server configured")
