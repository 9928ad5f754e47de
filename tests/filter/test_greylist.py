"""Greylisting: first sight refused with the wait in the text, the retry after the delay accepted,
the window, the automatic allowlist, the skips; shared by two filter nodes through a real Redis;
Redis down: fail open (or tempfail when configured), never a crash."""
from __future__ import annotations

from dataclasses import replace

import pytest
from twisted.internet import defer, task
from twisted.internet.task import Clock

from filter.greylist import Greylist, GreylistSettings, LocalStore, RedisStore
from shared.checks.core import Action, Request
from shared.config import parse
from shared.redisconn import RedisLink, RedisSettings
from tests.dnsserver import dns_server  # noqa: F401  (the fixture)
from tests.redisserver import redis_server  # noqa: F401  (the fixture)
from tests.support import on_real_reactor

OWN = GreylistSettings(enabled=True)


def rcpt(client="192.0.2.10", sender="a@sender.example", recipient="bob@example.test", **kw) -> Request:
    return Request(phase="rcpt", client_address=client, sender=sender, recipient=recipient, **kw)


def answer(check, request):
    box = []
    d = check(request)
    if isinstance(d, defer.Deferred):
        d.addBoth(box.append)
        return box[0]
    return d


def test_first_sight_waits_the_delay_then_passes_and_is_remembered():
    clock = Clock()
    clock.advance(1_000_000)
    g = Greylist(OWN, LocalStore(clock), clock, ())
    v = answer(g, rcpt())
    assert v.action is Action.TEMPFAIL and (v.reply.code, v.reply.enhanced) == (451, "4.7.1")
    assert "try again in 300 seconds" in v.reply.text
    clock.advance(100)
    v = answer(g, rcpt(client="192.0.2.99"))                 # same /24
    assert v.action is Action.TEMPFAIL and "in 200 seconds" in v.reply.text
    clock.advance(201)
    v = answer(g, rcpt())
    assert v.action is Action.CONTINUE and v.result.result == "passed"
    clock.advance(40 * 86400 - 10)                            # passed triplets are kept 35 days
    assert answer(g, rcpt()).action is Action.TEMPFAIL
    assert answer(g, rcpt(client="198.51.100.1")).action is Action.TEMPFAIL    # another network
    assert answer(g, rcpt(sender="other@sender.example")).action is Action.TEMPFAIL


def test_a_retry_after_the_window_starts_again():
    clock = Clock()
    g = Greylist(OWN, LocalStore(clock), clock, ())
    assert answer(g, rcpt()).action is Action.TEMPFAIL
    clock.advance(86400 + 1)
    v = answer(g, rcpt())
    assert v.action is Action.TEMPFAIL and "in 300 seconds" in v.reply.text
    clock.advance(301)
    assert answer(g, rcpt()).action is Action.CONTINUE


def test_a_network_whose_triplets_passed_often_is_allowed():
    clock = Clock()
    g = Greylist(replace(OWN, auto_allow_count=2), LocalStore(clock), clock, ())
    for n in range(2):
        assert answer(g, rcpt(recipient=f"u{n}@example.test")).action is Action.TEMPFAIL
    clock.advance(301)
    for n in range(2):
        assert answer(g, rcpt(recipient=f"u{n}@example.test")).result.result == "passed"
    v = answer(g, rcpt(recipient="new@example.test", sender="x@elsewhere.example"))
    assert v.action is Action.CONTINUE and v.result.result == "allowed"


def test_ipv6_clients_are_grouped_by_their_64():
    clock = Clock()
    g = Greylist(OWN, LocalStore(clock), clock, ())
    assert answer(g, rcpt(client="2001:db8:1:2::1")).action is Action.TEMPFAIL
    clock.advance(301)
    assert answer(g, rcpt(client="2001:db8:1:2::ffff")).action is Action.CONTINUE
    assert answer(g, rcpt(client="2001:db8:1:3::1")).action is Action.TEMPFAIL


