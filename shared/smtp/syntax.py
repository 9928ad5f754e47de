"""Syntax of SMTP envelope addresses and ESMTP parameters (RFC 5321, 3461, 6531).

Pure functions over text that came from a peer; nothing here trusts its input.
Every function either returns a checked, normalised value or raises a subclass
of :class:`SMTPSyntaxError` whose message is safe to put in a reply (it never
echoes raw peer input).

* :func:`split_path` cuts ``<path> params`` apart (a quoted local part may hold
  spaces and ``>``).
* :func:`parse_path` checks ``<local@domain>`` (RFC 5321 4.1.2): dot-atom or
  quoted-string local part, host name or address literal, the length limits of
  4.5.3.1, the null path ``<>`` and an optional source route, which is dropped.
* :func:`parse_params` splits ``KEY=VALUE`` ESMTP parameters (names
  case-insensitive, duplicates refused); :func:`parse_notify`,
  :func:`parse_orcpt` and :func:`parse_attributes` check the DSN and
  XCLIENT/XFORWARD values.
* :func:`xtext_decode` / :func:`xtext_encode` implement RFC 3461 xtext.
"""
from __future__ import annotations

import ipaddress
import re

__all__ = [
    "SMTPSyntaxError", "AddressError", "ParameterError",
    "split_path", "parse_path", "parse_params", "parse_notify", "parse_orcpt",
    "parse_attributes", "xtext_decode", "xtext_encode", "is_valid_domain",
    "MAX_LOCAL_PART", "MAX_DOMAIN", "MAX_PATH",
]

MAX_LOCAL_PART = 64     # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255        # octets, RFC 5321 4.5.3.1.2
MAX_PATH = 256          # octets including "<" and ">", RFC 5321 4.5.3.1.3


def clip_name(value: str, limit: int = MAX_DOMAIN) -> str:
    """A client-given name (a HELO argument, a reverse name) cut to `limit` octets of
    UTF-8, on a character boundary, "..." marking the cut.

    A HELO argument is bounded only by the command line (2048 octets): quoted whole
    in a trace header or an XCLIENT command, it could make a line the next tier must
    refuse.  Nothing legitimate is lost: a domain name has at most 255 octets.
    """
    raw = value.encode("utf-8", "replace")
    if len(raw) <= limit:
        return value
    return raw[:limit].decode("utf-8", "ignore") + "..."
MAX_ORCPT = 500         # RFC 3461 4.2


class SMTPSyntaxError(ValueError):
    """Peer input that does not follow the grammar; the message is reply-safe."""


class AddressError(SMTPSyntaxError):
    """A malformed reverse-path or forward-path."""


class ParameterError(SMTPSyntaxError):
    """A malformed ESMTP parameter, xtext value or XCLIENT/XFORWARD attribute."""


# Characters beyond ASCII that SMTPUTF8 (RFC 6531/6532) admits: anything from
# U+00A0 up, leaving out the C1 control characters.
_UTF8 = "\u00a0-\U0010ffff"
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e"         # RFC 5321 qtextSMTP


def _local_re(utf8: bool) -> re.Pattern[str]:
    extra = _UTF8 if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    quoted = rf'"(?:[{_QTEXT}{extra}]|\\[\x20-\x7e])*"'
    return re.compile(rf"(?:{atom}(?:\.{atom})*|{quoted})")


