"""Dangerous settings, bounds, names and paths: refused or warned about by the
schema, and what check_host / the daemon's preflight refuse on this host."""
import math
import os
import pwd
import tomllib

import pytest

from shared.cli import main as cli
from shared.config import ConfigError, check_host, dump, load, parse
from shared.config.schema import TIB, WEEK, YEAR, keys_of
from shared.daemon import preflight
from shared.transport.tls import tls_context
from shared.tlsutil import self_signed

P = "/etc/smarthost/x.toml"
EDGE = {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "relay": {"relay_domains": ["example.org"]}}
FILTER = {"next_hop": {"hosts": ["127.0.0.1:10026"]}, "queue": {"directory": "/var/spool/smarthost"}}
DOMAIN = {"mailboxes": {"domains": ["example.org"], "maildir_root": "/srv/mail", "users": ["alice@example.org"],
                        "aliases": {"postmaster@example.org": "alice@example.org"}}}
BASE = {"edge": EDGE, "filter": FILTER, "domain": DOMAIN}


def config(tier: str, **sections) -> dict:
    """The tier's minimal configuration with `sections` merged in, key by key."""
    out = {s: dict(keys) for s, keys in BASE[tier].items()}
    for section, keys in sections.items():
        out.setdefault(section, {}).update(keys)
    return out


def refused(tier: str, **sections) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse(tier, config(tier, **sections), P)
    assert str(e.value).startswith(f"{P}: {e.value.key}: ")
    return e.value


# -- public address space --------------------------------------------------------------------

@pytest.mark.parametrize("network", ["0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "::/0", "::/1", "8000::/1",
                                     "2000::/3"])
def test_mynetworks_covering_public_space_is_an_open_relay_and_refused(network):
    e = refused("edge", relay={"mynetworks": ["10.0.0.0/8", network]})
    assert e.key == "relay.mynetworks"
    assert "public address space" in e.reason and "open relay" in e.reason
    assert "relay.allow_public_mynetworks = true" in e.reason
    s = parse("edge", config("edge", relay={"mynetworks": [network], "allow_public_mynetworks": True}), P)
    assert [str(n) for n in s.relay.mynetworks] == [network]


@pytest.mark.parametrize("network", ["0.0.0.0/0", "128.0.0.0/1", "::/0", "2000::/3"])
def test_upstream_hosts_covering_public_space_could_forge_xclient_and_are_refused(network):
    e = refused("filter", server={"upstream_hosts": [network]})
    assert e.key == "server.upstream_hosts"
    assert "forge" in e.reason and "XCLIENT" in e.reason
    assert "server.allow_public_upstream_hosts = true" in e.reason
    s = parse("filter", config("filter", server={"upstream_hosts": [network], "allow_public_upstream_hosts": True}))
    assert [str(n) for n in s.server.upstream_hosts] == [network]


def test_private_and_organisation_sized_networks_need_no_permission():
    nets = ["10.0.0.0/8", "fc00::/7", "192.0.2.0/24", "8.8.8.0/24", "127.0.0.1"]
    s = parse("filter", config("filter", relay={"mynetworks": nets}, server={"upstream_hosts": nets}))
    assert len(s.relay.mynetworks) == len(s.server.upstream_hosts) == 5
    assert s.warnings == ()


# -- warnings ---------------------------------------------------------------------------------

def test_safe_configurations_load_without_warnings():
    for tier in ("edge", "filter", "domain"):
        assert parse(tier, config(tier), P).warnings == ()


@pytest.mark.parametrize("section,name", [("relay", "mynetworks"), ("server", "upstream_hosts")])
def test_cidr_with_host_bits_warns_with_the_given_and_the_used_network(section, name):
    s = parse("filter", config("filter", **{section: {name: ["10.0.0.1/8", "192.0.2.1", "198.51.100.0/24"]}}), P)
    assert s.warnings == (f"{P}: {section}.{name}: 10.0.0.1/8 has host bits set; the network used is 10.0.0.0/8",)
    assert [str(n) for n in getattr(getattr(s, section), name)] == ["10.0.0.0/8", "192.0.2.1/32", "198.51.100.0/24"]


