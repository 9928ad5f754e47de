"""Listeners behind a load balancer speaking the PROXY protocol (HAProxy's, v1 and v2).

A listener whose endpoint is ``haproxy:DESCRIPTION`` gets the client's address from
the PROXY header its balancer sends first.  Twisted's own ``haproxy:`` wrapper
starts the wrapped protocol as soon as the TCP connection is made, before that
header arrives: the session would greet, and be admitted and logged, as the
balancer's address.  So the daemon listens on DESCRIPTION itself and wraps the
sessions in :class:`HeaderFirst`, which parses the header with Twisted's parsers
and only then starts the SMTP session, whose peer is the proxied client.

The header is believed only from the listener's ``proxy_hosts`` (the balancers):
a connection from anywhere else is closed at once, or anyone could claim any
address.  A connection that sends no valid header within ``HEADER_TIMEOUT``
seconds is closed without a word.
"""
from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy

log = Logger(namespace="smarthost.smtpd")

PREFIX = "haproxy:"
HEADER_TIMEOUT = 3.0


def split(description: str) -> tuple[bool, str]:
    """(whether it is a PROXY-protocol listener, the endpoint description to listen on)."""
    if description.startswith(PREFIX):
        return True, description[len(PREFIX):]
    return False, description


class HeaderFirst(HAProxyProtocolWrapper):
    """The SMTP session begins once the PROXY header is read."""

    _started = False
    _timer = None

    def makeConnection(self, transport) -> None:
        """As ProtocolWrapper's, but the wrapped protocol is not started yet."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = getattr(transport.getPeer(), "host", "")
        if peer not in self.factory.proxy_hosts:
            log.info("{peer}: PROXY protocol listener: not one of its proxy_hosts; closed", peer=peer)
            transport.abortConnection()
            return
        self._timer = self.factory.reactor.callLater(HEADER_TIMEOUT, transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        held = []
        inner, self.wrappedProtocol = self.wrappedProtocol, _Collect(held)
        try:
            super().dataReceived(data)          # parses; what follows the header goes to `held`
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            return                              # more header to come, or refused (connection closing)
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        inner.makeConnection(self)
        for chunk in held:
            inner.dataReceived(chunk)

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class _Collect:
    def __init__(self, into: list) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:
        self.into.append(data)


class HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = HeaderFirst

    def __init__(self, wrapped, reactor, proxy_hosts) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.proxy_hosts = proxy_hosts           # a NetworkList: whose PROXY header is believed
