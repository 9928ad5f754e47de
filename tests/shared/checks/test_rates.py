"""rate_limits: per-client and per-user counts in fixed windows, exemptions, the replies and
the one log line per client and window; built only when a limit is set; two nodes sharing
a real redis-server share the counts."""
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from shared.blocking import InlinePool
from shared.checks.core import Action, Request
from shared.checks.rates import RateLimits, RateSettings, client_key
from shared.checks.registry import BuildContext, build_policies
from shared.config import parse
from shared.config.schema import tier_spec
from shared.counters import LocalCounters
from shared.daemon import close_all
from shared.netlist import NetworkList
from tests.redisserver import redis_server  # noqa: F401  (the fixture)
from tests.support import on_real_reactor

EDGE = {"server": {"hostname": "mx.example.org"}, "next_hop": {"hosts": ["127.0.0.1:10025"]},
        "relay": {"relay_domains": ["example.org"], "mynetworks": ["10.0.0.0/8"]}}


def limits(clock, **own):
    return RateLimits(RateSettings(**own), LocalCounters(clock), NetworkList(["10.0.0.0/8"]), "mx.example.org")


def ask(check, phase, addr="192.0.2.1", login=None):
    return check(Request(phase=phase, client_address=addr, login=login))


def test_connection_rate_closes_with_421_and_forgets_after_the_window():
    clock = Clock()
    check = limits(clock, connection_rate=2, time_unit=60)
    assert [ask(check, "connect").action for _ in range(2)] == [Action.CONTINUE] * 2
    v = ask(check, "connect")
    assert (v.action, v.reply.code, v.reply.enhanced) == (Action.DISCONNECT, 421, "4.7.0")
    assert v.reply.text == "mx.example.org Error: too many connections from 192.0.2.1"
    assert ask(check, "connect", "192.0.2.2").action is Action.CONTINUE     # another client
    clock.advance(60)
    assert ask(check, "connect").action is Action.CONTINUE
    assert ask(check, "connect", "10.1.2.3").action is Action.CONTINUE     # mynetworks: exempt
    for _ in range(5):
        assert ask(check, "connect", "10.1.2.3").action is Action.CONTINUE


def test_message_and_recipient_rates_are_450_and_users_are_counted_across_addresses():
    clock = Clock()
    check = limits(clock, message_rate=1, recipient_rate=3, user_recipient_rate=4)
    assert ask(check, "mail").action is Action.CONTINUE
    v = ask(check, "mail")
    assert (v.action, v.reply.code, v.reply.enhanced, v.reply.text) == (
        Action.TEMPFAIL, 450, "4.7.1", "Error: too much mail from 192.0.2.1")
    for addr in ("198.51.100.1", "198.51.100.2"):          # a stolen password used from two places
        assert ask(check, "rcpt", addr, login="alice").action is Action.CONTINUE
        assert ask(check, "rcpt", addr, login="alice").action is Action.CONTINUE
    v = ask(check, "rcpt", "198.51.100.3", login="alice")
    assert v.reply.code == 450 and v.reply.text == "Error: too many recipients from user alice"


def test_ipv6_clients_are_counted_by_prefix():
    assert client_key("2001:db8:1:2:3::9", 64) == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.1", 64) == "192.0.2.1"
    clock = Clock()
    check = limits(clock, connection_rate=1)
    assert ask(check, "connect", "2001:db8:1:2::1").action is Action.CONTINUE
    assert ask(check, "connect", "2001:db8:1:2::ffff").action is Action.DISCONNECT    # same /64
    assert ask(check, "connect", "2001:db8:1:3::1").action is Action.CONTINUE


def test_one_log_line_per_client_and_window_naming_the_limit():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = Clock()
        check = limits(clock, message_rate=1)
        for _ in range(5):
            ask(check, "mail")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_namespace") == "smarthost.rates"]
    assert len(lines) == 1 and lines[0]["name"] == "message_rate" and lines[0]["key"] == "192.0.2.1"


def test_built_only_when_a_limit_is_set_and_counters_survive_a_rebuild():
    off = parse("edge", EDGE)
    ctx = BuildContext(off, Clock(), InlinePool())
    assert not build_policies(off, tier_spec("edge"), ctx)["default"].chain.has("connect")
    on = parse("edge", {**EDGE, "rate_limits": {"connection_rate": 1}})
    store = {}
    clock = Clock()
    first = build_policies(on, tier_spec("edge"), BuildContext(on, clock, InlinePool(), store=store))
    chain = first["default"].chain
    assert chain.runs("rate_limits", "connect") and chain.runs("rate_limits", "mail")
    assert verdict(chain, "connect").action is Action.CONTINUE
    again = build_policies(on, tier_spec("edge"), BuildContext(on, clock, InlinePool(), store=store))
    assert again["default"].chain is not chain
    assert verdict(again["default"].chain, "connect").action is Action.DISCONNECT    # the count was kept


