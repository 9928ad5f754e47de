import pytest

from shared.config import ConfigError, load, parse, render
from shared.config.schema import SCHEMA

DOMAIN_MIN = {"mailboxes": {"domains": ["example.org"], "maildir_root": "/srv/mail",
                            "users": ["alice@example.org"]}}


def test_defaults_are_safe():
    s = parse("edge", {"next_hop": {"hosts": ["127.0.0.1:10025"]}})
    assert s["relay"]["mynetworks"] == []          # never an open relay by default
    assert s["server"]["upstream_hosts"] == []     # XCLIENT from nobody
    assert s["queue"]["fsync"] is True
    assert s["queue"]["retry_min"] == 300 and s["queue"]["retry_max"] == 4000
    assert s["queue"]["lifetime"] == 5 * 86400
    assert s["next_hop"]["hosts"] == [("127.0.0.1", 10025)]


@pytest.mark.parametrize("tier,data,key,reason", [
    ("edge", {}, "next_hop.hosts", "required for the edge tier"),
    ("filter", {"next_hop": {"hosts": ["a:1"]}}, "queue.directory", "required"),
    ("domain", {}, "mailboxes.domains", "required"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"listen": ["nope"]}}, "server.listen", "host:port"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"lisen": []}}, "server.lisen", "unknown key"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "sever": {}}, "sever", "unknown section"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "relay": {"mynetworks": ["10.0.0.0/33"]}}, "relay.mynetworks", "CIDR"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"max_recipients": True}}, "server.max_recipients", "boolean"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "server": {"max_recipients": "5"}}, "server.max_recipients", "expected integer"),
    ("edge", {"next_hop": {"hosts": ["a:1"], "tls": "maybe"}}, "next_hop.tls", "one of"),
    ("edge", {"next_hop": {"hosts": ["a:1"]}, "queue": {"retry_min": 500, "retry_max": 100}}, "queue.retry_max", "smaller"),
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
    assert s["relay"]["relay_domains"] == ["example.org"]
    assert s["mailboxes"]["aliases"] == {"PM@example.org": ["alice@example.org"]}


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
    # every key of the schema is printed with its meaning
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for name, key in keys.items():
            assert f"# {key.doc}\n{name} = " in text