def test_who_is_never_greylisted():
    clock = Clock()
    own = replace(OWN, networks=("203.0.113.0/24",), senders=("partner.example",), recipients=("@open.test",
                                                                                                 "abuse@example.test"))
    g = Greylist(own, LocalStore(clock), clock, ["192.0.2.0/24"])
    assert answer(g, rcpt(login="alice")).result.detail == "authenticated"
    assert answer(g, rcpt(client="192.0.2.5")).result.detail == "allowlisted network"      # mynetworks
    assert answer(g, rcpt(client="203.0.113.5")).result.detail == "allowlisted network"
    assert answer(g, rcpt(client="198.51.100.1", sender="x@mail.partner.example")).result.detail == \
        "allowlisted sender"
    assert answer(g, rcpt(client="198.51.100.1", recipient="a@open.test")).result.detail == "allowlisted recipient"
    assert answer(g, rcpt(client="198.51.100.1", recipient="abuse@example.test")).action is Action.CONTINUE
    assert answer(g, rcpt(client="198.51.100.1")).action is Action.TEMPFAIL


def test_the_check_is_off_unless_enabled_and_its_settings_are_checked():
    from shared.config import ConfigError
    base = {"next_hop": {"hosts": ["127.0.0.1:1"]}, "queue": {"directory": "/tmp/x"}}
    assert parse("filter", base).greylist.enabled is False
    with pytest.raises(ConfigError, match="greylist.recipients"):
        parse("filter", {**base, "greylist": {"recipients": ["not an address"]}})


def test_two_filter_nodes_share_triplets_in_redis_and_redis_down_fails_open(redis_server):
    server = redis_server()

    async def scenario(reactor):
        own = RedisSettings(servers=((server.host, server.port),), timeout=0.5)
        links = [RedisLink(own, reactor, fallback="greylisting fails open", restored="greylisting in redis",
                           backoff=(0.3, 0.6)) for _ in range(2)]
        fast = replace(OWN, delay=1.0)
        a, b = (Greylist(fast, RedisStore(link, "smarthost:grey:"), reactor, ()) for link in links)
        closed = Greylist(replace(fast, on_failure="tempfail"), RedisStore(links[1], "smarthost:grey:"), reactor, ())
        try:
            first = await a(rcpt())
            early = await b(rcpt())
            await task.deferLater(reactor, 1.1, lambda: None)
            later = await b(rcpt())
            again = await a(rcpt())
            keys = sorted(k if isinstance(k, str) else k.decode() for k in server.client().keys("smarthost:grey:*"))
            server.kill()
            down = await a(rcpt(recipient="new@example.test"))
            down_closed = await closed(rcpt(recipient="new2@example.test"))
            return first, early, later, again, keys, down, down_closed
        finally:
            for link in links:
                await link.close()
    first, early, later, again, keys, down, down_closed = on_real_reactor(scenario)
    assert first.action is Action.TEMPFAIL and early.action is Action.TEMPFAIL
    assert later.action is Action.CONTINUE and later.result.result == "passed"
    assert again.result.result == "passed"
    assert len([k for k in keys if k.startswith("smarthost:grey:t:")]) == 1
    assert "smarthost:grey:a:192.0.2.0/24" in keys
    assert down.action is Action.CONTINUE and down.result.result == "unavailable"
    assert [s.name for s in down.symbols] == ["GREYLIST_FAIL"]
    assert down_closed.action is Action.TEMPFAIL and down_closed.reply.code == 451


def test_an_ipv4_mapped_client_is_grouped_with_its_ipv4_network():
    clock = Clock()
    g = Greylist(OWN, LocalStore(clock), clock, ())
    assert answer(g, rcpt(client="::ffff:192.0.2.10")).action is Action.TEMPFAIL
    clock.advance(301)
    assert answer(g, rcpt(client="192.0.2.77")).action is Action.CONTINUE


class _Listed:
    allowlisted = True
    log = "dnslists=allowlisted"


def test_a_dns_allowlisted_client_is_not_greylisted():
    from shared.checks.core import note
    clock = Clock()
    g = Greylist(OWN, LocalStore(clock), clock, ())
    listed = {"dnslists": note(_Listed())}
    assert answer(g, rcpt(results=listed)).result.detail == "DNS-allowlisted client"
    assert answer(g, rcpt()).action is Action.TEMPFAIL