def test_empty_edge_relay_domains_warns():
    s = parse("edge", config("edge", relay={"relay_domains": []}), P)
    assert len(s.warnings) == 1
    assert s.warnings[0].startswith(f"{P}: relay.relay_domains: ")
    assert "no domain" in s.warnings[0]


@pytest.mark.parametrize("tier,section", [("filter", "queue"), ("domain", "mailboxes")])
def test_fsync_off_warns_that_a_250_is_no_promise(tier, section):
    s = parse(tier, config(tier, **{section: {"fsync": False}}), P)
    assert len(s.warnings) == 1
    assert s.warnings[0].startswith(f"{P}: {section}.fsync: ")
    assert "250" in s.warnings[0]


def test_a_hosted_domain_without_postmaster_warns():
    """RFC 5321 4.5.1: postmaster must exist; the filter sends its double bounces there."""
    s = parse("domain", config("domain", mailboxes={"domains": ["example.org", "example.net"],
                                                    "users": ["alice@example.org", "postmaster@example.net"],
                                                    "aliases": {}}), P)
    assert s.warnings == (f"{P}: mailboxes.aliases: no postmaster@example.org (RFC 5321 4.5.1: every domain "
                          "has one); mail to it, and the filter's double bounces, are refused",)


def test_check_config_prints_warnings_and_exits_0(tmp_path, capsys):
    path = tmp_path / "filter.toml"
    path.write_text('tier = "filter"\n[next_hop]\nhosts = ["127.0.0.1:10026"]\n'
                    f'[queue]\ndirectory = "{tmp_path / "spool"}"\nfsync = false\n'
                    '[relay]\nmynetworks = ["10.0.0.1/8"]\n')
    assert cli(["check-config", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"smarthost check-config: warning: {path}: relay.mynetworks: 10.0.0.1/8 has host bits")
    assert err[1].startswith(f"smarthost check-config: warning: {path}: queue.fsync: ")


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("section,name", [("server", "hostname"), ("next_hop", "helo_name")])
@pytest.mark.parametrize("value,reason", [
    ("mx example.org", "whitespace or a control character"),
    ("mx.example.org\r\nMAIL FROM:<x>", "whitespace or a control character"),
    ("mx.example.org\n", "whitespace or a control character"),
    ("mx\texample.org", "whitespace or a control character"),
    ("mx\x00.example.org", "whitespace or a control character"),
    ("mx..example.org", "not a hostname"),
    ("-mx.example.org", "not a hostname"),
    ("mx.example.org.", "not a hostname"),
    ("<mx>", "not a hostname"),
    ("192.0.2.1", "not a hostname"),
    ("a" * 64 + ".example.org", "not a hostname"),
])
def test_bad_host_names_are_refused(section, name, value, reason):
    e = refused("edge", **{section: {name: value}})
    assert e.key == f"{section}.{name}"
    assert reason in e.reason


def test_good_host_names_pass():
    for value in ("mx.example.org", "MX-1.Example.org", "mx_1.example.org", "localhost"):
        s = parse("edge", config("edge", server={"hostname": value}))
        assert s.hostname == s.next_hop.helo_name == value


def test_the_default_hostname_must_be_a_hostname_too(monkeypatch):
    monkeypatch.setattr("shared.config.schema.socket.getfqdn", lambda: "bad host")
    e = refused("edge")
    assert e.key == "server.hostname" and "not set" in e.reason and "whitespace" in e.reason


# -- mailbox addresses ---------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["../../../tmp/x@example.org", "a/b@example.org", ".@example.org",
                                  "..@example.org", ".hidden@example.org", "a\x00b@example.org",
                                  "a\nb@example.org"])
def test_a_user_local_part_must_be_one_directory_name(user):
    e = refused("domain", mailboxes={"users": [user]})
    assert e.key == "mailboxes.users"
    assert "directory under mailboxes.maildir_root" in e.reason


@pytest.mark.parametrize("alias,targets", [("../x@example.org", ["alice@example.org"]),
                                           ("team@example.org", ["../alice@example.org"]),
                                           ("team@example.org", "a/b@example.org")])
def test_alias_addresses_and_targets_follow_the_same_rule(alias, targets):
    e = refused("domain", mailboxes={"aliases": {alias: targets}})
    assert e.key == f"mailboxes.aliases.{alias}"
    assert "directory under mailboxes.maildir_root" in e.reason


