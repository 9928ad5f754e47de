"""Socket options every SMTP connection of smarthost uses."""
from __future__ import annotations


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