def eod(score, recipients=("bob@example.test", "carol@example.test"), client="192.0.2.10", results=None):
    from filter.actions import Scored
    from shared.checks.core import note
    found = {"actions": note(Scored(score, "no action"))} if score is not None else {}
    return Request(phase="end_of_data", client_address=client, sender="a@sender.example",
                   recipients=tuple(recipients), results={**found, **(results or {})})


def test_with_min_score_only_a_message_scoring_that_much_is_greylisted_at_end_of_data():
    clock = Clock()
    clock.advance(1_000_000)
    own = replace(OWN, min_score=4.0)
    g = Greylist(own, LocalStore(clock), clock, ())
    assert answer(g, rcpt()) is not None and answer(g, rcpt()).action is Action.CONTINUE    # not at RCPT
    assert answer(g, rcpt()).result is None
    low = answer(g, eod(3.9))
    assert low.action is Action.CONTINUE and low.result.result == "skipped" and "3.9 < 4" in low.result.detail
    high = answer(g, eod(4.0))
    assert high.action is Action.TEMPFAIL and high.reply.code == 451 and "300 seconds" in high.reply.text
    clock.advance(120)
    again = answer(g, eod(6.0))                      # too early: the rest of the delay
    assert again.action is Action.TEMPFAIL and "180 seconds" in again.reply.text
    clock.advance(200)
    passed = answer(g, eod(6.0))
    assert passed.action is Action.CONTINUE and passed.result.result == "passed"
    assert answer(g, eod(6.0)).result.detail == "known"
    # one recipient new among known ones: the message waits for it
    fresh = answer(g, eod(6.0, recipients=("bob@example.test", "dave@example.test")))
    assert fresh.action is Action.TEMPFAIL
    # without the actions check's score there is nothing to decide on: not greylisted
    assert answer(g, eod(None)).action is Action.CONTINUE


def test_without_min_score_the_rcpt_verdict_stands_at_end_of_data():
    clock = Clock()
    g = Greylist(OWN, LocalStore(clock), clock, ())
    v = answer(g, rcpt(client="198.51.100.7", login="alice"))
    assert answer(g, eod(99, results={"greylist": v})) is v


def test_by_domain_keys_a_verified_domain_instead_of_the_network():
    from filter.dmarc import DmarcResult
    from shared.checks.core import note
    clock = Clock()
    clock.advance(1_000_000)
    own = replace(OWN, min_score=1.0, by_domain=True)
    g = Greylist(own, LocalStore(clock), clock, ())
    dmarc = {"dmarc": note(DmarcResult("pass", "mail.bulk.example"))}
    assert answer(g, eod(5, client="192.0.2.10", results=dmarc)).action is Action.TEMPFAIL
    clock.advance(400)
    # the retry comes from an address in another network: the domain is the key
    assert answer(g, eod(5, client="203.0.113.77", results=dmarc)).result.result == "passed"
    assert answer(g, eod(5, client="198.51.100.3", results=dmarc)).result.detail == "known"
    # without a DMARC pass the network is the key again
    assert answer(g, eod(5, client="198.51.100.3")).action is Action.TEMPFAIL


def test_by_domain_at_rcpt_evaluates_the_senders_spf(dns_server):
    from shared.resolver import Resolver
    server = dns_server({"bulk.example": [("@", "TXT", "v=spf1 ip4:192.0.2.0/24 ip4:203.0.113.0/24 -all")]})

    async def scenario(reactor):
        resolver = Resolver(reactor=reactor, nameservers=server.nameservers, timeout=2)
        own = replace(OWN, by_domain=True, delay=1)
        g = Greylist(own, LocalStore(reactor), reactor, (), resolver, "filter.test")
        first = await defer.maybeDeferred(g, rcpt(client="192.0.2.10", sender="news@bulk.example"))
        await task.deferLater(reactor, 1.2, lambda: None)
        moved = await defer.maybeDeferred(g, rcpt(client="203.0.113.5", sender="news@bulk.example"))
        stranger = await defer.maybeDeferred(g, rcpt(client="198.51.100.5", sender="news@bulk.example"))
        resolver.close()
        return first, moved, stranger
    first, moved, stranger = on_real_reactor(scenario)
    assert first.action is Action.TEMPFAIL
    assert moved.action is Action.CONTINUE and moved.result.result == "passed"     # same domain, SPF pass
    assert stranger.action is Action.TEMPFAIL       # SPF fails there: keyed on its own network, new