def test_alias_targets_must_be_strings():
    e = refused("domain", mailboxes={"aliases": {"team@example.org": [1]}})
    assert e.key == "mailboxes.aliases.team@example.org" and "expected an address" in e.reason


# -- numbers ------------------------------------------------------------------------------------

NUMERIC = sorted({(tier, section, name) for tier in BASE for section, keys in keys_of(tier).items()
                  for name, key in keys.items() if key.type in (int, (int, float))
                  if section not in ("listeners", "policies")})
FLOATS = [(tier, section, name) for tier, section, name in NUMERIC
          if keys_of(tier)[section][name].type == (int, float)]


@pytest.mark.parametrize("tier,section,name", NUMERIC)
def test_every_number_has_an_upper_bound(tier, section, name):
    e = refused(tier, **{section: {name: 2 ** 63 - 1}})
    assert e.key == f"{section}.{name}"
    assert "at most" in e.reason


@pytest.mark.parametrize("tier,section,name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_never_pass(tier, section, name, value):
    assert refused(tier, **{section: {name: value}}).key == f"{section}.{name}"


@pytest.mark.parametrize("tier,section,name,largest", [
    ("edge", "server", "max_message_size", TIB), ("edge", "server", "max_line_length", 1 << 20),
    ("edge", "server", "command_timeout", WEEK), ("edge", "server", "shutdown_timeout", WEEK),
    ("edge", "next_hop", "command_timeout", WEEK), ("filter", "queue", "lifetime", YEAR),
    ("filter", "queue", "concurrency", 10_000), ("edge", "server", "max_recipients", 100_000),
    ("edge", "server", "max_errors", 1000), ("filter", "verify", "positive_ttl", WEEK),
    ("edge", "server", "max_junk_commands", 100_000),
])
def test_bounds_are_inclusive(tier, section, name, largest):
    assert getattr(getattr(parse(tier, config(tier, **{section: {name: largest}})), section), name) == largest
    e = refused(tier, **{section: {name: largest + 1}})
    assert f"at most {largest}" in e.reason


def test_max_message_size_over_64_bits_is_refused_not_advertised():
    e = refused("edge", server={"max_message_size": 2 ** 64})
    assert e.key == "server.max_message_size" and "1 TiB" in e.reason


def test_line_length_is_none_or_at_least_what_rfc_5321_requires():
    assert parse("edge", config("edge", server={"max_line_length": 0})).server.max_line_length == 0
    e = refused("edge", server={"max_line_length": 999})
    assert e.key == "server.max_line_length" and "at least 1000" in e.reason


# -- arrays, paths, name servers -----------------------------------------------------------------

def test_array_items_must_be_strings():
    e = refused("edge", server={"listen": [25]})
    assert (e.key, e.reason) == ("server.listen", "item 1: expected string, got integer 25")
    assert refused("edge", relay={"relay_domains": ["example.org", ["x"]]}).key == "relay.relay_domains"


@pytest.mark.parametrize("tier,section,name,value,reason", [
    ("filter", "queue", "directory", "spool/filter", "not an absolute path"),
    ("domain", "mailboxes", "maildir_root", "mail", "not an absolute path"),
    ("edge", "log", "file", "smarthost.log", "not an absolute path"),
    ("edge", "log", "file", "", "- for standard error"),
    ("edge", "server", "tls_cert", "cert.pem", "not an absolute path"),
    ("filter", "queue", "directory", "/var/spool/a\x00b", "NUL"),
])
def test_paths_must_be_absolute(tier, section, name, value, reason):
    sections = {section: {name: value}}
    if name == "tls_cert":
        sections[section]["tls_key"] = "/etc/key.pem"
    e = refused(tier, **sections)
    assert e.key == f"{section}.{name}" and reason in e.reason


@pytest.mark.parametrize("tier,section,name,value", [
    ("edge", "next_hop", "hosts", []), ("filter", "next_hop", "hosts", []), ("filter", "queue", "directory", ""),
    ("domain", "mailboxes", "maildir_root", ""), ("domain", "mailboxes", "domains", []),
])
def test_required_keys_must_not_be_empty(tier, section, name, value):
    e = refused(tier, **{section: {name: value}})
    assert (e.key, e.reason) == (f"{section}.{name}", f"required for the {tier} tier: must not be empty")


@pytest.mark.parametrize("section,name", [("server", "listen"), ("next_hop", "hosts")])
@pytest.mark.parametrize("value", ["*:25", "mx example.org:25", "mx..example.org:25", "1.2.3:25"])
def test_host_port_names_an_ip_address_or_a_hostname(section, name, value):
    e = refused("edge", **{section: {name: [value]}})
    assert e.key == f"{section}.{name}" and "neither an IP address nor a hostname" in e.reason


def test_name_servers_are_ip_addresses():
    e = refused("edge", dns={"nameservers": ["dns.example.org:53"]})
    assert e.key == "dns.nameservers" and "not an IP address" in e.reason
    s = parse("edge", config("edge", dns={"nameservers": ["192.0.2.53:53", "[2001:db8::53]:53"]}))
    assert s.dns.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 53))


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'tier = "edge"\n[server]\nhostname = "caf\xe9.example"\n')
    with pytest.raises(ConfigError) as e:
        load(None, path)
    assert e.value.path == str(path)
    assert "not UTF-8" in e.value.reason and "line 3" in e.value.reason


