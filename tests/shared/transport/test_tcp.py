"""The direct-send writer against real sockets (a socketpair, no reactor loop)."""
from __future__ import annotations

import socket

import pytest
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport

from shared.transport.tcp import writer


class Reactor:
    """Records what the transport asks of the reactor."""

    def __init__(self) -> None:
        self.writers: set[object] = set()

    def addWriter(self, fd) -> None:
        self.writers.add(fd)

    def removeWriter(self, fd) -> None:
        self.writers.discard(fd)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = Reactor()
    conn = Connection(ours, None, reactor)
    conn.connected = 1
    yield conn, theirs, reactor
    ours.close()
    theirs.close()


def received(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_sent_at_once_without_the_reactor(pair):
    conn, theirs, reactor = pair
    write = writer(conn)
    write(b"250 2.0.0 Ok\r\n")
    assert received(theirs) == b"250 2.0.0 Ok\r\n"
    assert reactor.writers == set() and conn.dataBuffer == b"" and conn._tempDataLen == 0


def test_queued_bytes_keep_their_place(pair):
    conn, theirs, reactor = pair
    write = writer(conn)
    conn.write(b"first ")                 # waiting for the reactor's turn
    write(b"second")
    assert received(theirs) == b""        # nothing may overtake "first "
    conn.doWrite()
    assert received(theirs) == b"first second"


def test_what_the_kernel_refuses_is_buffered_in_order(pair):
    conn, theirs, reactor = pair
    conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    write = writer(conn)
    big = bytes(range(256)) * 4096        # 1 MiB: more than the socket takes
    write(big)
    write(b"tail")
    assert reactor.writers == {conn}     # the rest waits for writability
    got = b""
    while len(got) < len(big) + 4:
        got += received(theirs)
        conn.doWrite()
    assert got == big + b"tail"


def test_tls_and_closing_connections_take_the_ordinary_path(pair):
    conn, theirs, reactor = pair
    write = writer(conn)
    conn.TLS = True
    calls: list[bytes] = []
    conn.write = calls.append             # type: ignore[method-assign]
    write(b"a")
    conn.TLS = False
    conn.disconnecting = True
    write(b"b")
    assert calls == [b"a", b"b"] and received(theirs) == b""


def test_other_transports_get_their_own_write():
    t = StringTransport()
    assert writer(t) == t.write