def test_through_redis_sentinel_greylisting_survives_a_failover(redis_server):
    import time
    master = redis_server()
    replica = redis_server(replica_of=master)
    sentinel = redis_server.sentinel(master)
    deadline = time.monotonic() + 10          # the replica in sync and known to Sentinel
    while time.monotonic() < deadline and replica.client().info("replication").get("master_link_status") != "up":
        time.sleep(0.05)

    async def scenario(reactor):
        own = RedisSettings(sentinels=((sentinel.host, sentinel.port),), master_name="mymaster", timeout=0.5)
        link = RedisLink(own, reactor, fallback="greylisting fails open", restored="greylisting in redis",
                         backoff=(0.2, 0.4))
        g = Greylist(replace(OWN, delay=1.0), RedisStore(link, "smarthost:grey:"), reactor, ())
        try:
            first = await g(rcpt())
            await task.deferLater(reactor, 0.3, lambda: None)      # replicated
            master.kill()
            during, promoted = [], None
            for _ in range(100):                                   # Sentinel promotes the replica
                await task.deferLater(reactor, 0.2, lambda: None)
                v = await g(rcpt())
                during.append(v)
                if v.result is not None and v.result.result == "passed":
                    promoted = sentinel.master_address()
                    break
            return first, during, promoted, link.address
        finally:
            await link.close()
    first, during, promoted, address = on_real_reactor(scenario, timeout=40)
    assert address.startswith("mymaster (sentinels 127.0.0.1:")
    assert first.action is Action.TEMPFAIL
    # while there is no master: fail open (never a refusal, never an error); then the new
    # master has the triplet first seen on the old one, and the retry passes
    assert all(v.action is Action.CONTINUE for v in during), [v.result for v in during]
    assert during[-1].result.result == "passed", [v.result for v in during]
    assert promoted == (replica.host, replica.port)


def test_sentinels_and_servers_are_exclusive():
    from shared.config import ConfigError
    base = {"next_hop": {"hosts": ["127.0.0.1:1"]}, "queue": {"directory": "/tmp/x"}}
    s = parse("filter", {**base, "redis": {"sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"], "master_name": "m"}})
    assert s.redis.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    with pytest.raises(ConfigError, match="redis.sentinels"):
        parse("filter", {**base, "redis": {"sentinels": ["10.0.0.1:26379"], "servers": ["10.0.0.3:6379"]}})
    with pytest.raises(ConfigError, match="redis.servers.*sentinels"):
        parse("filter", {**base, "redis": {"servers": ["10.0.0.3:6379", "10.0.0.4:6379"]}})


@pytest.mark.parametrize("answer", [b"HTTP/1.0 200 OK\r\n\r\n", b"-ERR unknown command\r\n", None])
def test_something_else_on_redis_port_fails_open_or_tempfails(answer):
    """Not Redis on the port (another protocol, errors, or silence): never a crash, never a
    refusal unless on_failure says tempfail."""
    from tests.support import GarbageServer
    server = GarbageServer(answer)
    host, port = server.address.rsplit(":", 1)

    async def scenario(reactor):
        link = RedisLink(RedisSettings(servers=((host, int(port)),), timeout=0.5), reactor,
                         fallback="greylisting fails open", restored="greylisting in redis")
        try:
            opened = await Greylist(OWN, RedisStore(link, "smarthost:grey:"), reactor, ())(rcpt())
            closed = await Greylist(replace(OWN, on_failure="tempfail"), RedisStore(link, "smarthost:grey:"),
                                    reactor, ())(rcpt(recipient="other@example.test"))
            return opened, closed
        finally:
            await link.close()
    try:
        opened, closed = on_real_reactor(scenario)
    finally:
        server.close()
    assert opened.action is Action.CONTINUE and [s.name for s in opened.symbols] == ["GREYLIST_FAIL"]
    assert closed.action is Action.TEMPFAIL and closed.reply.code == 451
