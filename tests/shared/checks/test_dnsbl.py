"""dnsbl: weighted DNS block- and allowlists at connect, against a real DNS server.

Most tests ask a real DNS server (tests.dnsserver) through twisted.names on a
private real reactor; the timing rules (one timer for all zones, a failing zone
reported once a minute, the TTL clamp) are tested with a fake resolver and a
Clock, where time is the test's.
"""
from __future__ import annotations

import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.names import dns, error as dns_error

from shared.blocking import InlinePool
from shared.checks.core import Action, Request, Verdict
from shared.checks.dnsbl import (Dnsbl, DnsblSettings, DnsblState, allowlisted, parse_site, query_name)
from shared.checks.registry import BuildContext, build_policies, describe
from shared.config import parse
from shared.config.schema import ConfigError, tier_spec
from shared.dns import client_ip
from shared.netlist import NetworkList
from tests.dnsserver import free_port_udp_tcp, real, start_dns_server  # noqa: F401

V6 = "2001:db8::1"
ZONES = {
    "zen.example": [
        ("2.0.0.127", "A", "127.0.0.2"),                   # 127.0.0.2: in zen and bl
        ("3.0.0.127", "A", "127.0.0.4"),                   # 127.0.0.3: in zen only
        ("6.0.0.127", "A", "127.0.0.2"),                   # 127.0.0.6: in zen, and allowlisted
        ("9.0.0.127", "A", "127.255.255.254"),             # 127.0.0.9: an error answer
        ("10.0.0.127", "A", "192.0.2.1"),                  # 127.0.0.10: a parked zone's wildcard
        (query_name(client_ip(V6), "zen.example") + ".", "A", "127.0.0.2"),
    ],
    "bl.example": [
        ("2.0.0.127", "A", "127.0.0.3"),
        ("5.0.0.127", "A", "127.0.0.20"),                  # 127.0.0.5: a code outside most filters
    ],
    "wl.example": [("6.0.0.127", "A", "127.0.10.2")],
    "broken.example": [(f"{n}.0.0.127", "SERVFAIL", None) for n in (2, 3, 7)],
}
UNLISTED = "127.0.0.7"
EDGE = {"server": {"hostname": "mx.example.org"}, "next_hop": {"hosts": ["127.0.0.1:10025"]},
        "relay": {"relay_domains": ["example.org"], "mynetworks": ["10.0.0.0/8"]}}


@pytest.fixture(scope="module")
def zone_server(tmp_path_factory):
    server = start_dns_server(tmp_path_factory.mktemp("dnsbl"), ZONES)
    yield server
    server.stop()


@pytest.fixture
def logged():
    """The dnsbl log events of the test."""
    seen = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)
    yield lambda: [e for e in seen if e.get("log_namespace") == "smarthost.dnsbl"]
    globalLogPublisher.removeObserver(observer)


def text_of(event) -> str:
    from twisted.logger import formatEvent
    return formatEvent(event)


def make(reactor, *, nameservers=None, resolver=None, timeout=3.0, state=None, **own) -> Dnsbl:
    settings = DnsblSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in own.items()})
    return Dnsbl(settings, reactor=reactor, state=state or DnsblState(reactor, settings.cache_size),
                 exempt=NetworkList(["10.0.0.0/8"]), hostname="mx.example.org", timeout=timeout,
                 nameservers=nameservers, resolver=resolver)


def ask(real, check, address: str, port: int = 40000) -> Verdict:
    answer = check(Request(phase="connect", client_address=address, client_port=port))
    return answer if isinstance(answer, Verdict) else real.wait(answer)


@pytest.fixture
def lists(zone_server, real):
    """`lists(zones, **settings)`: a dnsbl check asking the test server."""
    def build(zones, **own):
        return make(real.reactor, nameservers=zone_server.nameservers, zones=zones, **own)
    return build


# -- scores and verdicts, against the real server -----------------------------------

