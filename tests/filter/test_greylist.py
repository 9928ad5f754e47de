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
