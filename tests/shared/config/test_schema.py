import tomllib

import pytest

from shared.config import ConfigError, load, parse, render
from shared.config.schema import keys_of

DOMAIN_MIN = {"mailboxes": {"domains": ["example.org"], "maildir_root": "/srv/mail",
                            "users": ["alice@example.org"]}}


def test_defaults_are_safe():
    s = parse("edge", {"next_hop": {"hosts": ["127.0.0.1:10025"]}})
    assert s.relay.mynetworks == ()          # never an open relay by default
    assert s.server.upstream_hosts == ()     # XCLIENT from nobody
    assert s.next_hop.hosts == (("127.0.0.1", 10025),)
    assert s.policies["default"].relay == ("relay_domains", "mynetworks", "authenticated")
    f = parse("filter", {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "queue": {"directory": "/q"}})
    assert f.queue.fsync is True
    assert f.queue.retry_min == 300 and f.queue.retry_max == 4000
    assert f.queue.lifetime == 5 * 86400


@pytest.mark.parametrize("tier,data,key,reason", [
    ("edge", {}, "next_hop.hosts", "required for the edge tier"),
    ("filter", {"next_hop": {"hosts": ["a:1"]}}, "queue.directory", "required"),
    ("domain", {}, "mailboxes.domains", "required"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"listen": ["nope"]}}, "server.listen", "host:port"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"lisen": []}}, "server.lisen", "unknown key"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "sever": {}}, "sever", "not a section of the edge tier"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "relay": {"mynetworks": ["10.0.0.0/33"]}}, "relay.mynetworks", "CIDR"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"max_recipients": True}}, "server.max_recipients", "boolean"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"max_recipients": "5"}}, "server.max_recipients", "expected integer"),
    ("edge", {"next_hop": {"hosts": ["a:1"], "tls": "maybe"}}, "next_hop.tls", "one of"),
    ("filter", {"next_hop": {"hosts": ["a:1"]}, "queue": {"directory": "/q", "retry_min": 500, "retry_max": 100}},
     "queue.retry_max", "smaller"),
    ("domain", {"mailboxes": {**DOMAIN_MIN["mailboxes"], "users": ["bob@other.org"]}}, "mailboxes.users", "hosted domain"),
    ("domain", {"mailboxes": {**DOMAIN_MIN["mailboxes"], "aliases": {"pm@example.org": ["x@example.org"]}}},
     "mailboxes.aliases.pm@example.org", "not a user"),
    ("edge", {"tier": "filter"}, "tier", "configures the 'filter' tier"),
])
def test_errors_name_key_and_reason(tier, data, key, reason):
    with pytest.raises(ConfigError) as e:
        parse(tier, data, "/etc/smarthost/x.toml")
    assert e.value.key == key
    assert reason in e.value.reason
    assert str(e.value).startswith(f"/etc/smarthost/x.toml: {key}: ")


def test_domain_tier_relays_its_hosted_domains_and_normalises_aliases():
    s = parse("domain", {"mailboxes": {**DOMAIN_MIN["mailboxes"], "aliases": {"PM@Example.org": "alice@example.org"}}})
    assert s.relay.relay_domains == ("example.org",)
    assert s.mailboxes.aliases == {"PM@example.org": ["alice@example.org"]}


def test_load_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load("edge", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load("edge", bad)
    assert e.value.path == str(bad)
    untiered = tmp_path / "u.toml"
    untiered.write_text("[server]\n")
    with pytest.raises(ConfigError, match="say which tier") as e:
        load(None, untiered)


def test_render_round_trips(tmp_path):
    s = parse("domain", DOMAIN_MIN)
    text = render(s)
    p = tmp_path / "effective.toml"
    p.write_text(text)
    again = load(None, p)
    assert again.values == s.values
    # every key of the tier's sections is printed with its meaning, and no other tier's
    for section, keys in keys_of("domain").items():
        assert f"[{section}" in text
        for name, key in keys.items():
            if not key.shorthand and (section, name) != ("policies", "settings"):   # (as tables)
                assert f"# {key.doc}\n{name} = " in text
    assert "[queue]" not in text and "[next_hop]" not in text and "[verify]" not in text


# -- each tier accepts only its own sections ------------------------------------------

EDGE_MIN = {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "relay": {"relay_domains": ["example.org"]}}


@pytest.mark.parametrize("section,owner", [("queue", "filter"), ("mailboxes", "domain"), ("verify", "filter")])
def test_an_edge_file_with_another_tiers_section_is_refused_naming_it(section, owner):
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE_MIN, section: {}}, "/etc/smarthost/edge.toml")
    assert e.value.key == section
    assert f"not a section of the edge tier: a setting of the {owner} tier" in e.value.reason


def test_the_domain_tier_has_no_next_hop_and_the_edge_no_queue():
    d = parse("domain", DOMAIN_MIN)
    e = parse("edge", EDGE_MIN)
    assert not d.has("next_hop") and not d.has("queue") and d.has("mailboxes")
    assert not e.has("queue") and not e.has("mailboxes") and e.has("next_hop")
    with pytest.raises(AttributeError, match=r"the edge tier has no \[queue\] section"):
        e.queue


# -- listeners and policies -------------------------------------------------------------