def verdict(chain, phase, addr="192.0.2.1", login=None):
    """What the chain answers at once (counted locally)."""
    out = []
    chain.run(Request(phase=phase, client_address=addr, login=login)).addCallback(out.append)
    return out[0]


def test_two_edge_nodes_sharing_redis_hold_clients_and_users_to_one_count(redis_server):
    server = redis_server()
    conf = parse("edge", {**EDGE, "redis": {"servers": [server.address]},
                          "rate_limits": {"connection_rate": 10, "message_rate": 3, "user_message_rate": 4}})

    async def scenario(reactor):
        nodes = [BuildContext(conf, reactor, InlinePool(), store={}) for _ in "ab"]    # two processes
        a, b = (build_policies(conf, tier_spec("edge"), ctx)["default"].chain for ctx in nodes)

        async def ask(chain, phase, addr="192.0.2.1", login=None):
            return await chain.run(Request(phase=phase, client_address=addr, login=login))
        try:
            connects = [await ask(a, "connect") for _ in range(6)] + [await ask(b, "connect") for _ in range(5)]
            mails = [await ask(a, "mail", "198.51.100.1", "alice") for _ in range(2)]
            mails += [await ask(b, "mail", "198.51.100.2", "alice") for _ in range(2)]
            mails += [await ask(a, "mail", "198.51.100.3", "alice")]        # her fifth, from a third place
            mails += [await ask(b, "mail", "198.51.100.1") for _ in range(2)]    # that client's third, fourth
            return connects, mails
        finally:
            for ctx in nodes:
                await close_all(ctx.closers)
    connects, mails = on_real_reactor(scenario)
    assert [v.action for v in connects] == [Action.CONTINUE] * 10 + [Action.DISCONNECT]
    assert (connects[-1].reply.code, connects[-1].reply.enhanced) == (421, "4.7.0")
    assert [v.action for v in mails[:4]] == [Action.CONTINUE] * 4
    assert (mails[4].reply.code, mails[4].reply.text) == (450, "Error: too much mail from user alice")
    assert mails[5].action is Action.CONTINUE
    assert (mails[6].reply.code, mails[6].reply.text) == (450, "Error: too much mail from 198.51.100.1")


def test_tls_rate_refuses_starttls_454_and_implicit_tls_connections_421_from_one_count():
    clock = Clock()
    check = RateLimits(RateSettings(tls_rate=2), LocalCounters(clock), NetworkList(["10.0.0.0/8"]),
                       "mx.example.org", implicit_tls=frozenset({"smtps"}))

    def at(phase, listener="mx", addr="192.0.2.1"):
        return check(Request(phase=phase, client_address=addr, listener=listener))
    assert at("connect").action is Action.CONTINUE              # a plain connection is no TLS session
    assert at("starttls").action is Action.CONTINUE
    assert at("connect", "smtps").action is Action.CONTINUE      # one at port 465: the second
    v = at("starttls")
    assert (v.action, v.reply.code, v.reply.enhanced, v.reply.text) == (
        Action.TEMPFAIL, 454, "4.7.0", "Error: too many new TLS sessions from 192.0.2.1")
    v = at("connect", "smtps")
    assert (v.action, v.reply.code, v.reply.enhanced, v.reply.text) == (
        Action.DISCONNECT, 421, "4.7.0", "mx.example.org Error: too many new TLS sessions from 192.0.2.1")
    assert at("connect").action is Action.CONTINUE               # plaintext sessions are still taken
    assert at("starttls", addr="10.1.2.3").action is Action.CONTINUE      # mynetworks: exempt
    clock.advance(60)
    assert at("starttls").action is Action.CONTINUE


def test_tls_rate_runs_at_starttls_in_the_edges_policies_and_knows_its_implicit_listeners():
    on = parse("edge", {**EDGE, "rate_limits": {"tls_rate": 1},
                        "server": {"hostname": "mx.example.org", "tls_cert": "/etc/ssl/mx.pem",
                                   "tls_key": "/etc/ssl/mx.key"},
                        "listeners": {"mx": {"endpoint": "tcp:25"},
                                      "smtps": {"endpoint": "tcp:465", "role": "submissions"}},
                        "auth": {"users_file": "/etc/smarthost/users"}})
    policies = build_policies(on, tier_spec("edge"), BuildContext(on, Clock(), InlinePool()))
    for name in ("default", "submission"):
        assert policies[name].chain.runs("rate_limits", "starttls"), name
    chain = policies["submission"].chain
    out = []
    for _ in range(2):
        chain.run(Request(phase="connect", client_address="192.0.2.1", listener="smtps")).addCallback(out.append)
    assert [v.action for v in out] == [Action.CONTINUE, Action.DISCONNECT]
