"""Address, parameter and xtext syntax (RFC 5321 4.1.2, 4.5.3.1; RFC 3461; RFC 6531)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.smtp.syntax import (AddressError, ParameterError, is_valid_domain, parse_attributes, parse_envid,
                                parse_notify, parse_orcpt, parse_params, parse_path, split_path, xtext_decode,
                                xtext_encode)


def path(text, **kw):
    kw.setdefault("allow_null", False)
    kw.setdefault("allow_utf8", False)
    return parse_path(text, **kw)


@pytest.mark.parametrize("text, expected", [
    ("<user@example.org>", "user@example.org"),
    ("<first.last+tag@sub.example.org>", "first.last+tag@sub.example.org"),
    ("<!#$%&'*+-/=?^_`{|}~@example.org>", "!#$%&'*+-/=?^_`{|}~@example.org"),
    ('<"john doe"@example.org>', '"john doe"@example.org'),
    ('<"a@b>c"@example.org>', '"a@b>c"@example.org'),
    ('<"quote\\"d"@example.org>', '"quote\\"d"@example.org'),
    ('<""@example.org>', '""@example.org'),
    ("<u@[192.0.2.1]>", "u@[192.0.2.1]"),
    ("<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]"),
    ("<u@[ipv6:::1]>", "u@[ipv6:::1]"),
    ("<u@localhost>", "u@localhost"),
    ("<u@under_score.example>", "u@under_score.example"),
    ("<@relay.example:u@example.org>", "u@example.org"),
    ("<@a.example,@b.example:u@example.org>", "u@example.org"),
    ("<" + "l" * 64 + "@example.org>", "l" * 64 + "@example.org"),
])
def test_good_paths(text, expected):
    assert path(text) == expected


@pytest.mark.parametrize("text", [
    "user@example.org", "<user@example.org", "user@example.org>", "<>", "<user>", "<@example.org>",
    "<user@>", "<.user@example.org>", "<user.@example.org>", "<us..er@example.org>", "<us er@example.org>",
    '<"unterminated@example.org>', '<"bad\x01"@example.org>', "<user@@example.org>", "<user@exa mple.org>",
    "<user@-example.org>", "<user@example-.org>", "<user@example..org>", "<user@.example.org>",
    "<user@example.org.>", "<user@1.2.3.4>", "<user@[1.2.3]>", "<user@[300.1.1.1]>", "<user@[IPv6:1.2.3.4]>",
    "<user@[tag:stuff]>", "<user@[1.2.3.4>", "<" + "l" * 65 + "@example.org>",
    "<u@" + ".".join(["a" * 63] * 4) + ">", "<u@" + "a" * 64 + ".org>",
    "<@bad_route:u@example.org>x", "<@-bad:u@example.org>", "<@a.example,b.example:u@example.org>",
    "<jöran@example.org>", "<u@bücher.example>", "<postmaster>",
])
def test_bad_paths(text):
    with pytest.raises(AddressError):
        path(text)


def test_path_length_limit_counts_octets_with_brackets():
    local = "l" * 64
    domain = "d" * 62 + "." + "d" * 62 + "." + "d" * 63        # 189 octets: 2 + 65 + 189 = 256
    ok = f"<{local}@{domain}>"
    assert len(ok) == 256 and path(ok) == ok[1:-1]
    with pytest.raises(AddressError):
        path(f"<{local}@{domain}x>")


def test_null_and_postmaster_only_where_allowed():
    assert path("<>", allow_null=True) == ""
    assert path("<Postmaster>", allow_postmaster=True) == "Postmaster"
    assert path("<postmaster@example.org>") == "postmaster@example.org"


def test_utf8_addresses():
    assert path("<jöran@bücher.example>", allow_utf8=True) == "jöran@bücher.example"
    assert path('<"jö ran"@example.org>', allow_utf8=True) == '"jö ran"@example.org'
    assert path("<用户@例子.广告>", allow_utf8=True) == "用户@例子.广告"
    for bad in ("<a\u0085b@example.org>", "<ab@exa\u0085mple.org>", "<ab@-bücher.example>"):
        with pytest.raises(AddressError):
            path(bad, allow_utf8=True)
    with pytest.raises(AddressError):                        # local part limit is in octets
        path("<" + "ö" * 33 + "@example.org>", allow_utf8=True)


def test_split_path():
    assert split_path("<a@b.example>") == ("<a@b.example>", "")
    assert split_path("<a@b.example>  SIZE=10 BODY=8BITMIME ") == ("<a@b.example>", "SIZE=10 BODY=8BITMIME")
    assert split_path('<"x> y"@b.example> SIZE=1') == ('<"x> y"@b.example>', "SIZE=1")
    assert split_path("<>") == ("<>", "")
    for bad in ("a@b.example", "<a@b.example>SIZE=1", "<a@b.example", ""):
        with pytest.raises(AddressError):
            split_path(bad)


def test_parse_params():
    assert parse_params("") == {}
    assert parse_params("size=10  Body=8bitmime SMTPUTF8") == {"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None}
    assert parse_params("ORCPT=rfc822;a+2Bb@example.org") == {"ORCPT": "rfc822;a+2Bb@example.org"}
    for bad in ("SIZE=1 size=2", "=1", "-X=1", "SIZE=", "A=b=c", "S_IZE=1", "A=\x01"):
        with pytest.raises(ParameterError):
            parse_params(bad)


def test_xtext():
    assert xtext_decode("abc") == "abc"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert xtext_decode("+c3+a9") == "é"
    assert xtext_decode("") == ""
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    for bad in ("a+", "a+2", "a+GG", "a=b", "a b", "+FF", "é"):
        with pytest.raises(ParameterError):
            xtext_decode(bad)
    assert xtext_decode("é+20", allow_utf8=True) == "é "


@given(st.text())
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text


def test_notify():
    assert parse_notify("never") == ("NEVER",)
    assert parse_notify("Success,FAILURE,delay") == ("SUCCESS", "FAILURE", "DELAY")
    for bad in ("", "NEVER,SUCCESS", "SUCCESS,SUCCESS", "SUCCESS,", "ALWAYS"):
        with pytest.raises(ParameterError):
            parse_notify(bad)


def test_orcpt_and_envid():
    assert parse_orcpt("rfc822;user+40example.org") == "rfc822;user@example.org"
    assert parse_orcpt("utf-8;j+C3+B6ran@example.org") == "utf-8;jöran@example.org"
    assert parse_orcpt("utf-8;jöran@example.org", allow_utf8=True) == "utf-8;jöran@example.org"
    for bad in ("rfc822", "rfc822;", ";a@b", "rfc 822;a", "rfc822;a+0Ab", "rfc822;" + "a" * 500):
        with pytest.raises(ParameterError):
            parse_orcpt(bad)
    assert parse_envid("QQ314159+2B") == "QQ314159+"
    with pytest.raises(ParameterError):
        parse_envid("a" * 101)


def test_attributes():
    allowed = frozenset({"NAME", "ADDR"})
    assert parse_attributes("name=mx.example ADDR=IPV6:2001+3Adb8::1", allowed) == \
        {"NAME": "mx.example", "ADDR": "IPV6:2001:db8::1"}
    assert parse_attributes("NAME=", allowed) == {"NAME": ""}
    for bad in ("", "HELO=x", "NAME", "NAME=a NAME=b", "NAME=a+0Db", "NAME=a+00"):
        with pytest.raises(ParameterError):
            parse_attributes(bad, allowed)


@pytest.mark.parametrize("domain, ok", [
    ("example.org", True), ("a", True), ("xn--bcher-kva.example", True), ("a-b.c_d.example", True),
    ("", False), ("example.123", False), ("-a.example", False), ("a..example", False),
    ("a" * 64 + ".example", False), (".".join(["a" * 63] * 4), True), (".".join(["a" * 63] * 4) + ".a", False), ("bücher.example", False),
])
def test_is_valid_domain(domain, ok):
    assert is_valid_domain(domain) is ok


def test_is_valid_domain_utf8():
    assert is_valid_domain("bücher.example", allow_utf8=True)
    assert not is_valid_domain("b\u0085cher.example", allow_utf8=True)
    assert not is_valid_domain("ü" * 60 + ".example", allow_utf8=True)
