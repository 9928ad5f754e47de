"""The helo_name check: as a function of a Request, and through a loaded configuration."""
import pytest
from twisted.internet.task import Clock

from shared.blocking import InlinePool
from shared.checks.core import Action, Request
from shared.checks.helo import HeloName, HeloNameSettings
from shared.checks.registry import BuildContext, build_policies
from shared.config import parse
from shared.config.schema import tier_spec
from shared.netlist import NetworkList

EDGE = {"server": {"hostname": "mx.example.org"}, "next_hop": {"hosts": ["127.0.0.1:10025"]},
        "relay": {"relay_domains": ["example.org"], "mynetworks": ["10.0.0.0/8"]}}


def verdict(name, own=HeloNameSettings(), client="192.0.2.1"):
    check = HeloName(own, "mx.example.org", NetworkList(["10.0.0.0/8"]))
    return check(Request(phase="helo", client_address=client, helo=name))


@pytest.mark.parametrize("name", ["mail.example.net", "[192.0.2.7]", "[IPv6:2001:db8::1]", "a-b.example.",
                                  "MX1.EXAMPLE.NET"])
def test_good_names_pass(name):
    assert verdict(name).action is Action.CONTINUE


@pytest.mark.parametrize("name,code", [
    ("bad name!", 501), ("-lead.example.org", 501), ("[300.1.1.1]", 501), ("host.123", 501),
    ("localhost", 504), ("WORKSTATION", 504),
])
def test_invalid_and_non_fqdn_names_are_refused_as_postfix_does(name, code):
    v = verdict(name)
    assert v.action is Action.REJECT and v.reply.code == code and v.reply.enhanced == "5.5.2"
    assert "Helo command rejected" in v.reply.text


def test_each_rule_can_be_turned_off_and_own_name_is_opt_in():
    lax = HeloNameSettings(reject_invalid=False, reject_non_fqdn=False)
    assert verdict("bad name!", lax).action is Action.CONTINUE
    assert verdict("localhost", lax).action is Action.CONTINUE
    assert verdict("mx.example.org").action is Action.CONTINUE         # off by default
    own = HeloNameSettings(reject_own_name=True)
    v = verdict("MX.example.org", own)
    assert (v.action, v.reply.code, v.reply.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert verdict("mx.example.org", own, client="10.1.2.3").action is Action.CONTINUE   # mynetworks


def test_no_helo_yet_is_not_judged():
    assert verdict(None).action is Action.CONTINUE


def _run(chain, phase, **kw):
    out = []
    chain.run(Request(phase=phase, client_address="192.0.2.1", **kw)).addBoth(out.append)
    return out[0]


def test_from_configuration_to_a_running_chain():
    """Its [helo_name] section configures it; the policy decides where and whether it runs."""
    s = parse("edge", {**EDGE, "helo_name": {"reject_own_name": True},
                       "listeners": {"mx": {"endpoint": "tcp:port=2525", "policy": "mx"},
                                     "sub": {"endpoint": "tcp:port=2587"}},
                       "policies": {"mx": {"helo": ["helo_name"]}}})
    policies = build_policies(s, tier_spec("edge"), BuildContext(s, Clock(), InlinePool()))
    mx, default = policies["mx"].chain, policies["default"].chain
    v = _run(mx, "helo", helo="mx.example.org")
    assert v.action is Action.REJECT and v.check == "helo_name" and v.reply.code == 550
    assert _run(default, "helo", helo="mx.example.org").action is Action.CONTINUE     # not in its policy
    assert not default.has("helo") and mx.runs("helo_name", "helo")