def test_server_listen_is_shorthand_for_one_listener_each():
    s = parse("edge", {**EDGE_MIN, "server": {"listen": ["127.0.0.1:2525", "[::1]:2525"]}})
    assert {n: (lst.endpoint, lst.policy, lst.tls) for n, lst in s.listeners.items()} == {
        "smtp": ("tcp:port=2525:interface=127.0.0.1", "default", "starttls"),
        "smtp-2": (r"tcp:port=2525:interface=\:\:1", "default", "starttls")}


def test_listeners_name_their_policy_and_policies_their_checks():
    s = parse("edge", {**EDGE_MIN,
                       "listeners": {"mx": {"endpoint": "tcp:port=2525:interface=127.0.0.1", "policy": "strict"},
                                     "proxied": {"endpoint": "haproxy:tcp:port=2526:interface=127.0.0.1", "proxy_hosts": ["127.0.0.1"]}},
                       "policies": {"strict": {"helo": ["helo_name"], "relay": ["mynetworks", "relay_domains"]}}})
    assert s.listeners["mx"].policy == "strict" and s.listeners["proxied"].policy == "default"
    strict = s.policies["strict"]
    assert strict.helo == ("helo_name",) and strict.rcpt == ("route", "access", "rate_limits")   # the default
    assert strict.relay == ("mynetworks", "relay_domains")


@pytest.mark.parametrize("data,key,reason", [
    ({"listeners": {"mx": {"endpoint": "tcp:port=25"}}, "server": {"listen": ["127.0.0.1:25"]}},
     "server.listen", "not both"),
    ({"listeners": {"mx": {"endpoint": "tpc:25"}}}, "listeners.mx.endpoint", "not a Twisted endpoint description"),
    ({"listeners": {"mx": {}}}, "listeners.mx.endpoint", "required"),
    ({"listeners": {"lb": {"endpoint": "haproxy:tcp:2525"}}}, "listeners.lb.proxy_hosts", "required"),
    ({"listeners": {"mx": {"endpoint": "tcp:25", "policy": "nope"}}}, "listeners.mx.policy", "no policy 'nope'"),
    ({"listeners": {"mx": {"endpoint": "tcp:25", "tls": "implicit"}}}, "listeners.mx.tls", "server.tls_cert"),
    ({"policies": {"default": {"helo": ["helo_nam"]}}}, "policies.default.helo", "unknown check 'helo_nam'"),
    ({"policies": {"default": {"connect": ["route"]}}}, "policies.default.connect", "runs at rcpt"),
    ({"policies": {"default": {"rcpt": ["verify"]}}}, "policies.default.rcpt", "unknown check 'verify'"),
    ({"policies": {"default": {"rcpt": ["route", "route"]}}}, "policies.default.rcpt", "listed twice"),
    ({"policies": {"default": {"relay": ["everyone"]}}}, "policies.default.relay", "unknown relay permit rule"),
    ({"policies": {"default": {"rcpt": [], "sent": []}}}, "policies.default.sent", "unknown key"),
])
def test_listener_and_policy_mistakes_name_the_key(data, key, reason):
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE_MIN, **data}, "/etc/smarthost/edge.toml")
    assert e.value.key == key
    assert reason in e.value.reason


def test_a_check_section_is_typed_and_validated():
    s = parse("edge", {**EDGE_MIN, "helo_name": {"reject_own_name": True}})
    assert s.helo_name.reject_own_name is True and s.helo_name.reject_non_fqdn is True
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE_MIN, "helo_name": {"reject_own_name": "yes"}})
    assert (e.value.key, e.value.reason) == ("helo_name.reject_own_name", "expected boolean, got str 'yes'")
    with pytest.raises(Exception):          # frozen: code cannot change a setting behind the loader
        s.helo_name.reject_own_name = False


def test_render_of_listeners_and_policies_round_trips(tmp_path):
    s = parse("edge", {**EDGE_MIN, "listeners": {"mx": {"endpoint": "tcp:port=2525:interface=127.0.0.1",
                                                        "policy": "strict"}},
                       "policies": {"strict": {"helo": ["helo_name"]}}})
    p = tmp_path / "effective.toml"
    p.write_text(render(s))
    assert load(None, p).values == s.values


def test_a_policy_sets_its_own_check_settings():
    """[policies.NAME.CHECK]: a listener's policy with its own limits; the rest from [CHECK]."""
    s = parse("edge", {"next_hop": {"hosts": ["127.0.0.1:10025"]},
                       "rate_limits": {"message_rate": 100, "recipient_rate": 500},
                       "policies": {"strict": {"rate_limits": {"message_rate": 5}}}})
    from shared.checks.registry import CheckType  # noqa: F401
    from edge.service import TIER
    rates = next(c for c in TIER.checks if c.name == "rate_limits")
    assert rates.own(s, "strict").message_rate == 5
    assert rates.own(s, "strict").recipient_rate == 500
    assert rates.own(s, "default").message_rate == 100
    assert "\n[policies.strict.rate_limits]\nmessage_rate = 5\n" in render(s)
    assert parse("edge", tomllib.loads(render(s))).policies["strict"].settings == {"rate_limits": {"message_rate": 5}}


@pytest.mark.parametrize("table, where", [
    ({"queue": {"retry_min": 1}}, "policies.p.queue"),
    ({"rate_limits": {"nope": 1}}, "policies.p.rate_limits.nope"),
    ({"rate_limits": {"message_rate": -1}}, "policies.p.rate_limits.message_rate"),
])
def test_bad_policy_settings_are_named(table, where):
    with pytest.raises(ConfigError) as e:
        parse("edge", {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "policies": {"p": table}})
    assert f": {where}: " in str(e.value)
