"""The next-hop session pool: RelayClient against scripted SMTP servers connected
through twisted.test.iosim (failover, TLS, XCLIENT, the connection cache)."""
from __future__ import annotations

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from shared.envelope import ClientInfo
from shared.transport.pool import NextHop, NextHopUnavailable, RelayClient
from tests.shared.transport.fakes import FakeTLS, World, no_unhandled_deferred_errors  # noqa: F401


def test_failover_skips_refused_and_hanging_hops():
    world = World({("a", 25): "refused", ("b", 25): "hang", ("c", 2525): {}})
    session = world.run(world.relay().open_session())
    assert world.attempts == [("a", 25), ("b", 25), ("c", 2525)]
    assert session.relay == "c[c]:2525" and session.usable
    assert world.servers[0].commands == [b"EHLO edge.example.net"]
    world.run(session.close())
    assert world.servers[0].commands[-1] == b"QUIT"



def test_open_session_sends_xclient_when_offered():
    world = World({("filter", 10025): {"extensions": ("PIPELINING",
                                                      "XCLIENT ADDR HELO NAME PROTO")}})
    relay = world.relay(xclient=True)
    info = ClientInfo(addr="198.51.100.9", port=5000, helo="x y", proto="SMTP")
    session = world.run(relay.open_session(info))
    server = world.servers[0]
    assert server.xclient == [b"XCLIENT NAME=[UNAVAILABLE] ADDR=198.51.100.9 PROTO=SMTP HELO=x+20y"]
    assert server.commands[-1] == b"EHLO edge.example.net"        # EHLO again after 220
    assert session.usable


def test_refused_xclient_fails_the_hop_and_plain_hops_are_used_without_it():
    hosts = {("a", 25): {"extensions": ("XCLIENT ADDR",), "xclient_reply": "550 5.7.0 no"},
             ("b", 25): {}}
    world = World(hosts)
    session = world.run(world.relay(xclient=True).open_session(ClientInfo(addr="192.0.2.1")))
    assert session.relay == "b[b]:25" and world.servers[1].xclient == []
    world = World({("a", 25): hosts[("a", 25)]})
    with pytest.raises(NextHopUnavailable, match="refused XCLIENT: 550 5.7.0 no"):
        world.run(world.relay(xclient=True).open_session(ClientInfo(addr="192.0.2.1")))


def test_tls_encrypt_needs_starttls_and_uses_it():
    world = World({("plain", 25): {}, ("tls", 25): {"tls": True}})
    relay = world.relay(tls="encrypt", tls_options=lambda host: FakeTLS())
    session = world.run(relay.open_session())
    assert session.relay == "tls[tls]:25" and session.tls
    assert world.servers[0].commands == [b"EHLO edge.example.net"]   # no STARTTLS offered
    assert world.servers[1].commands == [b"EHLO edge.example.net", b"STARTTLS",
                                         b"EHLO edge.example.net"]

    world = World({("plain", 25): {}})
    with pytest.raises(NextHopUnavailable, match="TLS is required, but was not offered"):
        world.run(world.relay(tls="encrypt", tls_options=lambda host: FakeTLS()).open_session())


def test_tls_may_falls_back_to_plaintext_after_failed_handshake():
    world = World({("mx", 25): {"tls": True}})
    relay = world.relay(tls="may", tls_options=lambda host: FakeTLS(ok=False))
    session = world.run(relay.open_session())
    assert not session.tls and len(world.servers) == 2
    assert b"STARTTLS" not in world.servers[1].commands


def test_relay_client_validates_its_configuration():
    clock = MemoryReactorClock()
    with pytest.raises(ValueError):
        RelayClient(clock, [], helo_name="x.example")
    with pytest.raises(ValueError):
        RelayClient(clock, [("a", 25)], helo_name="x.example", tls="maybe")
    with pytest.raises(ValueError):
        RelayClient(clock, [("a", 25)], helo_name="x.example", max_messages_per_connection=0)
    assert RelayClient(clock, [("a", 25)], helo_name="x.example").next_hops == [NextHop("a", 25)]


def test_address_next_hops_connect_directly_names_are_resolved():
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
    r = MemoryReactorClock()
    client = RelayClient(r, [("127.0.0.1", 25)], helo_name="x.example")
    for host, kind in (("192.0.2.7", TCP4ClientEndpoint), ("2001:db8::7", TCP6ClientEndpoint),
                       ("mx.example.org", HostnameEndpoint)):
        assert type(client._default_endpoint(host, 25)) is kind
    from twisted.internet.protocol import Factory
    client._default_endpoint("192.0.2.7", 2525).connect(Factory.forProtocol(Protocol))
    host, port, _, timeout, _ = r.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.7", 2525, client.connect_timeout)


def test_released_session_serves_the_next_client_with_a_new_xclient():
    world = World({("filter", 10025): {"extensions": ("PIPELINING", "XCLIENT ADDR HELO NAME PROTO")}})
    relay = world.relay(xclient=True, connection_cache_time=2.0)
    first = world.run(relay.open_session(ClientInfo(addr="198.51.100.9", helo="one")))
    assert first.announced
    relay.release(first)
    assert world.servers[0].commands[-1] == b"EHLO edge.example.net"    # no QUIT: kept
    second = world.run(relay.open_session(ClientInfo(addr="198.51.100.10", helo="two")))
    assert second is first and len(world.servers) == 1
    assert world.servers[0].xclient[-1] == (b"XCLIENT NAME=[UNAVAILABLE] ADDR=198.51.100.10 "
                                            b"PROTO=[UNAVAILABLE] HELO=two")
    assert world.servers[0].commands[-1] == b"EHLO edge.example.net" and second.usable
    # queue deliveries never get a connection that speaks for a client
    relay.release(second)
    assert relay._take_cached() is None and relay._take_cached(announced=True) is second
    relay.release(second)
    # kept for connection_cache_time only, then QUIT
    world.clock.advance(2.5)
    for pump in world.pumps:
        pump.flush()
    assert world.servers[0].commands[-1] == b"QUIT"


def test_kept_session_is_not_reused_past_its_limits_or_when_dead():
    world = World({("filter", 10025): {"extensions": ("XCLIENT ADDR",)}})
    relay = world.relay(xclient=True, connection_reuse_time_limit=60.0)
    s1 = world.run(relay.open_session(ClientInfo(addr="192.0.2.1")))
    world.clock.advance(61)                   # too old to carry another client
    relay.release(s1)
    s2 = world.run(relay.open_session(ClientInfo(addr="192.0.2.2")))
    assert s2 is not s1 and len(world.servers) == 2
    assert world.servers[0].commands[-1] == b"QUIT"
    relay.release(s2)
    world.servers[1].transport.loseConnection()         # the next hop closed it meanwhile
    for pump in world.pumps:
        pump.flush()
    s3 = world.run(relay.open_session(ClientInfo(addr="192.0.2.3")))
    assert s3 is not s2 and s3.usable and len(world.servers) == 3
    # a session in the middle of a transaction is closed, not kept
    world.run(s3.mail("a@example.org"))
    relay.release(s3)
    assert relay._cached == []

