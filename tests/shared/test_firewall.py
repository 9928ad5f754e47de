"""Firewall rules: first match wins across overlapping rules, IPv4 and IPv6, rule files,
and the compiled lookup agreeing with a plain scan of the rules."""
import ipaddress
import random

import pytest

from shared.config import ConfigError, parse
from shared.daemon import firewalls
from shared.firewall import Firewall, RuleError

EDGE = {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "relay": {"relay_domains": ["example.org"]}}


def test_first_match_wins_and_no_match_is_allowed():
    f = Firewall(["allow 192.0.2.8/29", "deny 192.0.2.0/24", "deny 2001:db8::/32", "allow 198.51.100.7"])
    assert f.decide("192.0.2.9").allowed and f.decide("192.0.2.9").rule == "allow 192.0.2.8/29"
    assert not f.decide("192.0.2.1").allowed and not f.decide("192.0.2.255").allowed
    assert f.decide("192.0.3.0") is None                        # no rule: the caller allows
    assert not f.decide("2001:db8:ffff::1").allowed and f.decide("2001:db9::1") is None
    assert not f.decide("::ffff:192.0.2.1").allowed             # IPv4-mapped: judged as IPv4
    assert f.decide("198.51.100.7").allowed and f.decide("198.51.100.8") is None
    assert f.decide("not an address") is None


def test_rule_files_hold_one_network_a_line_and_errors_name_file_and_line(tmp_path):
    drop = tmp_path / "drop.txt"
    drop.write_text("# a feed\n203.0.113.0/24\n\n2001:db8:1::/48   # comment\n")
    f = Firewall(["allow 203.0.113.5", f"deny file:{drop}"])
    assert f.decide("203.0.113.5").allowed
    d = f.decide("203.0.113.6")
    assert not d.allowed and d.rule == f"deny file:{drop} (203.0.113.0/24)"
    assert not f.decide("2001:db8:1::9").allowed
    drop.write_text("203.0.113.0/24\nbogus\n")
    with pytest.raises(RuleError, match=rf"{drop} line 2: 'bogus' is not an IP address"):
        Firewall([f"deny file:{drop}"])
    with pytest.raises(RuleError, match="cannot read"):
        Firewall([f"deny file:{tmp_path / 'missing'}"])


def test_compiled_lookup_agrees_with_a_scan_of_the_rules():
    rng = random.Random(8)
    rules = []
    for _ in range(400):
        base = ipaddress.IPv4Address(rng.choice([0xC0000200, 0xC6336400, 0x0A000000]) + rng.randrange(4096))
        rules.append(f"{rng.choice(['allow', 'deny'])} {ipaddress.ip_network(f'{base}/{rng.randrange(18, 33)}', strict=False)}")
    f = Firewall(rules)
    nets = [(r.split()[0], ipaddress.ip_network(r.split()[1])) for r in rules]
    for _ in range(3000):
        addr = ipaddress.IPv4Address(rng.choice([0xC0000200, 0xC6336400, 0x0A000000]) + rng.randrange(8192))
        expected = next(((a, n) for a, n in nets if addr in n), None)
        got = f.decide(str(addr))
        if expected is None:
            assert got is None, addr
        else:
            assert got is not None and got.allowed == (expected[0] == "allow"), (addr, got, expected)


@pytest.mark.parametrize("rule", ["block 10.0.0.0/8", "deny", "deny 10.0.0.0/33", "deny file:relative.txt",
                                  "deny 10.0.0.0/8 extra"])
def test_bad_rules_are_refused_at_load_naming_the_key(rule):
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE, "firewall": {"rules": [rule]}}, "/etc/smarthost/edge.toml")
    assert e.value.key == "firewall.rules"
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE, "listeners": {"mx": {"endpoint": "tcp:25", "firewall": [rule]}}})
    assert e.value.key == "listeners.mx.firewall"


def test_a_listeners_rules_come_before_the_global_ones(tmp_path):
    s = parse("edge", {**EDGE, "firewall": {"rules": ["deny 192.0.2.0/24"]},
                       "listeners": {"mx": {"endpoint": "tcp:25"},
                                     "partners": {"endpoint": "tcp:2526", "firewall": ["allow 192.0.2.10"]}}})
    walls = firewalls(s)
    assert len(walls["mx"]) == 1 and len(walls["partners"]) == 2
    assert walls["partners"][0].decide("192.0.2.10").allowed
    assert not walls["mx"][0].decide("192.0.2.10").allowed
    missing = parse("edge", {**EDGE, "firewall": {"rules": [f"deny file:{tmp_path / 'nope.txt'}"]}})
    with pytest.raises(ConfigError) as e:
        firewalls(missing)
    assert e.value.key == "firewall.rules" and "nope.txt: cannot read" in e.value.reason