def test_a_listed_client_is_refused_naming_the_zone_and_an_unlisted_one_passes(lists, real, logged):
    check = lists(["zen.example"])
    v = ask(real, check, "127.0.0.3", port=40123)
    assert (v.action, v.reply.code, v.reply.enhanced) == (Action.REJECT, 554, "5.7.1")
    assert v.reply.text == "mx.example.org: client [127.0.0.3] is listed by zen.example"
    assert v.result.score == 1 and v.result.listing_zones == ("zen.example",)
    lines = [text_of(e) for e in logged()]
    assert lines == ["dnsbl: score 1 for [127.0.0.3]:40123 (threshold 1; zen.example): refused with 554 5.7.1"]
    v = ask(real, check, UNLISTED)
    assert v.action is Action.CONTINUE and v.result.score == 0 and not v.result.allowlisted
    assert len(logged()) == 1                               # no line for a client that passed


def test_weights_add_up_across_zones(lists, real):
    check = lists(["zen.example*2", "bl.example*2"], threshold=4)
    v = ask(real, check, "127.0.0.2")                       # in both
    assert v.action is Action.REJECT and v.result.score == 4
    assert v.reply.text.endswith("is listed by zen.example, bl.example")
    v = ask(real, check, "127.0.0.3")                       # in zen only: 2 < 4
    assert v.action is Action.CONTINUE and v.result.score == 2 and v.result.hits == ("zen.example*2",)


def test_an_allowlist_weight_cancels_a_listing_and_allowlists_the_client(lists, real, logged):
    check = lists(["zen.example*3", "wl.example=127.0.[0..255].[1..3]*-5"], allowlist_threshold=-1)
    v = ask(real, check, "127.0.0.6")                       # zen 3, wl -5
    assert v.action is Action.CONTINUE
    assert (v.result.score, v.result.allowlisted) == (-2, True)
    later = Request(phase="helo", client_address="127.0.0.6", results={"dnsbl": v})
    assert allowlisted(later) and not allowlisted(Request(phase="helo", client_address="127.0.0.6"))
    assert "allowlisted" in text_of(logged()[-1])
    assert ask(real, check, "127.0.0.3").action is Action.REJECT     # zen alone still refuses
    off = lists(["zen.example*3", "wl.example*-5"])                  # no allowlist_threshold: only cancels
    v = ask(real, off, "127.0.0.6")
    assert v.action is Action.CONTINUE and not v.result.allowlisted


@pytest.mark.parametrize("entry, address, refused", [
    ("bl.example=127.0.0.[2..11]", "127.0.0.2", True),      # answers 127.0.0.3
    ("bl.example=127.0.0.[2..11]", "127.0.0.5", False),     # answers 127.0.0.20
    ("bl.example=127.0.0.[3;20]", "127.0.0.5", True),
    ("bl.example=127.0.0.[1;4..19]", "127.0.0.2", False),
    ("bl.example=127.0.0.20", "127.0.0.5", True),
    ("bl.example", "127.0.0.5", True),                      # no filter: any answer
])
def test_the_return_code_filter(lists, real, entry, address, refused):
    v = ask(real, lists([entry]), address)
    assert (v.action is Action.REJECT) is refused, v


def test_one_zone_entered_twice_is_asked_once_and_each_matching_entry_counts(lists, real):
    check = lists(["zen.example=127.0.0.2*2", "zen.example=127.0.0.[2..4]*3", "zen.example=127.0.0.4*7"],
                  threshold=5)
    v = ask(real, check, "127.0.0.2")                       # answers 127.0.0.2: 2 + 3
    assert v.action is Action.REJECT and v.result.score == 5
    assert check.queries_sent == 1


@pytest.mark.parametrize("address", [V6, "::ffff:127.0.0.2"])
def test_ipv6_is_asked_by_nibbles_and_ipv4_mapped_as_ipv4(lists, real, address):
    assert query_name(client_ip(V6), "zen.example") == \
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example"
    v = ask(real, lists(["zen.example"]), address)
    assert v.action is Action.REJECT, v
    assert ask(real, lists(["zen.example"]), "2001:db8::2").action is Action.CONTINUE


def test_a_servfail_zone_fails_open_and_is_reported_once_not_per_client(lists, real, logged):
    check = lists(["broken.example*5", "zen.example"])
    v = ask(real, check, "127.0.0.3")                       # zen still counts
    assert v.action is Action.REJECT and v.result.score == 1 and v.result.failed == ("broken.example",)
    v = ask(real, check, UNLISTED)
    assert v.action is Action.CONTINUE and v.result.failed == ("broken.example",)
    reports = [text_of(e) for e in logged() if "zone broken.example" in text_of(e)]
    assert reports == ["dnsbl: zone broken.example: SERVFAIL; counted as not listing "
                       "(reported once a minute at most)"]
    sent = check.queries_sent
    ask(real, check, UNLISTED)                              # a pass with a failed zone is not kept
    assert check.queries_sent == sent + 1


