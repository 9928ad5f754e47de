"""Tests of shared.dns: forward-confirmed reverse DNS.

Two parts:

- unit tests of the FCrDNS logic, the cache and the timeout, with a fake
  IResolver and twisted.internet.task.Clock (no network, no real time);
- integration tests against a real DNS server process (tests.dnsserver),
  queried through twisted.names over real UDP sockets.

The integration tests need a real reactor.  Each test gets a private
SelectReactor instance (never the global one, never installed, never run);
``RealReactor.wait`` spins it with ``iterate()`` until one Deferred fires,
bounded by a deadline, and ``close`` releases its sockets and timers.
"""
from __future__ import annotations

import ipaddress
import time

import pytest
from twisted.internet import defer, error as net_error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure

from shared.dns import (NEGATIVE_TTL, NONE, POSITIVE_TTL_MAX, TEMPFAIL, UNVERIFIED, VERIFIED,
                        ReverseCache, ReverseName, ReverseResolver, client_ip, valid_hostname)
from tests.dnsserver import dns_server, free_port_udp_tcp, start_dns_server  # noqa: F401
from tests.support import RealReactor


def rev(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


# -- fake resolver ----------------------------------------------------------------

def rr(name: str, rtype: int, payload, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), rtype, dns.IN, ttl, payload)


def ptr(owner: str, target: str, ttl: int = 300) -> dns.RRHeader:
    return rr(owner, dns.PTR, dns.Record_PTR(target.encode()), ttl)


