"""The [redis] section: declared by the edge, validated at load with file, key and reason,
its password never printed by check-config, which says where the counters are."""
from __future__ import annotations

import pytest

from shared.config import ConfigError, parse
from shared.config.schema import render
from shared.daemon import describe_policies

EDGE = {"server": {"hostname": "mx.example.org"}, "next_hop": {"hosts": ["127.0.0.1:10025"]}}


def edge(**redis):
    return parse("edge", {**EDGE, "redis": redis}, "/etc/smarthost/edge.toml")


def test_defaults_mean_no_redis():
    s = parse("edge", EDGE)
    assert (s.redis.servers, s.redis.password, s.redis.db, s.redis.key_prefix, s.redis.timeout) == \
        ((), "", 0, "smarthost:", 0.5)
    assert describe_policies(s).splitlines()[-1] == \
        "counters: in this process (no redis.servers): each node counts by itself"


@pytest.mark.parametrize("given, key, reason", [
    ({"servers": ["redis.internal"]}, "redis.servers", "'redis.internal' is not host:port"),
    ({"servers": ["10.0.0.1:6379", "10.0.0.2:6379"]}, "redis.servers",
     "2 servers given: one (for failover, list Redis Sentinel's addresses in redis.sentinels instead)"),
    ({"servers": ["10.0.0.1:6379"], "sentinels": ["10.0.0.2:26379"]}, "redis.sentinels",
     "both servers and sentinels are set"),
    ({"sentinels": ["10.0.0.2:26379"], "master_name": " "}, "redis.master_name", "empty"),
    ({"timeout": 0}, "redis.timeout", "must be greater than 0 and at most 10, got 0"),
    ({"timeout": 30}, "redis.timeout", "must be greater than 0 and at most 10, got 30"),
    ({"db": 70000}, "redis.db", "must be at least 0 and at most 65535, got 70000"),
    ({"key_prefix": "mail relay:"}, "redis.key_prefix", "no whitespace"),
    ({"password": 1234}, "redis.password", "expected string"),
    ({"sentinel": "mymaster"}, "redis.sentinel", "unknown key"),
])
def test_bad_values_are_refused_naming_file_key_and_reason(given, key, reason):
    with pytest.raises(ConfigError) as e:
        edge(**given)
    assert (e.value.path, e.value.key) == ("/etc/smarthost/edge.toml", key) and reason in e.value.reason


def test_only_the_tiers_that_use_redis_have_the_section():
    with pytest.raises(ConfigError) as e:
        parse("domain", {"redis": {"servers": ["127.0.0.1:6379"]}})
    assert e.value.key == "redis" and "a setting of the edge and filter tiers" in e.value.reason


def test_check_config_shows_the_server_and_not_the_password():
    s = edge(servers=["10.0.0.5:6380"], password="s3cret", db=2, key_prefix="mx1:", timeout=0.25)
    text = render(s)
    assert "s3cret" not in text and "\n# password = (set; not shown)\n" in text
    assert 'servers = ["10.0.0.5:6380"]' in text
    assert describe_policies(s).splitlines()[-1] == (
        "counters: in redis at 10.0.0.5:6380 db 2, keys mx1:*, timeout 0.25s, shared by every node "
        "using it; in this process while it does not answer")
    assert 'password = ""' in render(edge())