def test_a_dead_nameserver_fails_open_within_the_timeout(real, logged):
    check = make(real.reactor, nameservers=[("127.0.0.1", free_port_udp_tcp())], timeout=1.0,
                 zones=("zen.example", "bl.example"))
    start = time.monotonic()
    v = ask(real, check, "127.0.0.2")
    assert 0.8 < time.monotonic() - start < 2.0
    assert v.action is Action.CONTINUE and v.result.failed == ("zen.example", "bl.example")
    assert sorted(text_of(e) for e in logged()) == [
        f"dnsbl: zone {z}: no answer within 1s; counted as not listing (reported once a minute at most)"
        for z in ("bl.example", "zen.example")]


@pytest.mark.parametrize("address, said", [("127.0.0.9", "answered 127.255.255.254, an error code"),
                                           ("127.0.0.10", "answered 192.0.2.1, outside 127.0.0.0/8")])
def test_error_codes_and_answers_outside_127_are_logged_and_ignored(lists, real, logged, address, said):
    v = ask(real, lists(["zen.example"]), address)
    assert v.action is Action.CONTINUE and v.result.failed == ("zen.example",)
    assert said in text_of(logged()[-1])


def test_answers_are_served_from_the_cache_when_the_server_is_gone(tmp_path, real):
    server = start_dns_server(tmp_path, {"zen.example": ZONES["zen.example"]})
    try:
        check = make(real.reactor, nameservers=server.nameservers, zones=("zen.example",), timeout=1.0,
                     pass_ttl=0)
        assert ask(real, check, "127.0.0.3").action is Action.REJECT
        assert ask(real, check, UNLISTED).action is Action.CONTINUE      # NXDOMAIN, kept min_ttl
        assert check.queries_sent == 2
    finally:
        server.stop()
    v = check(Request(phase="connect", client_address="127.0.0.3"))
    assert isinstance(v, Verdict) and v.action is Action.REJECT           # decided at once, no DNS
    v = ask(real, check, UNLISTED)
    assert v.action is Action.CONTINUE and not v.result.failed
    assert check.queries_sent == 2


@pytest.mark.parametrize("pass_ttl", [0, 60])
def test_a_client_that_passed_is_not_looked_up_again_for_pass_ttl(tmp_path, real, pass_ttl):
    server = start_dns_server(tmp_path, {"zen.example": ZONES["zen.example"]})
    try:
        check = make(real.reactor, nameservers=server.nameservers, zones=("zen.example",), timeout=1.0,
                     min_ttl=0, pass_ttl=pass_ttl)                # NXDOMAIN answers are not kept
        assert ask(real, check, UNLISTED).result.cached is False
    finally:
        server.stop()
    v = ask(real, check, UNLISTED)
    if pass_ttl:
        assert v.result.cached is True and check.queries_sent == 1
    else:                                                       # asked again, and the server is gone
        assert v.result.failed == ("zen.example",) and check.queries_sent == 2


def test_mynetworks_and_upstream_hosts_are_never_looked_up(lists, real):
    check = lists(["zen.example"])
    assert ask(real, check, "10.1.2.3") is not None and check.queries_sent == 0
    on = parse("edge", {**EDGE, "server": {**EDGE["server"], "upstream_hosts": ["127.0.0.3"]},
                        "dnsbl": {"zones": ["zen.example"]}})
    built = build_policies(on, tier_spec("edge"), BuildContext(on, real.reactor, InlinePool()))
    verdict = real.wait(built["default"].chain.run(Request(phase="connect", client_address="127.0.0.3")))
    assert verdict.action is Action.CONTINUE


@pytest.mark.parametrize("action, code", [("tempfail", (Action.TEMPFAIL, 421, "4.7.0")),
                                          ("ignore", (Action.CONTINUE, None, None))])
def test_the_other_actions(lists, real, logged, action, code):
    v = ask(real, lists(["zen.example"], action=action), "127.0.0.3")
    assert (v.action, v.reply and v.reply.code, v.reply and v.reply.enhanced) == code
    assert v.result.score == 1
    assert text_of(logged()[-1]).endswith("not refused (action ignore)" if action == "ignore"
                                          else "refused with 421 4.7.0")