def a(owner: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return rr(owner, dns.A, dns.Record_A(address), ttl)


def aaaa(owner: str, address: str, ttl: int = 300) -> dns.RRHeader:
    return rr(owner, dns.AAAA, dns.Record_AAAA(address), ttl)


def cname(owner: str, target: str, ttl: int = 300) -> dns.RRHeader:
    return rr(owner, dns.CNAME, dns.Record_CNAME(target), ttl)


NXDOMAIN = dns_error.DNSNameError
SERVFAIL = dns_error.DNSServerError


class FakeResolver:
    """An IResolver answering from a table {(name, type): answers | exception class | Deferred}.

    Names missing from the table get NXDOMAIN.  Every query is recorded.
    """

    def __init__(self, table=None) -> None:
        self.table = dict(table or {})
        self.asked: list[tuple[str, int]] = []

    def answer(self, name: bytes, rtype: int):
        key = (name.decode(), rtype)
        self.asked.append(key)
        value = self.table.get(key, NXDOMAIN)
        if isinstance(value, defer.Deferred):
            return value
        if isinstance(value, type) and issubclass(value, Exception):
            return defer.fail(value())
        return defer.succeed((list(value), [], []))

    def lookupPointer(self, name, timeout=None):
        return self.answer(name, dns.PTR)

    def lookupAddress(self, name, timeout=None):
        return self.answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self.answer(name, dns.AAAA)


def fired(d: defer.Deferred):
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    assert not isinstance(box[0], Failure), box[0]
    return box[0]


def make(table=None, timeout: float = 5.0, **kw):
    clock = Clock()
    fake = FakeResolver(table)
    return ReverseResolver(reactor=clock, resolver=fake, timeout=timeout, **kw), fake, clock


GOOD = {
    (rev("192.0.2.1"), dns.PTR): [ptr(rev("192.0.2.1"), "Mail.Example.ORG.", ttl=900)],
    ("mail.example.org", dns.A): [a("mail.example.org", "192.0.2.1", ttl=600)],
}


# -- unit tests: the FCrDNS decision ------------------------------------------------

def test_verified_name_is_lower_case_without_dot_and_uses_two_queries():
    r, fake, _ = make(GOOD)
    result = fired(r.lookup("192.0.2.1"))
    assert result == ReverseName("mail.example.org", VERIFIED, "mail.example.org")
    assert fake.asked == [(rev("192.0.2.1"), dns.PTR), ("mail.example.org", dns.A)]
    assert (result.hostname, result.xclient_name) == ("mail.example.org", "mail.example.org")


def test_forward_mismatch_is_unverified_and_keeps_the_ptr():
    r, _, _ = make({(rev("192.0.2.2"), dns.PTR): [ptr(rev("192.0.2.2"), "liar.example.")],
                    ("liar.example", dns.A): [a("liar.example", "192.0.2.99")]})
    result = fired(r.lookup("192.0.2.2"))
    assert result == ReverseName(None, UNVERIFIED, "liar.example")
    assert (result.hostname, result.xclient_name, result.xclient_reverse_name) == \
        ("unknown", "[UNAVAILABLE]", "liar.example")


@pytest.mark.parametrize("forward", [NXDOMAIN, []])
def test_forward_name_missing_or_without_address_is_unverified(forward):
    r, _, _ = make({(rev("192.0.2.2"), dns.PTR): [ptr(rev("192.0.2.2"), "gone.example")],
                    ("gone.example", dns.A): forward})
    assert fired(r.lookup("192.0.2.2")) == ReverseName(None, UNVERIFIED, "gone.example")


@pytest.mark.parametrize("answer", [NXDOMAIN, []])
def test_no_ptr_is_none(answer):
    r, fake, _ = make({(rev("192.0.2.3"), dns.PTR): answer})
    assert fired(r.lookup("192.0.2.3")) == ReverseName(None, NONE, None)
    assert len(fake.asked) == 1


@pytest.mark.parametrize("exc", [SERVFAIL, dns_error.DNSQueryRefusedError, defer.TimeoutError,
                                 net_error.ConnectionRefusedError])
def test_ptr_failure_other_than_nxdomain_is_tempfail(exc):
    r, _, _ = make({(rev("192.0.2.4"), dns.PTR): exc})
    result = fired(r.lookup("192.0.2.4"))
    assert result == ReverseName(None, TEMPFAIL, None)
    assert result.xclient_name == "[TEMPUNAVAIL]"


def test_forward_servfail_is_tempfail_with_the_ptr():
    r, _, _ = make({(rev("192.0.2.5"), dns.PTR): [ptr(rev("192.0.2.5"), "flaky.example")],
                    ("flaky.example", dns.A): SERVFAIL})
    assert fired(r.lookup("192.0.2.5")) == ReverseName(None, TEMPFAIL, "flaky.example")


def test_one_verified_name_wins_over_failures_of_the_others():
    owner = rev("192.0.2.6")
    r, _, _ = make({(owner, dns.PTR): [ptr(owner, "a.example"), ptr(owner, "b.example"),
                                        ptr(owner, "c.example")],
                    ("a.example", dns.A): SERVFAIL,
                    ("b.example", dns.A): [a("b.example", "192.0.2.66")],
                    ("c.example", dns.A): [a("c.example", "192.0.2.7"), a("c.example", "192.0.2.6")]})
    assert fired(r.lookup("192.0.2.6")) == ReverseName("c.example", VERIFIED, "a.example")


def test_at_most_five_ptr_names_are_checked():
    owner = rev("192.0.2.8")
    names = [f"n{i}.example" for i in range(7)]
    table = {(owner, dns.PTR): [ptr(owner, n) for n in names]}
    table.update({(n, dns.A): [a(n, "192.0.2.8")] for n in names[5:]})   # only the 6th, 7th match
    r, fake, _ = make(table)
    assert fired(r.lookup("192.0.2.8")) == ReverseName(None, UNVERIFIED, "n0.example")
    assert [q for q in fake.asked if q[1] == dns.A] == [(n, dns.A) for n in names[:5]]


def test_invalid_ptr_names_are_skipped_and_never_reported():
    owner = rev("192.0.2.9")
    r, fake, _ = make({(owner, dns.PTR): [ptr(owner, "192.0.2.9"), ptr(owner, "bad name.example"),
                                          ptr(owner, "-dash.example"), ptr(owner, "ok.example")],
                       ("ok.example", dns.A): [a("ok.example", "192.0.2.9")]})
    assert fired(r.lookup("192.0.2.9")) == ReverseName("ok.example", VERIFIED, "ok.example")
    assert [q[0] for q in fake.asked if q[1] == dns.A] == ["ok.example"]


def test_only_invalid_ptr_names_is_unverified_without_a_name():
    owner = rev("192.0.2.10")
    r, fake, _ = make({(owner, dns.PTR): [ptr(owner, "10.2.0.192"), ptr(owner, "a..b")]})
    assert fired(r.lookup("192.0.2.10")) == ReverseName(None, UNVERIFIED, None)
    assert len(fake.asked) == 1


def test_records_owned_by_other_names_are_ignored():
    r, _, _ = make({(rev("192.0.2.11"), dns.PTR): [ptr(rev("192.0.2.12"), "other.example")],
                    ("other.example", dns.A): [a("other.example", "192.0.2.11")]})
    assert fired(r.lookup("192.0.2.11")) == ReverseName(None, NONE, None)
    r, _, _ = make({(rev("192.0.2.11"), dns.PTR): [ptr(rev("192.0.2.11"), "x.example")],
                    ("x.example", dns.A): [a("y.example", "192.0.2.11")]})
    assert fired(r.lookup("192.0.2.11")) == ReverseName(None, UNVERIFIED, "x.example")


def test_cname_chains_in_answers_are_followed():
    owner = rev("192.0.2.13")
    delegated = "13.0/25.2.0.192.in-addr.arpa"             # RFC 2317 classless delegation
    r, _, _ = make({(owner, dns.PTR): [cname(owner, delegated), ptr(delegated, "host.example")],
                    ("host.example", dns.A): [cname("host.example", "real.example"),
                                              a("real.example", "192.0.2.13")]})
    assert fired(r.lookup("192.0.2.13")) == ReverseName("host.example", VERIFIED, "host.example")


def test_ipv6_uses_nibble_form_and_aaaa():
    owner = rev("2001:db8::25")
    assert owner.endswith(".8.b.d.0.1.0.0.2.ip6.arpa") and len(owner.split(".")) == 34
    r, fake, _ = make({(owner, dns.PTR): [ptr(owner, "v6.example")],
                       ("v6.example", dns.AAAA): [aaaa("v6.example", "2001:db8::25")],
                       ("v6.example", dns.A): [a("v6.example", "192.0.2.25")]})
    assert fired(r.lookup("2001:DB8::25")) == ReverseName("v6.example", VERIFIED, "v6.example")
    assert fake.asked == [(owner, dns.PTR), ("v6.example", dns.AAAA)]


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4():
    r, fake, _ = make(GOOD)
    assert fired(r.lookup("::ffff:192.0.2.1")).name == "mail.example.org"
    assert fake.asked[0] == (rev("192.0.2.1"), dns.PTR)
    assert fired(r.lookup("[IPv6:::ffff:192.0.2.1]")).name == "mail.example.org"
    assert len(fake.asked) == 2                                 # the same cache entry


@pytest.mark.parametrize("bad", ["", "example.org", "192.0.2.256", "1.2.3.4\r\n", "2001:db8::g", "[1.2.3.4", None, b"1.2.3.4"])
def test_not_an_address_is_none_without_a_query(bad):
    r, fake, _ = make()
    assert fired(r.lookup(bad)) == ReverseName(None, NONE, None)
    assert fake.asked == []


def test_resolver_that_raises_gives_tempfail():
    class Broken(FakeResolver):
        def lookupPointer(self, name, timeout=None):
            raise RuntimeError("bug")
    clock = Clock()
    r = ReverseResolver(reactor=clock, resolver=Broken())
    assert fired(r.lookup("192.0.2.1")).status == TEMPFAIL
    assert clock.getDelayedCalls() == []


def test_malformed_record_in_answer_gives_tempfail_not_an_exception():
    owner = rev("192.0.2.14")
    odd = a("odd.example", "192.0.2.14")
    odd.payload = dns.Record_PTR(b"x")                   # an A header carrying no address
    r, _, _ = make({(owner, dns.PTR): [ptr(owner, "odd.example")], ("odd.example", dns.A): [odd]})
    assert fired(r.lookup("192.0.2.14")) == ReverseName(None, TEMPFAIL, "odd.example")


# -- unit tests: timeout, sharing, cache -----------------------------------------------

def test_whole_lookup_is_bounded_by_timeout_and_late_answers_are_ignored():
    pending = defer.Deferred()
    r, _, clock = make({(rev("192.0.2.1"), dns.PTR): GOOD[(rev("192.0.2.1"), dns.PTR)],
                        ("mail.example.org", dns.A): pending}, timeout=2.0)
    d = r.lookup("192.0.2.1")
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    assert fired(d) == ReverseName(None, TEMPFAIL, "mail.example.org")
    pending.callback(([a("mail.example.org", "192.0.2.1")], [], []))    # too late: no effect
    assert r.cache.get("192.0.2.1") is None and r.inflight == {}


def test_timer_is_cancelled_when_the_answer_comes_first():
    r, _, clock = make(GOOD)
    fired(r.lookup("192.0.2.1"))
    assert clock.getDelayedCalls() == []


def test_concurrent_lookups_of_one_address_share_one_exchange():
    pending = defer.Deferred()
    r, fake, _ = make({(rev("192.0.2.1"), dns.PTR): pending,
                       ("mail.example.org", dns.A): GOOD[("mail.example.org", dns.A)]})
    first, second = r.lookup("192.0.2.1"), r.lookup("::ffff:192.0.2.1")
    second.cancel()                               # one caller giving up does not hurt the other
    assert not first.called
    pending.callback((GOOD[(rev("192.0.2.1"), dns.PTR)], [], []))
    assert fired(first).status == VERIFIED
    assert fake.asked.count((rev("192.0.2.1"), dns.PTR)) == 1


def test_positive_result_cached_for_the_smallest_record_ttl():
    r, fake, clock = make(GOOD)                   # PTR ttl 900, A ttl 600
    fired(r.lookup("192.0.2.1"))
    clock.advance(599)
    assert fired(r.lookup("192.0.2.1")).status == VERIFIED
    assert len(fake.asked) == 2
    clock.advance(1)
    fired(r.lookup("192.0.2.1"))
    assert len(fake.asked) == 4


def test_positive_ttl_is_capped():
    owner = rev("192.0.2.1")
    r, fake, clock = make({(owner, dns.PTR): [ptr(owner, "h.example", ttl=86400)],
                           ("h.example", dns.A): [a("h.example", "192.0.2.1", ttl=86400)]})
    fired(r.lookup("192.0.2.1"))
    clock.advance(POSITIVE_TTL_MAX - 1)
    fired(r.lookup("192.0.2.1"))
    assert len(fake.asked) == 2
    clock.advance(1)
    fired(r.lookup("192.0.2.1"))
    assert len(fake.asked) == 4


def test_zero_ttl_is_not_cached():
    owner = rev("192.0.2.1")
    r, fake, _ = make({(owner, dns.PTR): [ptr(owner, "h.example", ttl=0)],
                       ("h.example", dns.A): [a("h.example", "192.0.2.1")]})
    fired(r.lookup("192.0.2.1"))
    fired(r.lookup("192.0.2.1"))
    assert len(fake.asked) == 4


@pytest.mark.parametrize("address", ["192.0.2.3", "192.0.2.2"])
def test_negative_results_cached_for_sixty_seconds(address):
    r, fake, clock = make({(rev("192.0.2.2"), dns.PTR): [ptr(rev("192.0.2.2"), "liar.example")],
                           ("liar.example", dns.A): [a("liar.example", "192.0.2.99", ttl=86400)]})
    first = fired(r.lookup(address))
    assert first.status in (NONE, UNVERIFIED)
    asked = len(fake.asked)
    clock.advance(NEGATIVE_TTL - 1)
    assert fired(r.lookup(address)) == first
    assert len(fake.asked) == asked
    clock.advance(1)
    fired(r.lookup(address))
    assert len(fake.asked) == 2 * asked


def test_tempfail_is_not_cached():
    r, fake, _ = make({(rev("192.0.2.4"), dns.PTR): SERVFAIL})
    fired(r.lookup("192.0.2.4"))
    fired(r.lookup("192.0.2.4"))
    assert len(fake.asked) == 2


def test_cache_is_bounded_and_evicts_the_oldest():
    clock = Clock()
    cache = ReverseCache(clock, size=2)
    for i in range(3):
        cache.put(f"192.0.2.{i}", ReverseName(None, NONE), 60)
    assert len(cache) == 2
    assert cache.get("192.0.2.0") is None
    assert cache.get("192.0.2.2") == ReverseName(None, NONE)


def test_nothing_is_built_or_read_before_the_first_lookup():
    reactor = MemoryReactorClock()
    r = ReverseResolver(reactor=reactor, resolv_conf="/nonexistent/resolv.conf")
    r2 = ReverseResolver(reactor=reactor, nameservers=[("127.0.0.1", 53)])
    assert r.resolver is None and r2.resolver is None
    assert reactor.getDelayedCalls() == []
    # The first lookup builds the resolver (from the missing resolv.conf: 127.0.0.1:53); this
    # fake reactor cannot open UDP ports, and that failure is a tempfail, not an errback.
    assert fired(r.lookup("192.0.2.1")) == ReverseName(None, TEMPFAIL, None)
    assert r.resolver is not None
    with pytest.raises(ValueError):
        ReverseResolver(reactor=reactor, timeout=0)


@pytest.mark.parametrize("name, ok", [
    ("mail.example.org", True), ("a", True), ("x-1.example", True), ("_dmarc.example", True),
    ("1.2.3.4", False), ("host.123", False), ("-a.example", False), ("a-.example", False),
    ("a..example", False), ("", False), ("a b.example", False), ("é.example", False),
    ("a" * 64 + ".example", False), (".".join(["a" * 63] * 4), False),
])
def test_valid_hostname(name, ok):
    assert valid_hostname(name) is ok


def test_client_ip_normalises():
    assert str(client_ip("::FFFF:10.0.0.1")) == "10.0.0.1"
    assert str(client_ip("fe80::1%eth0")) == "fe80::1"
    assert str(client_ip("[IPv6:2001:DB8::1]")) == "2001:db8::1"
    for bad in ("10.0.0", " 10.0.0.1", "IPv6:10.0.0.1x"):
        with pytest.raises(ValueError):
            client_ip(bad)


# -- integration: a real DNS server -----------------------------------------------------

ZONES = {
    "test": [
        ("good", "A", "127.0.0.10", 120),
        ("liar", "A", "127.0.0.99"),
        ("multi-a", "A", "127.0.0.50"),
        ("multi-b", "A", "127.0.0.13"),
        ("alias", "CNAME", "real"),
        ("real", "A", "127.0.0.14"),
        ("v6", "AAAA", "2001:db8::25"),
        ("v6liar", "AAAA", "2001:db8::99"),
    ],
    "0.0.127.in-addr.arpa": [
        ("10", "PTR", "Good.Test."),
        ("11", "PTR", "liar.test."),
        # 12: no PTR at all
        ("13", "PTR", "multi-a.test."),
        ("13", "PTR", "multi-b.test."),
        ("14", "PTR", "alias.test."),
        ("15", "PTR", "127.0.0.15."),
        ("18", "TXT", "a name with data, but no PTR"),
    ],
    "8.b.d.0.1.0.0.2.ip6.arpa": [
        (rev("2001:db8::25") + ".", "PTR", "v6.test."),
        (rev("2001:db8::26") + ".", "PTR", "v6liar.test."),
    ],
}


@pytest.fixture
def real():
    r = RealReactor()
    yield r
    r.close()


@pytest.fixture(scope="module")
def zone_server(tmp_path_factory):
    server = start_dns_server(tmp_path_factory.mktemp("dns"), ZONES)
    yield server
    server.stop()


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.10", ReverseName("good.test", VERIFIED, "good.test")),
    ("127.0.0.11", ReverseName(None, UNVERIFIED, "liar.test")),
    ("127.0.0.12", ReverseName(None, NONE, None)),
    ("127.0.0.18", ReverseName(None, NONE, None)),
    ("127.0.0.13", ReverseName("multi-b.test", VERIFIED, "multi-a.test")),
    ("127.0.0.14", ReverseName("alias.test", VERIFIED, "alias.test")),
    ("127.0.0.15", ReverseName(None, UNVERIFIED, None)),
    ("::ffff:127.0.0.10", ReverseName("good.test", VERIFIED, "good.test")),
    ("2001:db8::25", ReverseName("v6.test", VERIFIED, "v6.test")),
    ("2001:db8::26", ReverseName(None, UNVERIFIED, "v6liar.test")),
    ("2001:db8::27", ReverseName(None, NONE, None)),
])
def test_real_server(zone_server, real, address, expected):
    r = ReverseResolver(reactor=real.reactor, nameservers=zone_server.nameservers, timeout=3.0)
    assert real.wait(r.lookup(address)) == expected


