from twisted.internet import defer
from twisted.internet.task import Clock

from shared.checks import CONTINUE, Chain, Check, Request, reject
from shared.checks.core import Action
from shared.checks.relay import relay_policy


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


REQ = Request(phase="rcpt", client_address="192.0.2.7", recipient="u@example.org")


def test_first_final_verdict_wins_in_configured_order():
    seen = []
    def mk(name, verdict):
        def fn(req):
            seen.append(name)
            return verdict
        return Check(name, "rcpt", fn)
    chain = Chain([mk("a", CONTINUE), mk("b", reject(550, "5.7.1", "no")), mk("c", CONTINUE)], reactor=Clock())
    v = result(chain.run(REQ))
    assert v.action is Action.REJECT and v.check == "b" and v.reply.code == 550
    assert seen == ["a", "b"]
    assert chain.runs("b", "rcpt") and not chain.runs("b", "mail")


def test_exception_is_tempfail_not_continue():
    def boom(req):
        raise RuntimeError("bug")
    chain = Chain([Check("boom", "rcpt", boom)], reactor=Clock())
    v = result(chain.run(REQ))
    assert v.action is Action.TEMPFAIL and v.reply.code == 451 and v.reply.enhanced == "4.3.0"


def test_timeout_is_tempfail():
    clock = Clock()
    chain = Chain([Check("slow", "rcpt", lambda r: defer.Deferred(), timeout=5)], reactor=clock)
    d = chain.run(REQ)
    out = []
    d.addBoth(out.append)
    clock.advance(4.9)
    assert out == []
    clock.advance(0.2)
    assert out[0].action is Action.TEMPFAIL and out[0].check == "slow"


def test_non_verdict_is_tempfail():
    chain = Chain([Check("sloppy", "rcpt", lambda r: "OK")], reactor=Clock())
    assert result(chain.run(REQ)).action is Action.TEMPFAIL
    later = Chain([Check("sloppy", "rcpt", lambda r: defer.succeed("OK"))], reactor=Clock())
    assert result(later.run(REQ)).action is Action.TEMPFAIL


def test_async_checks_continue_in_order_and_sync_ones_set_no_timer():
    clock = Clock()
    pending = defer.Deferred()
    seen = []
    chain = Chain([Check("a", "rcpt", lambda r: seen.append("a") or CONTINUE),
                   Check("b", "rcpt", lambda r: seen.append("b") or pending),
                   Check("c", "rcpt", lambda r: seen.append("c") or reject(550, "5.1.1", "no"))],
                  reactor=clock)
    d = chain.run(REQ)
    assert seen == ["a", "b"] and len(clock.getDelayedCalls()) == 1     # only the async check is timed
    pending.callback(CONTINUE)
    v = result(d)
    assert seen == ["a", "b", "c"] and v.action is Action.REJECT and v.check == "c"
    assert clock.getDelayedCalls() == []


def test_other_phases_do_not_run():
    chain = Chain([Check("m", "mail", lambda r: reject(550, "5.0.0", "x"))], reactor=Clock())
    assert result(chain.run(REQ)) is CONTINUE


def test_relay_denied_unless_permitted():
    policy = relay_policy(["example.org"], ["192.0.2.0/28"])
    assert not policy(REQ.at("rcpt", recipient="x@Example.ORG.")).final
    assert not policy(REQ.at("rcpt", recipient="x@elsewhere.net")).final     # 192.0.2.7 in mynetworks
    outsider = Request(phase="rcpt", client_address="198.51.100.1", recipient="x@elsewhere.net")
    v = policy(outsider)
    assert v.action is Action.REJECT and (v.reply.code, v.reply.enhanced) == (554, "5.7.1")
    assert policy(Request(phase="rcpt", client_address="", recipient="x@elsewhere.net")).final
    assert relay_policy(["example.org"], [])(REQ.at("rcpt", recipient="x@sub.example.org")).final


def test_network_list_membership():
    from shared.netlist import NetworkList
    nets = NetworkList(["192.0.2.0/24", "2001:db8::/32"])
    assert "192.0.2.200" in nets and "2001:db8::5" in nets
    assert "::ffff:192.0.2.9" in nets          # IPv4-mapped IPv6 from a dual-stack socket
    assert "198.51.100.1" not in nets and "not-an-ip" not in nets and "" not in nets
    assert "192.0.2.1" not in NetworkList() and not NetworkList()