def test_dump_escapes_control_characters():
    value = "edge.example.org\r\nRSET\x00\x7f\t\\\""
    assert tomllib.loads(dump("edge", {"next_hop": {"helo_name": value}}))["next_hop"]["helo_name"] == value


# -- this host ----------------------------------------------------------------------------------

def host(tmp_path, tier="filter", **sections):
    """Settings whose log, spool and mailboxes are in tmp_path, with `sections` merged in."""
    paths = {"log": {"file": str(tmp_path / "x.log")}, "queue": {"directory": str(tmp_path / "spool")},
             "mailboxes": {"maildir_root": str(tmp_path / "mail")}}
    for section, keys in sections.items():
        paths.setdefault(section, {}).update(keys)
    if tier != "domain":
        del paths["mailboxes"]
    if tier != "filter":
        del paths["queue"]
    return parse(tier, config(tier, **paths), P)


def host_refused(settings) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        check_host(settings)
    assert str(e.value).startswith(f"{P}: {e.value.key}: ")
    return e.value


def test_a_usable_host_passes_and_nothing_is_created(tmp_path):
    s = host(tmp_path, queue={"directory": str(tmp_path / "a" / "b" / "spool")})
    check_host(s)
    assert os.listdir(tmp_path) == []


def test_log_file_must_be_creatable_or_writable(tmp_path):
    e = host_refused(host(tmp_path, log={"file": str(tmp_path / "missing" / "x.log")}))
    assert e.key == "log.file" and "does not exist" in e.reason
    e = host_refused(host(tmp_path, log={"file": str(tmp_path)}))
    assert e.key == "log.file" and "is a directory" in e.reason


def test_tls_files_must_be_readable_regular_files(tmp_path):
    (tmp_path / "certs").mkdir()
    key = tmp_path / "key.pem"
    key.write_text("")
    s = host(tmp_path, server={"tls_cert": str(tmp_path / "certs"), "tls_key": str(key)})
    e = host_refused(s)
    assert e.key == "server.tls_cert" and "not a regular file" in e.reason
    s = host(tmp_path, server={"tls_cert": str(key), "tls_key": str(tmp_path / "nokey.pem")})
    e = host_refused(s)     # load() alone accepts it: a reload does not reopen TLS files
    assert e.key == "server.tls_key" and "does not exist" in e.reason


@pytest.mark.parametrize("tier,section,name", [("filter", "queue", "directory"),
                                               ("domain", "mailboxes", "maildir_root")])
def test_spool_and_maildir_root_must_be_creatable(tmp_path, tier, section, name):
    (tmp_path / "file").write_text("")
    s = host(tmp_path, tier, **{section: {name: str(tmp_path / "file" / "sub")}})
    e = host_refused(s)
    assert e.key == f"{section}.{name}"
    assert f"{tmp_path / 'file'} exists and is not a directory" in e.reason


def test_server_user_must_exist(tmp_path):
    e = host_refused(host(tmp_path, server={"user": "no-such-user-smarthost"}))
    assert e.key == "server.user" and "no such user" in e.reason