# -- timing, with a fake resolver and a Clock ----------------------------------------

class Resolver:
    """A twisted.names IResolver answering A queries from {name: Deferred | address | error class}."""

    def __init__(self, table) -> None:
        self.table = table
        self.asked: list[str] = []

    def lookupAddress(self, name: bytes, timeout=None):
        name = name.decode()
        self.asked.append(name)
        value = self.table.get(name, dns_error.DNSNameError)
        if isinstance(value, defer.Deferred):
            return value
        if isinstance(value, type):
            return defer.fail(value())
        address, ttl = value
        return defer.succeed(([dns.RRHeader(name.encode(), dns.A, dns.IN, ttl, dns.Record_A(address))], [], []))


def fired(d):
    box = []
    d.addBoth(box.append)
    assert box, "not decided yet"
    return box[0]


def test_one_timer_bounds_all_zones_and_the_answers_in_time_still_count():
    clock = Clock()
    slow = defer.Deferred()
    fake = Resolver({"2.0.0.127.slow.example": slow, "2.0.0.127.zen.example": ("127.0.0.2", 300)})
    check = make(clock, resolver=fake, timeout=2.0, zones=("slow.example", "zen.example"))
    d = check(Request(phase="connect", client_address="127.0.0.2"))
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    v = fired(d)
    assert v.action is Action.REJECT and v.result.failed == ("slow.example",)
    slow.errback(dns_error.DNSServerError())                # too late: nothing happens
    assert not clock.getDelayedCalls()


def test_a_failing_zone_is_reported_once_a_minute():
    clock = Clock()
    fake = Resolver({f"{n}.0.0.127.broken.example": dns_error.DNSServerError for n in range(1, 10)})
    check = make(clock, resolver=fake, zones=("broken.example",))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for n in range(1, 5):
            check(Request(phase="connect", client_address=f"127.0.0.{n}"))
            clock.advance(10)
        clock.advance(20)                                   # 60 s after the first report
        check(Request(phase="connect", client_address="127.0.0.9"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len([e for e in seen if e.get("zone") == "broken.example"]) == 2


@pytest.mark.parametrize("ttl, kept", [(5, 60), (300, 300), (10**6, 3600)])
def test_answers_are_kept_for_their_ttl_within_min_and_max(ttl, kept):
    clock = Clock()
    fake = Resolver({"2.0.0.127.zen.example": ("127.0.0.2", ttl)})
    check = make(clock, resolver=fake, zones=("zen.example",), min_ttl=60, max_ttl=3600)
    assert fired(check(Request(phase="connect", client_address="127.0.0.2"))).action is Action.REJECT
    clock.advance(kept - 1)
    check(Request(phase="connect", client_address="127.0.0.2"))
    assert len(fake.asked) == 1
    clock.advance(1)
    check(Request(phase="connect", client_address="127.0.0.2"))
    assert len(fake.asked) == 2


# -- configuration -------------------------------------------------------------------

@pytest.mark.parametrize("own, key, reason", [
    ({"zones": ["zen.example*x"]}, "dnsbl.zones", "the weight 'x' is not an integer"),
    ({"zones": ["zen.example*"]}, "dnsbl.zones", "the weight '' is not an integer"),
    ({"zones": ["zen.example*0"]}, "dnsbl.zones", "a weight of 0"),
    ({"zones": ["zen.example=127.0.0.[300]"]}, "dnsbl.zones", "octets run from 0 to 255"),
    ({"zones": ["zen.example=127.0.0.[9..2]"]}, "dnsbl.zones", "the lower one first"),
    ({"zones": ["zen.example=127.0.0.[2-9]"]}, "dnsbl.zones", "neither a number nor a range"),
    ({"zones": ["zen.example=127.0.2"]}, "dnsbl.zones", "is not an IPv4 pattern"),
    ({"zones": ["zen.example="]}, "dnsbl.zones", "is not an IPv4 pattern"),
    ({"zones": ["zen.example=10.0.0.2"]}, "dnsbl.zones", "never matches"),
    ({"zones": ["zen example"]}, "dnsbl.zones", "is not a domain name"),
    ({"zones": ["zen.example", "ZEN.example."]}, "dnsbl.zones", "listed twice"),
    ({"zones": ["zen.example"], "threshold": 0}, "dnsbl.threshold", "at least 1"),
    ({"zones": ["zen.example"], "allowlist_threshold": 2}, "dnsbl.allowlist_threshold", "at most 0"),
    ({"zones": ["zen.example"], "action": "drop"}, "dnsbl.action", "reject, tempfail, ignore"),
    ({"zones": ["zen.example"], "min_ttl": 600, "max_ttl": 60}, "dnsbl.min_ttl", "more than max_ttl"),
])
def test_configuration_errors_name_file_key_and_reason(own, key, reason):
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE, "dnsbl": own}, "/etc/smarthost/edge.toml")
    assert (e.value.path, e.value.key) == ("/etc/smarthost/edge.toml", key)
    assert reason in e.value.reason, e.value.reason


