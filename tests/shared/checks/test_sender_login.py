"""sender_login: an authenticated user sends only as an address they own."""
from __future__ import annotations

import pytest

from shared.checks.core import Action, Request
from shared.checks.sender_login import SenderLogin, SenderLoginSettings
from shared.config import ConfigError
from shared.config.schema import parse

OWNERS = ("sales@example.org alice@example.org bob@example.org", "@example.net carol",
          "<> mailer@example.org")


def verdict(login, sender, owners=OWNERS):
    check = SenderLogin(SenderLoginSettings(owners=owners))
    return check(Request(phase="mail", client_address="192.0.2.1", login=login, sender=sender))


@pytest.mark.parametrize("login, sender", [
    ("alice@example.org", "alice@example.org"),
    ("Alice@Example.org", "alice@EXAMPLE.org"),      # any case
    ("alice@example.org", "sales@example.org"),
    ("bob@example.org", "sales@example.org"),
    ("carol", "anyone@example.net"),                  # a whole domain
    ("mailer@example.org", ""),                       # the null sender, listed
    (None, "whoever@example.com"),                    # no AUTH: not judged
])
def test_owned(login, sender):
    assert verdict(login, sender).action is Action.CONTINUE


@pytest.mark.parametrize("login, sender", [
    ("alice@example.org", "bob@example.org"),
    ("carol", "carol@example.org"),
    ("carol", "x@sub.example.net"),                   # @domain is that domain only
    ("alice@example.org", ""),                        # nobody owns <> unless listed
    ("mallory@example.org", "sales@example.org"),
])
def test_not_owned(login, sender):
    v = verdict(login, sender)
    assert v.action is Action.REJECT
    assert (v.reply.code, v.reply.enhanced) == (553, "5.7.1")
    assert f"not owned by user {login}" in v.reply.text


@pytest.mark.parametrize("entry", ["alice@example.org", "example.org alice", "alice@ bob"])
def test_bad_entries_are_named(entry):
    with pytest.raises(ConfigError) as e:
        parse("edge", {"next_hop": {"hosts": ["127.0.0.1:10025"]}, "sender_login": {"owners": [entry]}})
    assert "sender_login.owners" in str(e.value)
