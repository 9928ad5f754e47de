"""The access check: tables per phase, Postfix-style key matching, actions and replies,
files read when built, mistakes named with file, key and line."""
import pytest

from shared.checks.access import Access, AccessSettings
from shared.checks.core import Action, Request
from shared.config import ConfigError, parse
from shared.daemon import preflight

EDGE = {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "relay": {"relay_domains": ["example.org"]}}


def ask(check, phase, **kw):
    return check(Request(phase=phase, client_address=kw.pop("addr", "192.0.2.1"), **kw))


def test_each_phase_its_table_and_the_first_entry_decides(tmp_path):
    feed = tmp_path / "clients"
    feed.write_text("# from a feed\n198.51.100.0/24 reject\n198.51.100.7 ok\n")
    check = Access(AccessSettings(
        client=("192.0.2.66 disconnect", f"file:{feed}"),
        helo=("localdomain reject 550 5.7.1 no thanks",),
        sender=("spammer@example.net reject", "bounces@ ok", "example.net tempfail"),
        recipient=("abuse@example.org ok", "example.org reject")))
    v = ask(check, "connect", addr="198.51.100.7")
    assert v.action is Action.REJECT and v.reply.text == "<198.51.100.7>: Client host rejected: Access denied"
    assert ask(check, "connect", addr="192.0.2.66").action is Action.DISCONNECT
    assert ask(check, "connect", addr="192.0.2.67").action is Action.CONTINUE
    v = ask(check, "helo", helo="mx.LocalDomain")                 # a subdomain of the key
    assert (v.reply.code, v.reply.enhanced, v.reply.text) == (550, "5.7.1", "no thanks")
    assert ask(check, "mail", sender="spammer@example.net").reply.code == 554
    assert ask(check, "mail", sender="bounces@anywhere.test").action is Action.ACCEPT      # local part
    v = ask(check, "mail", sender="someone@mail.example.net")                              # parent domain
    assert (v.action, v.reply.code, v.reply.enhanced) == (Action.TEMPFAIL, 450, "4.7.1")
    assert ask(check, "rcpt", recipient="Abuse@Example.org").action is Action.ACCEPT
    assert ask(check, "rcpt", recipient="bob@example.org").action is Action.REJECT
    assert ask(check, "mail", sender="").action is Action.CONTINUE                          # null sender


@pytest.mark.parametrize("entry,reason", [
    ("example.org allow", "is not 'KEY ACTION'"), ("example.org", "is not 'KEY ACTION'"),
    ("example.org ok 250 2.0.0 fine", "ok takes no reply"),
    ("example.org reject 450 4.7.1 later", "with a 5xx code"), ("example.org tempfail 451 4.7 x", "4xx code"),
    ("file:relative", "absolute path"),
])
def test_bad_entries_are_refused_at_load(entry, reason):
    with pytest.raises(ConfigError) as e:
        parse("edge", {**EDGE, "access": {"sender": [entry]}}, "/etc/smarthost/edge.toml")
    assert e.value.key == "access.sender" and reason in e.value.reason


def test_table_files_are_checked_where_start_up_would(tmp_path):
    bad = tmp_path / "senders"
    bad.write_text("example.net reject\nexample.com maybe\n")
    s = parse("edge", {**EDGE, "access": {"sender": [f"file:{bad}"]}}, "/etc/smarthost/edge.toml")
    with pytest.raises(ConfigError) as e:
        preflight(s)
    assert e.value.key == "access.sender" and f"{bad} line 2" in e.value.reason
    s = parse("edge", {**EDGE, "access": {"client": ["not-an-address reject"]}}, "/etc/smarthost/edge.toml")
    with pytest.raises(ConfigError) as e:
        preflight(s)
    assert e.value.key == "access.client" and "not an IP address or CIDR" in e.value.reason