@pytest.mark.skipif(os.getuid() != 0, reason="a daemon gives up root only when started as root")
def test_spool_is_judged_for_server_user_when_started_as_root(tmp_path):
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    parent = tmp_path / "var"
    parent.mkdir(mode=0o755)
    s = host(tmp_path, server={"user": "nobody"}, queue={"directory": str(parent / "spool")})
    e = host_refused(s)
    assert e.key == "queue.directory" and f"{parent} is not writable by user nobody" in e.reason
    os.chmod(parent, 0o777)
    check_host(s)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    return self_signed(root / "a", "a.example.org"), self_signed(root / "b", "b.example.org")


def test_tls_pair_must_load_and_match(tmp_path, pairs):
    (cert_a, key_a), (_, key_b) = pairs
    s = host(tmp_path, server={"tls_cert": str(cert_a), "tls_key": str(key_a)})
    assert tls_context(s) is not None
    preflight(s)
    s = host(tmp_path, server={"tls_cert": str(cert_a), "tls_key": str(key_b)})
    with pytest.raises(ConfigError) as e:
        preflight(s)
    assert e.value.key == "server.tls_key" and "does not go with" in e.value.reason
    s = host(tmp_path, server={"tls_cert": str(key_a), "tls_key": str(key_a)})
    with pytest.raises(ConfigError) as e:
        tls_context(s)
    assert e.value.key == "server.tls_cert" and "no PEM certificate" in e.value.reason


def test_preflight_refuses_what_would_crash_the_tls_loader(tmp_path, pairs):
    s = host(tmp_path, server={"tls_cert": str(tmp_path), "tls_key": str(pairs[0][1])})
    with pytest.raises(ConfigError) as e:
        preflight(s)
    assert e.value.key == "server.tls_cert"



def test_reverse_lookups_are_on_at_the_edge_only_by_default():
    """The inner tiers learn the client's name from XCLIENT: no DNS query for their upstream."""
    assert parse("edge", config("edge"), P).server.reverse_lookup is True
    for tier in ("filter", "domain"):
        assert parse(tier, config(tier), P).server.reverse_lookup is False
        assert parse(tier, config(tier, server={"reverse_lookup": True}), P).server.reverse_lookup is True


def test_tls_versions_and_ciphers_are_checked_where_start_up_would(tmp_path):
    cert, key = self_signed(tmp_path, "mx.example.org")
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    assert refused("edge", server={"tls_min_version": "SSLv3"}).key == "server.tls_min_version"
    old = parse("edge", config("edge", server={**tls, "tls_min_version": "TLSv1.1"}), P)
    assert any("server.tls_min_version: TLSv1.1: deprecated (RFC 8996)" in w for w in old.warnings)
    bad = parse("edge", config("edge", server={**tls, "tls_ciphers": "NO-SUCH-CIPHER"}), P)
    with pytest.raises(ConfigError) as e:
        tls_context(bad)
    assert e.value.key == "server.tls_ciphers" and "selects no cipher" in e.value.reason


def test_tls_sni_entries_are_checked_at_load_and_listeners_may_have_their_own():
    tls = {"tls_cert": "/etc/ssl/mx.pem", "tls_key": "/etc/ssl/mx.key"}
    s = parse("edge", config("edge", server={**tls, "tls_sni": ["Mail.Example.ORG /etc/ssl/m.pem /etc/ssl/m.key",
                                                                 "*.example.net /etc/ssl/w.pem /etc/ssl/w.key"]},
                             listeners={"mx": {"endpoint": "tcp:25"},
                                        "other": {"endpoint": "tcp:26",
                                                  "tls_sni": ["a.example.org /etc/a.pem /etc/a.key"]}}), P)
    assert s.server.tls_sni == ("mail.example.org /etc/ssl/m.pem /etc/ssl/m.key",
                                "*.example.net /etc/ssl/w.pem /etc/ssl/w.key")
    assert s.listeners["mx"].tls_sni == s.server.tls_sni                     # inherited
    assert s.listeners["other"].tls_sni == ("a.example.org /etc/a.pem /etc/a.key",)
    for entry, reason in (("mail.example.org /etc/m.pem", "is not 'NAME CERT KEY'"),
                          ("mail.example.org m.pem /etc/m.key", "not an absolute path"),
                          ("*.org /etc/m.pem /etc/m.key", "is not a server name"),
                          ("bad_name! /etc/m.pem /etc/m.key", "is not a server name"),
                          ("*.*.example.org /etc/m.pem /etc/m.key", "is not a server name")):
        e = refused("edge", server={**tls, "tls_sni": [entry]})
        assert e.key == "server.tls_sni" and reason in e.reason, (entry, e)
    e = refused("edge", server={**tls, "tls_sni": ["a.example.org /a /b", "A.example.org /c /d"]})
    assert (e.key, e.reason) == ("server.tls_sni", "a.example.org is listed twice")
    e = refused("edge", server={"tls_sni": ["a.example.org /a /b"]})
    assert e.key == "server.tls_sni" and "needs tls_cert and tls_key" in e.reason
    e = refused("edge", server=tls, listeners={"mx": {"endpoint": "tcp:25", "tls_sni": ["a.example.org /a /b",
                                                                                       "a.example.org /c /d"]}})
    assert e.key == "listeners.mx.tls_sni"