def test_entries_parse_as_postscreen_writes_them():
    site = parse_site("list.dnswl.example=127.0.[0..255].[1..3]*-5")
    assert (site.zone, site.weight) == ("list.dnswl.example", -5)
    assert site.matches(("127.0.10.2",)) and not site.matches(("127.0.10.4",))
    assert parse_site("Zen.Example.").zone == "zen.example" and parse_site("zen.example").weight == 1
    assert parse_site("bl.example=127.0.0.[1..3;7]*+2").matches(("127.0.0.7",))
    warned = parse("edge", {**EDGE, "dnsbl": {"zones": ["wl.example*-5"]}})
    assert any("only allowlists" in w for w in warned.warnings)


def test_off_until_zones_are_set_and_check_config_shows_them():
    off = parse("edge", EDGE)
    assert not build_policies(off, tier_spec("edge"), BuildContext(off, Clock(), InlinePool()))["default"] \
        .chain.runs("dnsbl", "connect")
    assert "3. dnsbl (off): " in describe(off, tier_spec("edge"))
    on = parse("edge", {**EDGE, "dns": {"timeout": 4}, "dnsbl": {"zones": ["zen.example*3", "bl.example"],
                                                                   "threshold": 3}})
    assert build_policies(on, tier_spec("edge"), BuildContext(on, Clock(), InlinePool()))["default"] \
        .chain.runs("dnsbl", "connect")
    text = describe(on, tier_spec("edge"))
    assert "3. dnsbl (timeout 5s): " in text
    assert ("zones zen.example*3, bl.example; threshold 3; allowlist_threshold off; action reject; "
            "lookups within 4s") in text


def test_a_reload_keeps_answers_and_passes_but_not_passes_of_another_zone_list(zone_server, real):
    def build(zones, store):
        s = parse("edge", {**EDGE, "dns": {"nameservers": [f"{zone_server.host}:{zone_server.port}"]},
                           "dnsbl": {"zones": zones}})
        chain = build_policies(s, tier_spec("edge"), BuildContext(s, real.reactor, InlinePool(), store=store))[
            "default"].chain

        def connect(address: str) -> Verdict:
            seen = {}
            real.wait(chain.run(Request(phase="connect", client_address=address), seen.__setitem__))
            return seen["dnsbl"]
        return connect

    store = {}
    assert build(["bl.example"], store)("127.0.0.3").result.cached is False      # passed, kept
    state = store["dnsbl"]
    assert build(["bl.example"], store)("127.0.0.3").result.cached is True       # the same zones
    assert store["dnsbl"] is state
    v = build(["bl.example", "zen.example"], store)("127.0.0.3")                 # another zone list
    assert v.action is Action.REJECT and v.result.hits == ("zen.example",)
    assert state.answers.get("3.0.0.127.bl.example") == ()                      # NXDOMAIN, kept


def test_a_retired_configuration_stops_its_resolver_rereading_resolv_conf():
    from twisted.internet.testing import MemoryReactorClock
    reactor = MemoryReactorClock()
    s = parse("edge", {**EDGE, "dnsbl": {"zones": ["zen.example"]}})         # no [dns] nameservers
    ctx = BuildContext(s, reactor, InlinePool())
    chain = build_policies(s, tier_spec("edge"), ctx)["default"].chain
    chain.run(Request(phase="connect", client_address="192.0.2.1"))       # makes the resolver
    rereads = [c for c in reactor.getDelayedCalls() if "maybeParseConfig" in repr(c.func)]
    assert len(rereads) == 1 and rereads[0].active()
    for close in ctx.closers:
        close()
    assert not rereads[0].active()