def test_real_server_positive_ttl_comes_from_the_records(zone_server, real):
    r = ReverseResolver(reactor=real.reactor, nameservers=zone_server.nameservers, timeout=3.0)
    real.wait(r.lookup("127.0.0.10"))
    expires, _ = r.cache.entries["127.0.0.10"]
    assert 115 < expires - real.reactor.seconds() <= 120           # good.test A has TTL 120


def test_dead_server_is_tempfail_within_the_timeout(real):
    dead = [("127.0.0.1", free_port_udp_tcp())]
    r = ReverseResolver(reactor=real.reactor, nameservers=dead, timeout=1.0)
    start = time.monotonic()
    result = real.wait(r.lookup("127.0.0.10"), limit=5)
    elapsed = time.monotonic() - start
    assert result == ReverseName(None, TEMPFAIL, None)
    assert 0.8 < elapsed < 1.6


def test_cache_answers_after_the_server_is_gone_but_tempfail_is_retried(dns_server, real):
    server = dns_server(ZONES)
    r = ReverseResolver(reactor=real.reactor, nameservers=server.nameservers, timeout=1.0)
    assert real.wait(r.lookup("127.0.0.10")).status == VERIFIED
    assert real.wait(r.lookup("127.0.0.12")).status == NONE
    assert r.queries_sent == 3
    server.stop()
    assert real.wait(r.lookup("127.0.0.10")) == ReverseName("good.test", VERIFIED, "good.test")
    assert real.wait(r.lookup("127.0.0.12")) == ReverseName(None, NONE, None)
    assert r.queries_sent == 3                                      # both from the cache
    assert real.wait(r.lookup("127.0.0.11")).status == TEMPFAIL
    assert real.wait(r.lookup("127.0.0.11")).status == TEMPFAIL
    assert r.queries_sent == 5                                      # tempfail was not cached