_MAILBOX = {
    utf8: re.compile(rf"(?P<local>{_local_re(utf8).pattern})@(?P<domain>[^@]+)")
    for utf8 in (False, True)
}
_PATH = re.compile(r'<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>')
_ROUTE = re.compile(r"@[^,:@]+(?:,@[^,:@]+)*:")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_ULABEL = re.compile(rf"[A-Za-z0-9_{_UTF8}](?:[A-Za-z0-9_{_UTF8}-]*[A-Za-z0-9_{_UTF8}])?")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rf"[\x21-\x3c\x3e-\x7e{_UTF8}]+")     # RFC 5321 esmtp-value, 6531 extension
_XTEXT = {
    False: re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*"),
    True: re.compile(rf"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e{_UTF8}]|\+[0-9A-Fa-f]{{2}})*"),
}
_HEXCHAR = re.compile(rb"\+([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ATOM = re.compile(f"[{_ATEXT}]+")


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# -- domains and addresses -----------------------------------------------------

def is_valid_domain(domain: str, *, allow_utf8: bool = False) -> bool:
    """True for a host name usable after ``@``: LDH labels (underscore tolerated,
    as Postfix does), at most 63 octets each and 255 in all, and a last label
    that is not all digits.  With ``allow_utf8``, U-labels are accepted too."""
    if not domain or _octets(domain) > MAX_DOMAIN:
        return False
    labels = domain.split(".")
    for label in labels:
        if label.isascii():
            if not _LABEL.fullmatch(label):
                return False
        elif not allow_utf8 or not _ULABEL.fullmatch(label) or _CONTROL.search(label):
            return False
        elif len(label.encode("punycode")) + 4 > 63:
            return False
    return not labels[-1].isdigit()


def _valid_literal(literal: str) -> bool:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def split_path(arg: str) -> tuple[str, str]:
    """Split ``<path> KEY=VALUE ...`` into the bracketed path and the parameter text."""
    m = _PATH.match(arg)
    if m is None:
        raise AddressError("address must be enclosed in <>")
    rest = arg[m.end():]
    if rest and rest[0] != " ":
        raise AddressError("garbage after the address")
    return m.group(), rest.strip(" ")


def parse_path(text: str, *, allow_null: bool, allow_utf8: bool, allow_postmaster: bool = False) -> str:
    """Check a bracketed path and return the mailbox inside it.

    ``""`` is returned for ``<>`` when ``allow_null``; a source route
    (``<@relay,@relay2:user@domain>``) is checked and dropped; ``<postmaster>``
    without a domain is returned as written when ``allow_postmaster`` (RFC 5321
    4.1.1.3).  Raises :class:`AddressError`.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("address must be enclosed in <>")
    if _octets(text) > MAX_PATH:
        raise AddressError("address too long")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return ""
        raise AddressError("null address not allowed here")
    if inner[0] == "@":
        m = _ROUTE.match(inner)
        if m is None or not all(is_valid_domain(d[1:]) for d in m.group()[:-1].split(",")):
            raise AddressError("bad source route")
        inner = inner[m.end():]
    if allow_postmaster and inner.lower() == "postmaster":
        return inner
    if not allow_utf8 and not inner.isascii():
        raise AddressError("non-ASCII address")
    m = _MAILBOX[allow_utf8].fullmatch(inner)
    if m is None:
        raise AddressError("bad address syntax")
    local, domain = m.group("local"), m.group("domain")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain[0] == "[":
        if domain[-1] != "]" or not _valid_literal(domain):
            raise AddressError("bad address literal")
    elif not is_valid_domain(domain, allow_utf8=allow_utf8):
        raise AddressError("bad domain")
    return inner


# -- parameters ----------------------------------------------------------------

def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``KEY[=VALUE] ...`` into ``{KEY: VALUE or None}`` with upper-case keys.

    Keys are case-insensitive; a repeated key is an error.  Values keep their case.
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise ParameterError("bad parameter syntax")
        if eq and not _VALUE.fullmatch(value):
            raise ParameterError("bad parameter value syntax")
        key = key.upper()
        if key in params:
            raise ParameterError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def xtext_decode(text: str, *, allow_utf8: bool = False) -> str:
    """Decode RFC 3461 xtext (``+HH`` escapes; lower-case hex tolerated).

    The escaped octets must form UTF-8.  With ``allow_utf8`` raw non-ASCII
    characters are accepted too (RFC 6533 leniency).  Raises :class:`ParameterError`.
    """
    if not _XTEXT[allow_utf8].fullmatch(text):
        raise ParameterError("bad xtext")
    if "+" not in text:
        return text
    raw = _HEXCHAR.sub(lambda m: bytes.fromhex(m.group(1).decode("ascii")), text.encode("utf-8"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError("xtext is not UTF-8") from None


_XTEXT_PLAIN = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*\Z")    # "!".."~" but "+" and "="


def xtext_encode(text: str) -> str:
    """Encode text as RFC 3461 xtext; non-ASCII characters go as escaped UTF-8 octets."""
    if _XTEXT_PLAIN.match(text):
        return text                   # the usual case: nothing to escape
    out = []
    for b in text.encode("utf-8"):
        if 0x21 <= b <= 0x7E and b != 0x2B and b != 0x3D:
            out.append(chr(b))
        else:
            out.append(f"+{b:02X}")
    return "".join(out)


def _no_controls(value: str) -> str:
    if _CONTROL.search(value):
        raise ParameterError("control character in value")
    return value


def parse_notify(value: str) -> tuple[str, ...]:
    """RFC 3461 NOTIFY: ``NEVER`` alone, or a list of SUCCESS, FAILURE, DELAY."""
    items = tuple(value.upper().split(","))
    if items == ("NEVER",):
        return items
    if not items or len(set(items)) != len(items) or not set(items) <= {"SUCCESS", "FAILURE", "DELAY"}:
        raise ParameterError("bad NOTIFY value")
    return items


def parse_orcpt(value: str, *, allow_utf8: bool = False) -> str:
    """RFC 3461 ORCPT ``addr-type;xtext`` decoded to ``addr-type;address``."""
    if len(value) > MAX_ORCPT:
        raise ParameterError("ORCPT too long")
    addr_type, semi, xtext = value.partition(";")
    if not semi or not _ATOM.fullmatch(addr_type) or not xtext:
        raise ParameterError("bad ORCPT value")
    return f"{addr_type};{_no_controls(xtext_decode(xtext, allow_utf8=allow_utf8))}"


def parse_envid(value: str) -> str:
    """RFC 3461 ENVID: xtext, at most 100 characters, printable ASCII once decoded."""
    if len(value) > 100:
        raise ParameterError("ENVID too long")
    return _no_controls(xtext_decode(value))


def parse_attributes(text: str, allowed: frozenset[str]) -> dict[str, str]:
    """XCLIENT / XFORWARD ``NAME=xtext ...``: names from ``allowed`` (case-insensitive),
    values decoded; empty values allowed, control characters refused."""
    attrs: dict[str, str] = {}
    for item in text.split(" "):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.upper()
        if not eq:
            raise ParameterError("attribute without value")
        if name not in allowed:
            raise ParameterError("unknown attribute name")
        if name in attrs:
            raise ParameterError(f"duplicate attribute {name}")
        attrs[name] = _no_controls(xtext_decode(value, allow_utf8=True))
    if not attrs:
        raise ParameterError("no attributes")
    return attrs