def test_client_certificate_settings_are_checked_at_load():
    s = parse("edge", config("edge", relay={"client_certificates": ["ab" * 32, ":".join(["0F"] * 32)]},
                             server={"tls_client_certificates": "ask"}), P)
    assert s.relay.client_certificates == (":".join(["AB"] * 32), ":".join(["0F"] * 32))
    assert s.listeners["smtp"].tls_client_certificates == "ask"
    e = refused("edge", relay={"client_certificates": ["ab" * 31]})
    assert e.key == "relay.client_certificates" and "is not a SHA-256 fingerprint" in e.reason
    e = refused("edge", server={"tls_client_certificates": "require"})
    assert e.key == "server.tls_client_certificates" and "must be one of none, ask" in e.reason
    e = refused("edge", server={"tls_client_ca": "ca.pem"})
    assert e.key == "server.tls_client_ca" and "not an absolute path" in e.reason
    for tier in ("filter", "domain"):
        e = refused(tier, relay={"client_certificates": ["ab" * 32]})
        assert e.key == "relay.client_certificates" and "never sees the original client's certificate" in e.reason
    s = parse("edge", config("edge", policies={"default": {"relay": ["relay_domains", "client_certificate"]}}), P)
    assert any("policies.default.relay: client_certificate permits nobody: relay.client_certificates is empty"
               in w for w in s.warnings)


def test_tls_sni_and_client_ca_files_are_judged_on_this_host(tmp_path, pairs):
    (cert, key), _ = pairs
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    s = host(tmp_path, server={**tls, "tls_sni": [f"a.example.org {cert} {tmp_path / 'none.pem'}"]})
    e = host_refused(s)
    assert (e.key, e.reason) == ("server.tls_sni", f"a.example.org: {tmp_path / 'none.pem'} does not exist")
    s = host(tmp_path, server={**tls, "tls_client_certificates": "ask", "tls_client_ca": str(tmp_path)})
    e = host_refused(s)
    assert (e.key, e.reason) == ("server.tls_client_ca", f"{tmp_path} is not a regular file")
    s = host(tmp_path, server={**tls, "tls_client_certificates": "ask", "tls_client_ca": str(key)})
    with pytest.raises(ConfigError) as e:
        tls_context(s)
    assert (e.value.key, e.value.reason) == ("server.tls_client_ca", f"no PEM certificate in {key}")


def test_sni_names_find_their_context_exact_first_then_one_label_wildcards(tmp_path, pairs):
    (cert_a, key_a), (cert_b, key_b) = pairs
    s = host(tmp_path, server={"tls_cert": str(cert_a), "tls_key": str(key_a),
                               "tls_sni": [f"mail.example.org {cert_b} {key_b}",
                                           f"*.example.org {cert_a} {key_a}"]})
    tls = tls_context(s)
    exact, wild = tls.by_name["mail.example.org"], tls.by_name["*.example.org"]
    assert tls.context_for(b"mail.example.org") is exact
    assert tls.context_for(b"MAIL.EXAMPLE.ORG.") is exact
    assert tls.context_for(b"x.example.org") is wild
    for other in (b"x.y.example.org", b"example.org", b"mail.example.net", b"", None, b"\xff.example.org"):
        assert tls.context_for(other) is None, other
