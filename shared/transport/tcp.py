"""Socket options every SMTP connection of smarthost uses."""
from __future__ import annotations

from typing import Callable

from twisted.internet.tcp import Connection


def no_delay(transport) -> None:
    """Send small writes at once (TCP_NODELAY).

    SMTP is a dialogue of short lines; with Nagle's algorithm a reply or the
    final ".\\r\\n" written after a larger segment waits for the peer's delayed
    ACK (about 40 ms on Linux), which would cap every transaction's latency.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def writer(transport) -> Callable[[bytes], None]:
    """A write function for `transport` that sends at once when it can.

    Twisted's ``transport.write`` only buffers: the bytes go out on the next
    reactor turn, after an epoll registration for writability and before
    another to drop it. An SMTP reply or command is a few dozen bytes the
    kernel almost always takes whole, so that round costs more than the send.
    When nothing is queued ahead and the connection is plain TCP, the bytes
    are handed to ``send`` straight away; whatever the kernel does not take
    (or any error) goes through ``transport.write``, which keeps the order,
    the back-pressure and the loss detection Twisted gives. TLS connections,
    and transports that are not Twisted TCP connections, always take the
    ordinary path.
    """
    if not isinstance(transport, Connection) or not hasattr(transport, "_tempDataLen"):
        return transport.write
    send = transport.socket.send

    def write(data: bytes) -> None:
        t = transport
        if t.TLS or t.dataBuffer or t._tempDataLen or t.disconnecting or not t.connected:
            t.write(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            t.write(data)            # the reactor's write finds the error and closes
            return
        if sent < len(data):
            t.write(data[sent:])

    return write
