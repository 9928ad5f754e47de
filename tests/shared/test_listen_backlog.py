"""The listen queue of a listener: 511 unless its endpoint description says otherwise
(Twisted's endpoints would make it 50, and a burst of connects then waits for SYN retries)."""
import pytest
from twisted.internet import endpoints, protocol
from twisted.internet.testing import MemoryReactor

from shared.daemon import LISTEN_BACKLOG, with_backlog


@pytest.mark.parametrize("description, expected", [
    ("tcp:port=25:interface=127.0.0.1", f"tcp:port=25:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"),
    ("tcp:25", f"tcp:25:backlog={LISTEN_BACKLOG}"),
    ("tcp6:port=25:interface=\\:\\:1", f"tcp6:port=25:interface=\\:\\:1:backlog={LISTEN_BACKLOG}"),
    ("unix:/run/smtp.sock", f"unix:/run/smtp.sock:backlog={LISTEN_BACKLOG}"),
    ("tcp:port=25:backlog=20", "tcp:port=25:backlog=20"),        # the description's own wins
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # no backlog option there
])
def test_a_stream_endpoint_gets_the_backlog_unless_it_sets_one(description, expected):
    assert with_backlog(description) == expected


def test_the_listening_port_has_the_backlog():
    reactor = MemoryReactor()
    endpoint = endpoints.serverFromString(reactor, with_backlog("tcp:port=2525:interface=127.0.0.1"))
    endpoint.listen(protocol.ServerFactory())
    port, _, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (2525, LISTEN_BACKLOG, "127.0.0.1")
