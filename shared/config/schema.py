"""The configuration schema of every tier, its safe defaults, and the loader.

A tier's configuration is one TOML file.  Every key is declared here with its
type, default and rule; an unknown section or key is an error (a typo must not
silently fall back to a default), and each error names the file, the key and the
reason.  A daemon whose configuration does not load does not start; on SIGHUP a
bad file is reported and the old settings stay.

Defaults are the safe ones: no open relay (``mynetworks`` is empty), XCLIENT
accepted from nobody, and the queue fsyncs.  Settings that are dangerous on
purpose are refused unless a key named for the risk allows them (a
``mynetworks`` or ``upstream_hosts`` entry covering public address space);
settings that are merely suspect load with a warning line ("FILE: KEY: text")
in ``Settings.warnings``, which ``smarthost check-config`` prints and a daemon
logs at start and on reload.

What a tier needs from the host it runs on (writable log and queue locations,
readable TLS files, the account of ``server.user``) is checked by
:func:`check_host`, which ``smarthost check-config`` and a starting daemon both
run, so the two never disagree about a file.
"""
from __future__ import annotations

import grp
import importlib
import ipaddress
import os
import pwd
import re
import socket
import tomllib
from dataclasses import asdict, dataclass, field, make_dataclass, replace
from dataclasses import fields as fields_of
from typing import Any, Callable

from shared.checks.core import PHASES
from shared.netlist import covers_public_space

TIERS = ("edge", "filter", "domain")


class ConfigError(Exception):
    """A configuration that cannot be used: says which file, which key and why."""

    def __init__(self, path: str, key: str | None, reason: str) -> None:
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


# -- value rules -----------------------------------------------------------

def _hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:25', '[::1]:25' or 'host.example:25' -> (host, port)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (IPv6 as [addr]:port)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _is_hostname(host):
            raise ValueError(f"{value!r}: {host!r} is neither an IP address nor a hostname") from None
    return host, int(port)


def _address_port(value: str) -> tuple[str, int]:
    """host:port whose host is an IP address (a DNS server cannot be found by name)."""
    host, port = _hostport(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return host, port


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network") from None


def _domain(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    labels = v.split(".")
    if not v or len(v) > 253 or any(not lab or len(lab) > 63 or lab.startswith("-")
                                    or lab.endswith("-") for lab in labels) \
            or not all(c.isalnum() or c in "-." for c in v):
        raise ValueError(f"{value!r} is not a domain name")
    return v


def _address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local:
        raise ValueError(f"{value!r} is not an address local@domain")
    return f"{local}@{_domain(domain)}"


def _mailbox(value: str) -> str:
    """An address, or the bare "postmaster" (RFC 5321 4.5.1: every server accepts it)."""
    return "postmaster" if value.lower() == "postmaster" else _address(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _user_address(value: str) -> str:
    """An address with a mailbox: its local part is the directory ROOT/DOMAIN/LOCALPART,
    so it must be one ordinary directory name (no "/", no control character such as
    NUL, and no leading "." -- that rules out "." and "..", and Maildir++ folders)."""
    address = _address(value)
    local = address.rpartition("@")[0]
    if "/" in local or local.startswith(".") or _CONTROL.search(local):
        raise ValueError(f"{value!r}: the local part names a directory under mailboxes.maildir_root, "
                         f"so it must not contain '/' or control characters, nor start with '.'")
    return address


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z", re.ASCII)


def _is_hostname(name: str) -> bool:
    """Letters, digits, '-' and '_' in dot-separated labels of at most 63 characters,
    253 at most in all, the last not all digits (the names Postfix's valid_hostname()
    accepts; an IP address is not one)."""
    return len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split(".")) \
        and not name.rpartition(".")[2].isdigit()


def _hostname(value: str) -> str:
    """A name this host sends in the greeting, EHLO and Received headers, or "" for the default."""
    if not value:
        return value
    if re.search(r"\s", value) or _CONTROL.search(value):
        raise ValueError(f"{value!r} contains whitespace or a control character "
                         f"(the name is sent inside SMTP command and reply lines)")
    if not _is_hostname(value):
        raise ValueError(f"{value!r} is not a hostname (letters, digits, '-' and '_' in "
                         f"dot-separated labels of at most 63 characters, not an IP address)")
    return value


DAY = 86400
WEEK = 7 * DAY
YEAR = 365 * DAY
MIB = 1 << 20
TIB = 1 << 40
_BOUND_NAMES = {WEEK: "1 week", YEAR: "365 days", MIB: "1 MiB", TIB: "1 TiB"}


def _range(lo: float, hi: float, *, above: bool = False, or_zero: bool = False) -> Callable[[float], float]:
    """A number from `lo` (`above`: greater than `lo`) to `hi` inclusive; with `or_zero`,
    0 ("no limit") as well.  TOML's nan and inf never pass."""
    low = f"greater than {lo}" if above else f"at least {lo}"
    high = f"{hi} ({_BOUND_NAMES[hi]})" if hi in _BOUND_NAMES else str(hi)
    bounds = f"{'0 (no limit) or ' if or_zero else ''}{low} and at most {high}"

    def check(value: float) -> float:
        if not ((lo < value if above else lo <= value) and value <= hi) and not (or_zero and value == 0):
            raise ValueError(f"must be {bounds}, got {value}")
        return value
    return check


_SECONDS = _range(0, WEEK, above=True)      # timeouts, delays and intervals
_TTL = _range(0, WEEK)


def _count(hi: int) -> Callable[[float], float]:
    """A count from 1 to `hi` (its message says "greater than 0", as before bounds existed)."""
    return _range(0, hi, above=True)


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def _path(value: str) -> str:
    """An absolute file or directory name, or "" (unset).  A relative one is refused: the
    daemon and ``smarthost check-config`` may run in different directories."""
    if "\0" in value:
        raise ValueError(f"{value!r} contains a NUL character")
    if value and not os.path.isabs(value):
        raise ValueError(f"{value!r} is not an absolute path (a relative one would depend on "
                         f"the directory the daemon is started in)")
    return value


def _log_file(value: str) -> str:
    if value == "-":
        return value
    if not value:
        raise ValueError("must be a file name, or - for standard error")
    return _path(value)


def _sni_entry(value: str) -> str:
    """A ``tls_sni`` entry, 'NAME CERT KEY': a server name (or *.DOMAIN, any name one
    label below DOMAIN), then the absolute paths of its PEM certificate chain and key.
    The name is kept in lower case (a client's SNI name is compared so)."""
    parts = value.split()
    if len(parts) != 3:
        raise ValueError(f"{value!r} is not 'NAME CERT KEY' (a server name or *.DOMAIN, then the absolute "
                         f"paths of its PEM certificate chain and private key)")
    name, cert, key = parts
    bare = name[2:] if name.startswith("*.") else name
    if not _is_hostname(bare) or (bare != name and "." not in bare):
        raise ValueError(f"{value!r}: {name!r} is not a server name, nor *. and a domain of two labels or "
                         f"more (an internationalized name is written in its xn-- form)")
    for f in (cert, key):
        _path(f)
    return f"{name.lower()} {cert} {key}"


_HEX = frozenset("0123456789abcdefABCDEF")


def _fingerprint(value: str) -> str:
    """A SHA-256 certificate fingerprint, 64 hex digits with or without colons, as
    "AB:CD:..." (the way ``openssl x509 -fingerprint -sha256`` and the TLS log line
    write it)."""
    digits = value.strip().replace(":", "")
    if len(digits) != 64 or not set(digits) <= _HEX:
        raise ValueError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    digits = digits.upper()
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))


# The value rules, for the sections that checks and tiers declare in their own modules.
hostport, address_port, network, domain, address, mailbox = _hostport, _address_port, _network, _domain, \
    _address, _mailbox
user_address, hostname, path = _user_address, _hostname, _path
SECONDS, TTL, count, choice, bounded = _SECONDS, _TTL, _count, _choice, _range


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    doc: str
    item: Callable[[Any], Any] | None = None    # rule for a scalar, or for each list item
    required_in: tuple[str, ...] = ()            # tiers that must set it (not empty)
    tier_defaults: tuple[tuple[str, Any], ...] = ()   # (tier, default) where it differs from `default`
    directory: bool = False                      # a directory the tier writes in (see check_host)
    shorthand: bool = False                      # folded into another section while loading; not kept
    secret: bool = False                         # a password: check-config does not print its value

    def default_for(self, tier: str) -> Any:
        return dict(self.tier_defaults).get(tier, self.default)


def setting(default: Any, doc: str, item: Callable[[Any], Any] | None = None, *,
            kind: type | tuple[type, ...] | None = None, **key: Any) -> Any:
    """A field of a check's settings dataclass: its default, meaning and rule, as a Key.

    ``kind`` (the TOML type) defaults to the default's: a float default accepts
    integers too, a tuple default is an array of strings."""
    if kind is None:
        kind = (int, float) if isinstance(default, float) else list if isinstance(default, tuple) \
            else default.__class__
    given = list(default) if isinstance(default, tuple) else default
    if isinstance(default, dict):
        default = Table(default)
    return field(default=default, metadata={"key": Key(kind, given, doc, item, **key)})


class Table(dict):
    """A TOML table as a section object holds it: read-only and hashable, like the tuples
    arrays become (a check's settings object is a dictionary key of the policy builder)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a configuration table is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __hash__(self) -> int:                       # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def __reduce__(self):
        return (Table, (dict(self),))

    def __deepcopy__(self, memo):
        return self                                  # immutable: a copy is itself


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _frozen(value: Any) -> Any:
    """What a section object holds: arrays as tuples, tables as Tables (nested ones too)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return Table({k: _frozen(v) if isinstance(v, dict) else v for k, v in value.items()})
    return value


@dataclass(frozen=True)
class Section:
    """One ``[name]`` table of a tier's file: its keys, and the frozen dataclass
    (``cls``) the code receives.

    ``named``: a table of tables (``[listeners.NAME]``), each entry one ``cls``.
    ``finish(loading)`` runs once every section's keys are read: cross-checks that
    raise ``loading.error(key, reason)``, warnings, and values derived from others.
    """
    name: str
    keys: dict[str, Key]
    doc: str = ""
    cls: type | None = None
    named: bool = False
    finish: Callable[["Loading"], None] | None = None

    def __post_init__(self) -> None:
        if self.cls is None:
            fields = [(k, Any) for k, key in self.keys.items() if not key.shorthand]
            title = "".join(p.title() for p in self.name.split("_")) + "Settings"
            object.__setattr__(self, "cls", make_dataclass(title, fields, frozen=True, slots=True))

    @classmethod
    def of(cls, name: str, settings_class: type, doc: str = "", **kw: Any) -> "Section":
        """The section of a frozen dataclass whose fields are :func:`setting`\\ s."""
        keys = {f.name: f.metadata["key"] for f in fields_of(settings_class)}
        return cls(name, keys, doc or (settings_class.__doc__ or "").strip().split("\n")[0],
                   cls=settings_class, **kw)

    def build(self, values: dict[str, Any]) -> Any:
        return self.cls(**{k: _frozen(v) for k, v in values.items() if not self.keys[k].shorthand})


@dataclass(frozen=True)
class TierSpec:
    """What a tier declares (its ``service.TIER``): the sections it adds to the core's,
    the checks and relay permit rules it registers (:mod:`shared.checks.registry`) and
    the checks its ``default`` policy runs, per phase."""
    name: str
    sections: tuple[Section, ...] = ()
    checks: tuple[Any, ...] = ()              # shared.checks.registry.CheckType
    permits: tuple[Any, ...] = ()             # shared.checks.registry.PermitRule
    default_policy: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Built-in policies besides "default" (e.g. the edge's "submission"): {name: {phase: checks}},
    # phases left out as in default_policy; defined when a listener names them; "settings":
    # {check section: {key: value}}, the policy's own check settings ([policies.NAME.CHECK]).
    policies: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    component: Callable[..., Any] | None = None   # (settings, reactor, pool) -> the tier's parts

    def all_sections(self) -> list[Section]:
        out = list(CORE_SECTIONS) + list(self.sections)
        out += [c.section for c in self.checks if c.section is not None]
        return out


def tier_spec(tier: str) -> TierSpec:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r} (edge, filter or domain)")
    return importlib.import_module(TIER_MODULES[tier]).TIER


def keys_of(tier: str) -> dict[str, dict[str, Key]]:
    """Every key a tier's file may hold: {section: {key: Key}} (check-config's list)."""
    return {s.name: s.keys for s in tier_spec(tier).all_sections()}


TIER_MODULES = {"edge": "edge.service", "filter": "filter.service", "domain": "domain.service"}


@dataclass
class Loading:
    """A file being loaded, for the sections' ``finish`` hooks."""
    tier: str
    path: str
    spec: TierSpec
    given: dict[str, Any]                        # the TOML document as read
    values: dict[str, Any]                       # section -> key -> value (checked; may be changed)
    warnings: list[str] = field(default_factory=list)

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {text}")

    def was_given(self, section: str, key: str) -> bool:
        return key in self.given.get(section, {})


# -- the core's sections: every tier has them ---------------------------------------

SERVER = Section("server", {
    "hostname": Key(str, "", "name in the greeting, EHLO and Received headers (default: the host's FQDN)",
                    _hostname),
    "listen": Key(list, ["127.0.0.1:25"], "addresses to listen on, host:port: a listener each, named smtp, "
                                          "smtp-2, ... with the default policy (or use [listeners.NAME])",
                  _hostport, shorthand=True),
    "max_message_size": Key(int, 10_240_000, "largest message accepted, bytes (0: no limit; at most 1 TiB)",
                            _range(0, TIB)),
    "max_recipients": Key(int, 1000, "recipients per message (at most 100000)", _count(100_000)),
    "max_line_length": Key(int, 1000, "longest line in a message, octets with CRLF (RFC 5321: 1000; "
                                      "0: no limit; else 1000 to 1 MiB)", _range(1000, MIB, or_zero=True)),
    "max_connections": Key(int, 1000, "simultaneous client sessions, all listeners together (at most 100000)",
                           _count(100_000)),
    "max_connections_per_client": Key(int, 50, "simultaneous sessions from one client address, all listeners "
                                               "together (upstream_hosts are exempt; at most 100000)",
                                      _count(100_000)),
    "stress_command_timeout": Key((int, float), 10, "under stress (sessions at 80 % of max_connections, "
                                                    "until below 50 %): seconds an idle session waits "
                                                    "for a command (as Postfix's ${stress?10})", _SECONDS),
    "stress_connections_per_client": Key(int, 5, "under stress: sessions one client may hold (the "
                                                 "smaller of this and max_connections_per_client)",
                                         _count(100_000)),
    "max_errors": Key(int, 20, "client errors before the session is closed with 421 (at most 1000)",
                      _count(1000)),
    "soft_error_limit": Key(int, 10, "client errors after which each further error reply waits "
                                     "error_sleep_time (as Postfix's smtpd_soft_error_limit; at most 1000)",
                            _count(1000)),
    "error_sleep_time": Key((int, float), 1, "seconds an error reply waits past soft_error_limit (the "
                                             "tarpit, as Postfix's smtpd_error_sleep_time; 0: none; at most "
                                             "60)", _range(0, 60)),
    "max_junk_commands": Key(int, 100, "NOOP, RSET, VRFY and HELP commands before each one counts as an "
                                       "error (0: no limit; at most 100000)", _range(0, 100_000)),
    "command_timeout": Key((int, float), 300, "seconds to wait for a command or a DATA chunk (at most 1 week)",
                           _SECONDS),
    "session_timeout": Key((int, float), 3600, "longest session, seconds (at most 1 week)", _SECONDS),
    "shutdown_timeout": Key((int, float), 30, "on SIGTERM, seconds open sessions may take to finish "
                                              "(at most 1 week)", _range(0, WEEK)),
    "max_received_headers": Key(int, 50, "mail loop limit: Received headers above this are rejected 554 5.4.6 "
                                         "(at most 1000)", _count(1000)),
    "tls_cert": Key(str, "", "PEM certificate chain, absolute path; STARTTLS is offered only when set "
                             "(re-read on reload)", _path),
    "tls_key": Key(str, "", "PEM private key for tls_cert, absolute path", _path),
    "tls_min_version": Key(str, "TLSv1.2", "oldest TLS version accepted: TLSv1.2 or TLSv1.3 (TLSv1 and "
                                           "TLSv1.1 only with a warning: both are deprecated, RFC 8996)",
                           _choice("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")),
    "tls_ciphers": Key(str, "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS",
                       "OpenSSL cipher list for TLS 1.2 and older (TLS 1.3's suites are all forward-"
                       "secret); the default: forward secrecy and AEAD only"),
    "tls_sni": Key(list, [], "certificates by the server name a client asks for (SNI): 'NAME CERT KEY' "
                             "entries, NAME a server name or *.DOMAIN (any name one label below DOMAIN; an "
                             "exact name wins), CERT and KEY the absolute paths of a PEM chain and its key; "
                             "a client that names no listed server gets tls_cert (re-read on reload)",
                   _sni_entry),
    "tls_client_certificates": Key(str, "none", "ask: request a certificate from every TLS client but never "
                                                "require one (Postfix's smtpd_tls_ask_ccert), for the edge's "
                                                "client_certificate relay permit; none: do not ask",
                                   _choice("none", "ask")),
    "tls_client_ca": Key(str, "", "with tls_client_certificates = ask: PEM file of the CAs a client "
                                  "certificate must chain to to count, absolute path (their names go with "
                                  "the request); empty: any certificate counts, judged by its fingerprint",
                         _path),
    "upstream_hosts": Key(list, [], "clients allowed to send XCLIENT/XFORWARD (addresses or CIDRs)", _network),
    "allow_public_upstream_hosts": Key(bool, False, "accept upstream_hosts entries that cover public address "
                                                    "space (wider than an IPv4 /8 or IPv6 /16, not all "
                                                    "private): anyone there may forge the client's identity "
                                                    "with XCLIENT"),
    "reverse_lookup": Key(bool, True, "look up and forward-confirm each client's reverse name before "
                                      "the greeting (not for upstream_hosts, whose XCLIENT says it; "
                                      "default on at the edge only: the inner tiers learn the name "
                                      "from XCLIENT)",
                          tier_defaults=(("filter", False), ("domain", False))),
    "user": Key(str, "", "drop privileges to this user after binding the listeners"),
    "pid_file": Key(str, "", "file holding the running tier's process id, absolute path (empty: none); "
                             "`smarthost reload` finds the tier through it", _path),
    "allow_any_client": Key(bool, False, "filter and domain tiers: also take mail from clients outside "
                                         "upstream_hosts and relay.mynetworks, skipping the tiers before "
                                         "this one (off: 554 5.7.1 at connect; the edge ignores this key)"),
})


def _firewall_rule(value: str) -> str:
    from shared.firewall import parse_rule
    parse_rule(value)
    return value


def _endpoint(value: str) -> str:
    """A Twisted server endpoint description ("tcp:port=25:interface=0.0.0.0",
    "ssl:465:privateKey=...", "haproxy:tcp:25"): parsed now, so a typo is refused
    at load time, not at start-up."""
    if not value:
        return value            # unset: refused by the listeners' finish, naming the key
    from twisted.internet import endpoints, reactor
    try:
        endpoints.serverFromString(reactor, value)
    except Exception as e:
        raise ValueError(f"{value!r} is not a Twisted endpoint description: {e}") from None
    return value


# What a listener's role sets, for the keys its table leaves out.
ROLES = {
    "mx": {"tls": "starttls", "auth": False, "require_tls": False, "require_auth": False, "policy": "default"},
    "submission": {"tls": "starttls", "auth": True, "require_tls": True, "require_auth": True,
                   "policy": "submission"},
    "submissions": {"tls": "implicit", "auth": True, "require_tls": True, "require_auth": True,
                    "policy": "submission"},
}

# [server] keys a listener may set for itself (its table's value wins; unset: the global one).
LISTENER_OVERRIDES = ("command_timeout", "session_timeout", "max_message_size", "max_recipients",
                      "max_line_length", "max_errors", "soft_error_limit", "error_sleep_time",
                      "max_junk_commands", "tls_cert", "tls_key", "tls_min_version", "tls_ciphers", "tls_sni",
                      "tls_client_certificates", "tls_client_ca")

LISTENER = Section("listeners", {
    "endpoint": Key(str, "", "where to listen: a Twisted endpoint description, e.g. "
                             "tcp:port=25:interface=0.0.0.0, or haproxy:tcp:25 behind a PROXY-protocol "
                             "balancer (bound before privileges are dropped)", _endpoint),
    "role": Key(str, "mx", "mx: mail from the Internet (STARTTLS offered, no AUTH); submission: port 587, "
                           "RFC 6409 (STARTTLS, then AUTH, before MAIL; policy submission); submissions: "
                           "port 465, RFC 8314 (implicit TLS, AUTH before MAIL); the role sets the defaults "
                           "of tls, auth, require_tls, require_auth and policy",
                _choice(*ROLES)),
    "policy": Key(str, "", "the policy (see [policies.NAME]) of this listener's sessions (default: the "
                           "role's: default for mx, submission for the others)"),
    "tls": Key(str, "", "starttls: offered when a certificate is set; implicit: TLS from the first byte "
                        "(port 465, RFC 8314); none (default: the role's)",
               lambda v: _choice("starttls", "implicit", "none")(v) if v else v),
    "auth": Key(bool, False, "offer SMTP AUTH (over TLS only, see [auth]); default: the role's"),
    "require_tls": Key(bool, False, "MAIL needs TLS first: 530 5.7.0 (default: the role's)"),
    "require_auth": Key(bool, False, "MAIL needs AUTH first: 530 5.7.0 (default: the role's)"),
    "firewall": Key(list, [], "this listener's own firewall rules, tried before [firewall] rules "
                              "(same syntax)", _firewall_rule),
    "proxy_hosts": Key(list, [], "haproxy: endpoints: the balancers whose PROXY header is believed "
                                 "(CIDRs; required with such an endpoint); others are disconnected", _network),
    "greet_wait": Key((int, float), 0, "pregreet test, as postscreen's: seconds between the first line of "
                                       "a multi-line greeting (220-) and the rest; a client that talks "
                                       "before the end gets 554 5.5.1 and is disconnected (0: no test; "
                                       "6 is postscreen's; relay.mynetworks exempt)", _range(0, 60)),
    **{name: replace(SERVER.keys[name], default=None, tier_defaults=(), shorthand=False,
                     doc=f"this listener's own server.{name} (default: the global one)")
       for name in LISTENER_OVERRIDES},
}, doc="one listener per [listeners.NAME] table", named=True)

FIREWALL = Section("firewall", {
    "rules": Key(list, [], "ordered 'allow NETWORK' / 'deny NETWORK' / 'deny file:/PATH' rules by client "
                           "address (IPv4/IPv6 CIDR; a file holds one network per line, read again on "
                           "reload); a listener's own rules first, then these; first match wins; no "
                           "match: allowed; denied: 554 5.7.1 at connect", _firewall_rule),
})

PHASE_KEYS = PHASES       # shared.checks.core: connect, helo, starttls, auth, mail, rcpt, data, end_of_data
# Postfix's smtpd_relay_restrictions: permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination.
DEFAULT_RELAY = ("relay_domains", "mynetworks", "authenticated")

POLICY = Section("policies", {
    **{phase: Key(list, [], f"checks run at {phase.replace('_', ' ')}, in this order (default: the tier's)")
       for phase in PHASE_KEYS},
    "settings": Key(dict, {}, "this policy's own settings of its checks, as [policies.NAME.CHECK] tables "
                              "(e.g. [policies.submission.rate_limits] user_message_rate = 100); keys left "
                              "out: the [CHECK] section's"),
    "relay": Key(list, [], "relay permit rules, tried in order: a recipient is refused (554 5.7.1) "
                           "unless one permits it (default: relay_domains, mynetworks, authenticated; "
                           "the edge's submission policy: authenticated)"),
}, doc="one policy per [policies.NAME] table; a listener names the one its sessions follow", named=True)

RELAY = Section("relay", {
    "relay_domains": Key(list, [], "domains accepted from anyone", _domain),
    "mynetworks": Key(list, [], "clients allowed to relay to any destination (CIDRs)", _network),
    "allow_public_mynetworks": Key(bool, False, "accept mynetworks entries that cover public address space "
                                                "(wider than an IPv4 /8 or IPv6 /16, not all private): "
                                                "this tier becomes an open relay for everyone in them"),
    "client_certificates": Key(list, [], "edge: SHA-256 fingerprints (64 hex digits, colons allowed) of the "
                                         "client certificates whose clients the client_certificate permit "
                                         "rule lets relay to any destination (Postfix's relay_clientcerts); "
                                         "the listener must ask for them (tls_client_certificates = ask)",
                               _fingerprint),
})

DNS = Section("dns", {
    "nameservers": Key(list, [], "DNS servers, IP address:port (empty: those of /etc/resolv.conf)",
                       _address_port),
    "timeout": Key((int, float), 5, "seconds one lookup may take before it counts as a temporary failure "
                                    "(at most 1 week)", _SECONDS),
})

LOG = Section("log", {
    "level": Key(str, "info", "debug, info, warn or error", _choice("debug", "info", "warn", "error")),
    "file": Key(str, "-", "log file (absolute path), or - for standard error; reopened on reload "
                          "(logrotate without copytruncate)", _log_file),
})

@dataclass(frozen=True)
class Settings:
    """A tier's loaded configuration: ``settings.server``, ``settings.next_hop``, ... are
    frozen section objects (``settings.listeners`` and ``settings.policies``: name ->
    object); only the tier's own sections exist."""
    tier: str
    path: str
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()      # "FILE: KEY: text", for settings that load but are suspect

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(f"the {self.__dict__.get('tier')} tier has no [{name}] section") from None

    def has(self, section: str) -> bool:
        return section in self.sections

    @property
    def hostname(self) -> str:
        return self.sections["server"].hostname

    @property
    def values(self) -> dict[str, Any]:
        """{section: {key: value}} (named sections: {section: {name: {key: value}}})."""
        out = {}
        for name, obj in self.sections.items():
            if isinstance(obj, dict):
                out[name] = {n: asdict(o) for n, o in obj.items()}
            else:
                out[name] = asdict(obj)
        return out


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"list": "array", "dict": "table", "str": "string", "int": "integer",
            "bool": "boolean"}.get(t.__name__, t.__name__)


def _check_value(path: str, name: str, key: Key, value: Any) -> Any:
    if value is None and key.default is None:
        return None              # not set: a listener's override key, filled in by its finish
    # TOML booleans are ints in Python: keep them apart.
    if isinstance(value, bool) and key.type is not bool:
        raise ConfigError(path, name, f"expected {_type_name(key.type)}, got a boolean")
    if not isinstance(value, key.type):
        raise ConfigError(path, name, f"expected {_type_name(key.type)}, got {type(value).__name__} {value!r}")
    try:
        if key.type is list:
            for i, v in enumerate(value, 1):       # every array holds strings
                if not isinstance(v, str):
                    raise ValueError(f"item {i}: expected string, got {_type_name(type(v))} {v!r}")
            return [key.item(v) if key.item else v for v in value]
        if key.item is not None:
            return key.item(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(path, name, str(e)) from None
    return value


def _read_keys(tier: str, path: str, prefix: str, keys: dict[str, Key], given: dict[str, Any]) -> dict[str, Any]:
    for name in given:
        if name not in keys:
            raise ConfigError(path, f"{prefix}.{name}", "unknown key")
    out = {}
    for name, key in keys.items():
        full = f"{prefix}.{name}"
        if name in given:
            out[name] = _check_value(path, full, key, given[name])
            if tier in key.required_in and not out[name]:
                raise ConfigError(path, full, f"required for the {tier} tier: must not be empty")
        else:
            if tier in key.required_in:
                raise ConfigError(path, full, f"required for the {tier} tier")
            out[name] = _check_value(path, full, key, key.default_for(tier))
    return out


def _elsewhere(section: str, tier: str) -> str:
    """Which other tiers have a section this tier does not (for the error message)."""
    owners = []
    for other in TIERS:
        if other != tier and any(s.name == section for s in tier_spec(other).all_sections()):
            owners.append(other)
    return f": a setting of the {' and '.join(owners)} tier{'s' if len(owners) > 1 else ''}" if owners else ""


def parse(tier: str, data: dict[str, Any], path: str = "<config>") -> Settings:
    """Validate a parsed TOML document for `tier` and fill in the defaults."""
    if tier not in TIERS:
        raise ConfigError(path, None, f"unknown tier {tier!r} (edge, filter or domain)")
    spec = tier_spec(tier)
    data = dict(data)
    declared = data.pop("tier", tier)
    if declared != tier:
        raise ConfigError(path, "tier", f"this file configures the {declared!r} tier, not {tier!r}")
    sections = {s.name: s for s in spec.all_sections()}
    for name in data:
        if name not in sections:
            raise ConfigError(path, name, f"not a section of the {tier} tier{_elsewhere(name, tier)} "
                                          f"(its sections: {', '.join(sections)})")
        if not isinstance(data[name], dict):
            raise ConfigError(path, name, "must be a table ([section])")
    values: dict[str, Any] = {}
    for name, section in sections.items():
        given = data.get(name, {})
        if section.named:
            values[name] = {}
            for entry, keys in given.items():
                if not isinstance(keys, dict):
                    raise ConfigError(path, f"{name}.{entry}", f"must be a table ([{name}.{entry}])")
                overrides = _policy_overrides(spec, path, entry, keys) if name == "policies" else None
                values[name][entry] = _read_keys(tier, path, f"{name}.{entry}", section.keys, keys)
                if overrides is not None:
                    values[name][entry]["settings"] = overrides
        else:
            values[name] = _read_keys(tier, path, name, section.keys, given)
    loading = Loading(tier, path, spec, data, values)
    for section in sections.values():
        if section.finish is not None:
            section.finish(loading)
    built = {}
    for name, section in sections.items():
        if section.named:
            built[name] = {entry: section.build(v) for entry, v in values[name].items()}
        else:
            built[name] = section.build(values[name])
    return Settings(tier, path, built, tuple(loading.warnings))


def _policy_overrides(spec: TierSpec, path: str, policy: str, keys: dict[str, Any]) -> dict[str, dict]:
    """A policy's own settings of its checks: ``[policies.NAME.CHECK]`` tables (e.g.
    ``[policies.submission.rate_limits]``), each key validated as in the check's section and
    taken out of `keys`.  Keys the table leaves out keep the check's section's values."""
    sections = {c.section.name: c.section for c in spec.checks if c.section is not None}
    out = {}
    for name in [k for k, v in keys.items() if isinstance(v, dict)]:
        where = f"policies.{policy}.{name}"
        section = sections.get(name)
        if section is None:
            raise ConfigError(path, where, f"not the settings of a check of the {spec.name} tier (its checks' "
                                           f"sections: {', '.join(sorted(sections)) or 'none'})")
        given = keys.pop(name)
        for key in given:
            if key not in section.keys:
                raise ConfigError(path, f"{where}.{key}", "unknown key")
        out[name] = {key: _frozen(_check_value(path, f"{where}.{key}", section.keys[key], value))
                     for key, value in given.items()}
    return out


def _finish_server(ld: Loading) -> None:
    v = ld.values
    srv = v["server"]
    if not srv["hostname"]:
        fqdn = socket.getfqdn() or "localhost"
        try:
            srv["hostname"] = _hostname(fqdn)
        except ValueError as e:
            raise ld.error("server.hostname", f"not set, and this host's own name cannot stand in "
                                              f"for it: {e}") from None
    _public_space(ld, "relay.mynetworks", v["relay"]["mynetworks"], "relay.allow_public_mynetworks",
                  v["relay"]["allow_public_mynetworks"],
                  "this tier would relay mail from anyone there to any destination (an open relay)")
    _public_space(ld, "server.upstream_hosts", srv["upstream_hosts"], "server.allow_public_upstream_hosts",
                  srv["allow_public_upstream_hosts"],
                  "anyone there could forge the client's identity with XCLIENT/XFORWARD")
    _finish_tls(ld, "server", srv)
    if ld.tier != "edge" and v["relay"]["client_certificates"]:
        raise ld.error("relay.client_certificates", f"the edge's: the {ld.tier} tier never sees the original "
                                                    f"client's certificate (XCLIENT does not carry it)")
    for section, name in (("relay", "mynetworks"), ("server", "upstream_hosts")):
        for given in ld.given.get(section, {}).get(name, []):
            used = ipaddress.ip_interface(given)
            if used.ip != used.network.network_address:
                ld.warn(f"{section}.{name}", f"{given} has host bits set; the network used is {used.network}")
    if srv["tls_min_version"] in ("TLSv1", "TLSv1.1"):
        ld.warn("server.tls_min_version", f"{srv['tls_min_version']}: deprecated (RFC 8996); clients "
                                          f"that need it are rare and their TLS is weak")
    if ld.tier == "edge" and not v["relay"]["relay_domains"]:
        ld.warn("relay.relay_domains", "empty: the edge accepts mail for no domain from clients "
                                       "outside relay.mynetworks")


def _finish_tls(ld: Loading, prefix: str, s: dict) -> None:
    """The TLS keys of [server] or of one listener (`s`, its keys under `prefix`), together:
    a certificate comes with its key, and ``tls_sni`` names each server once and needs a
    default certificate for the clients that name none of them."""
    if bool(s["tls_cert"]) != bool(s["tls_key"]):
        raise ld.error(f"{prefix}.tls_key" if s["tls_cert"] else f"{prefix}.tls_cert",
                       "tls_cert and tls_key must be set together")
    names = [entry.split()[0] for entry in s["tls_sni"]]
    if names and not s["tls_cert"]:
        raise ld.error(f"{prefix}.tls_sni", "needs tls_cert and tls_key: the certificate for clients that "
                                            "name no server, or one not listed")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice:
        raise ld.error(f"{prefix}.tls_sni", f"{twice} is listed twice")


def _finish_listeners(ld: Loading) -> None:
    """``server.listen`` is the short way to write listeners; [listeners.NAME] the full one."""
    listeners = ld.values["listeners"]
    listen = ld.values["server"]["listen"]
    if listeners and ld.was_given("server", "listen"):
        raise ld.error("server.listen", "set either server.listen or [listeners.NAME] tables, not both")
    if not listeners:
        if not listen:
            raise ld.error("server.listen", "at least one listen address is needed")
        for i, (host, port) in enumerate(listen, 1):
            listeners["smtp" if i == 1 else f"smtp-{i}"] = {
                **{k: key.default for k, key in LISTENER.keys.items()}, "endpoint": tcp_endpoint(host, port)}
    has_auth = any(s.name == "auth" for s in ld.spec.all_sections())
    for name, listener in listeners.items():
        given = ld.given.get("listeners", {}).get(name, {})
        for key, value in ROLES[listener["role"]].items():
            if key not in given:
                listener[key] = value
        for key in LISTENER_OVERRIDES:
            if listener[key] is None:
                listener[key] = ld.values["server"][key]
        if (listener["auth"] or listener["require_auth"]) and not has_auth:
            what = "auth" if "auth" in given or "require_auth" not in given else "require_auth"
            raise ld.error(f"listeners.{name}.{what if what in given else 'role'}",
                           f"SMTP AUTH is the edge tier's; the {ld.tier} tier trusts the edge's XCLIENT LOGIN")
        if listener["require_auth"] and not listener["auth"]:
            raise ld.error(f"listeners.{name}.require_auth", "needs auth = true on this listener")
        _finish_tls(ld, f"listeners.{name}", listener)
        if not listener["endpoint"]:
            raise ld.error(f"listeners.{name}.endpoint", "required: where this listener listens")
        if listener["endpoint"].startswith("haproxy:") and not listener["proxy_hosts"]:
            raise ld.error(f"listeners.{name}.proxy_hosts", "required with a haproxy: endpoint: the "
                                                            "balancers whose PROXY header is believed")
        if listener["tls"] == "implicit" and not listener["tls_cert"]:
            raise ld.error(f"listeners.{name}.tls", "implicit TLS needs a certificate: server.tls_cert and "
                                                    "server.tls_key, or this listener's own")
        if (listener["require_tls"] or listener["auth"]) and listener["tls"] == "none" \
                and not ld.values.get("auth", {}).get("plaintext"):
            raise ld.error(f"listeners.{name}.tls", "none: this listener requires TLS (require_tls, or auth "
                                                    "over TLS only)")
        if (listener["require_tls"] or listener["auth"]) and not listener["tls_cert"] \
                and not ld.values.get("auth", {}).get("plaintext"):
            raise ld.error(f"listeners.{name}.tls_cert", f"listener {name} ({listener['role']}) needs TLS: set "
                                                         "server.tls_cert and server.tls_key, or its own")


def tcp_endpoint(host: str, port: int) -> str:
    """The endpoint description of a host:port address."""
    from twisted.internet.endpoints import quoteStringArgument
    return f"tcp:port={port}:interface={quoteStringArgument(host)}"


def _finish_policies(ld: Loading) -> None:
    """Every listener's policy exists; each policy lists checks this tier registers, each in
    a phase it can run in; phases a policy leaves out run the tier's default checks."""
    policies = ld.values["policies"]

    def builtin(spec_policy: dict) -> dict:
        base = {phase: list(spec_policy.get(phase, ())) for phase in PHASE_KEYS}
        base["relay"] = list(spec_policy.get("relay", DEFAULT_RELAY))
        base["settings"] = {check: dict(keys) for check, keys in spec_policy.get("settings", {}).items()}
        return base
    default = builtin(ld.spec.default_policy)
    builtins = {"default": default, **{n: builtin({**ld.spec.default_policy, **p})
                                       for n, p in ld.spec.policies.items()}}
    for name, policy in builtins.items():
        if name == "default" or any(lst["policy"] == name for lst in ld.values["listeners"].values()):
            policies.setdefault(name, dict(policy))
    from shared.checks.relay import PERMITS
    checks = {c.name: c for c in ld.spec.checks}
    permits = {p.name for p in (*PERMITS, *ld.spec.permits)}
    for name, policy in policies.items():
        given = ld.given.get("policies", {}).get(name, {})
        base = builtins.get(name, default)
        mine = policy.get("settings") or {}            # a built-in policy's check settings, then the file's
        policy["settings"] = {check: {**base["settings"].get(check, {}), **mine.get(check, {})}
                              for check in {*base["settings"], *mine}}        # a phase left out: the built-in one of that name
        for phase in (*PHASE_KEYS, "relay"):
            if phase not in given:
                policy[phase] = list(base[phase])
            seen = set()
            for entry in policy[phase]:
                key = f"policies.{name}.{phase}"
                if entry in seen:
                    raise ld.error(key, f"{entry} is listed twice")
                seen.add(entry)
                if phase == "relay":
                    if entry not in permits:
                        raise ld.error(key, f"unknown relay permit rule {entry!r} (this tier's: "
                                            f"{', '.join(sorted(permits))})")
                    continue
                check = checks.get(entry)
                if check is None:
                    raise ld.error(key, f"unknown check {entry!r} (the {ld.tier} tier's checks: "
                                        f"{', '.join(sorted(checks)) or 'none'})")
                if phase not in check.phases:
                    raise ld.error(key, f"check {entry} runs at {' or '.join(check.phases)}, "
                                        f"not at {phase.replace('_', ' ')}")
            if phase != "relay":
                _in_order(ld, f"policies.{name}.{phase}", phase, policy[phase], checks)
    for name, listener in ld.values["listeners"].items():
        if listener["policy"] not in policies:
            raise ld.error(f"listeners.{name}.policy", f"no policy {listener['policy']!r} "
                                                       f"(defined: {', '.join(policies)})")
    for name, policy in policies.items():
        if "client_certificate" in policy["relay"]:
            _client_certificates_reachable(ld, name)


def _in_order(ld: Loading, key: str, phase: str, entries: list[str], checks: dict) -> None:
    """A check that reads others' results comes after them (CheckType.after: names, "symbols"
    for every check that reports symbols, "*" for every other check of the phase; or
    {phase: those} for a check that reads them in some phases only).  A check that names
    another in its own ``after`` may follow it though it reports symbols: greylisting by
    score comes after the score."""
    def reads(check) -> tuple:
        after = getattr(check, "after", ())
        return after.get(phase, ()) if isinstance(after, dict) else after
    for i, entry in enumerate(entries):
        after = reads(checks[entry])
        for later in entries[i + 1:]:
            c = checks[later]
            if later in after or "*" in after or ("symbols" in after and getattr(c, "symbols", None)
                                                  and entry not in reads(c)):
                raise ld.error(key, f"{entry} reads what {later} finds: list {later} before {entry}")


def _client_certificates_reachable(ld: Loading, policy: str) -> None:
    """Warn when the client_certificate permit of `policy` can permit nobody."""
    key = f"policies.{policy}.relay"
    if not ld.values["relay"]["client_certificates"]:
        ld.warn(key, "client_certificate permits nobody: relay.client_certificates is empty")
    elif not any(lst["policy"] == policy and lst["tls_client_certificates"] == "ask" and lst["tls"] != "none"
                 for lst in ld.values["listeners"].values()):
        ld.warn(key, "client_certificate permits nobody: no listener of this policy asks for client "
                     "certificates (tls_client_certificates = \"ask\")")


# The core's cross-checks, defined above with the helpers they use.
SERVER = replace(SERVER, finish=_finish_server)
LISTENER = replace(LISTENER, finish=_finish_listeners)
POLICY = replace(POLICY, finish=_finish_policies)
CORE_SECTIONS = (SERVER, LISTENER, POLICY, RELAY, FIREWALL, DNS, LOG)


def _public_space(ld: Loading, key: str, networks: list, allow_key: str, allowed: bool, risk: str) -> None:
    """Refuse a `networks` entry that covers public address space unless `allow_key` is set."""
    if allowed:
        return
    for net in networks:
        if covers_public_space(net):
            raise ld.error(key, f"{net} covers public address space: {risk}; "
                                f"set {allow_key} = true if that is really meant")


def load(tier: str | None, path: str | os.PathLike) -> Settings:
    """Read and validate a tier's TOML file; raises ConfigError naming file, key and reason.

    With `tier` None, the file's top-level ``tier`` key says which tier it configures.
    """
    p = str(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(p, None, "file not found") from None
    except PermissionError:
        raise ConfigError(p, None, "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(p, None, "is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(p, None, f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(p, None, f"not UTF-8 text (TOML must be): byte 0x{raw[e.start]:02x} "
                                   f"on line {line}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"not valid TOML: {e}") from None
    if tier is None:
        tier = data.get("tier")
        if tier is None:
            raise ConfigError(p, "tier", "missing: say which tier this file configures "
                                         "(tier = \"edge\", \"filter\" or \"domain\")")
        if tier not in TIERS:
            raise ConfigError(p, "tier", f"unknown tier {tier!r} (edge, filter or domain)")
    return parse(tier, data, p)


# -- this host ---------------------------------------------------------------

def check_host(settings: Settings) -> None:
    """Refuse, naming file, key and reason, what this host cannot give the tier at start-up.

    Nothing is created or changed.  ``server.user`` must be an account here;
    ``log.file`` a writable file, or creatable in an existing writable directory;
    ``tls_cert``, ``tls_key``, ``tls_client_ca`` and the files of ``tls_sni`` readable
    regular files; the filter's
    ``queue.directory`` and the domain tier's ``mailboxes.maildir_root`` writable
    directories, or creatable (the nearest existing ancestor a writable directory).
    The log, pid and TLS files are opened by whoever starts the daemon, so they are
    judged for the calling user; the spool and the mailboxes are written after a
    daemon started as root has become ``server.user``, so then they are judged for
    that account, from the permission bits (ACLs are not consulted).

    ``smarthost check-config`` and a starting daemon run this
    (:func:`shared.daemon.preflight`); a reload does not, since the log and TLS
    files are opened and the spool made once, at start-up.
    """
    p, s = settings.path, settings.server
    account = None
    if s.user:
        try:
            account = pwd.getpwnam(s.user)
        except KeyError:
            raise ConfigError(p, "server.user", f"no such user {s.user!r} on this host") from None
    writer = account if os.getuid() == 0 else None      # shared.daemon.drop_privileges
    log_file = settings.log.file
    if log_file != "-":
        problem = _log_file_problem(log_file)
        if problem:
            raise ConfigError(p, "log.file", problem)
    tls_files = [(name, "", getattr(s, name)) for name in ("tls_cert", "tls_key", "tls_client_ca")]
    tls_files += [("tls_sni", f"{name}: ", f) for name, *pair in map(str.split, s.tls_sni) for f in pair]
    for name, entry, f in tls_files:
        if not f:
            continue
        if not os.path.exists(f):
            raise ConfigError(p, f"server.{name}", f"{entry}{f} does not exist")
        if not os.path.isfile(f):
            raise ConfigError(p, f"server.{name}", f"{entry}{f} is not a regular file")
        if not os.access(f, os.R_OK):
            raise ConfigError(p, f"server.{name}", f"{entry}{f} is not readable")
    if s.pid_file:
        problem = _log_file_problem(s.pid_file)      # written before the privileges are dropped
        if problem:
            raise ConfigError(p, "server.pid_file", problem)
    for section, name in directories(settings):
        problem = _directory_problem(getattr(settings.sections[section], name), writer)
        if problem:
            raise ConfigError(p, f"{section}.{name}", problem)


def directories(settings: Settings) -> list[tuple[str, str]]:
    """(section, key) of every directory the tier writes in (``Key.directory``)."""
    out = []
    for section in tier_spec(settings.tier).all_sections():
        if not section.named:
            out += [(section.name, k) for k, key in section.keys.items() if key.directory]
    return out


def _log_file_problem(path: str) -> str | None:
    """Why the log file cannot be opened for appending (None: it can)."""
    if os.path.isdir(path):
        return f"{path} is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable (to create {path})"
    return None


def _directory_problem(path: str, account: pwd.struct_passwd | None) -> str | None:
    """Why directory `path` cannot be used or made by `account` (None: the calling user);
    None when it can."""
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} exists and is not a directory"
    if _may_write(existing, account):
        return None
    who = f"user {account.pw_name}" if account else f"the calling user (uid {os.getuid()})"
    if existing == path:
        return f"{path} is not writable by {who}"
    return f"cannot be created: {existing} is not writable by {who}"


def _may_write(directory: str, account: pwd.struct_passwd | None) -> bool:
    """Whether `account` (None: the calling user) may create entries in `directory`."""
    if not os.access(directory, os.W_OK | os.X_OK):     # also false on a read-only file system
        return False
    if account is None or account.pw_uid == 0:
        return True
    st = os.stat(directory)
    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)}
    shift = 6 if st.st_uid == account.pw_uid else 3 if st.st_gid in groups else 0
    return (st.st_mode >> shift) & 0o3 == 0o3


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
                 "\r": "\\r"}


def hostport_text(host: str, port: int) -> str:
    """A (host, port) pair as written in the configuration: host:port, [IPv6]:port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def toml_value(v: Any) -> str:
    """A value in TOML syntax (host/port pairs and networks as their config strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int):  # host, port
        return toml_value(hostport_text(*v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return toml_value(str(v))
    return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if _CONTROL.match(c) else c)
                         for c in str(v)) + '"'


def dump(tier: str, sections: dict[str, dict[str, Any]]) -> str:
    """A tier's configuration file from {section: {key: value}} ([listeners] and
    [policies]: {section: {name: {key: value}}})."""
    lines = [f'tier = "{tier}"']
    for section, keys in sections.items():
        if section in NAMED_SECTIONS:
            for entry, values in keys.items():
                lines.append(f"\n[{section}.{toml_key(entry)}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
            continue
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def toml_key(name: str) -> str:
    return name if _BARE_KEY.match(name) else toml_value(name)


NAMED_SECTIONS = frozenset(s.name for s in CORE_SECTIONS if s.named)


def render(settings: Settings) -> str:
    """The effective settings as TOML, each key with its meaning, for `smarthost check-config`:
    the tier's own sections only.  A secret that is set (``redis.password``) is left out,
    commented: the output is often pasted into a ticket."""
    out = [f"# effective settings of the {settings.tier} tier from {settings.path}",
           f'tier = "{settings.tier}"']
    for section in tier_spec(settings.tier).all_sections():
        obj = settings.sections[section.name]
        entries = obj.items() if section.named else [(None, obj)]
        if section.named:
            out.append(f"\n# [{section.name}.NAME]: {section.doc}")
        for entry, values in entries:
            out.append(f"\n[{section.name}]" if entry is None else f"\n[{section.name}.{entry}]")
            for name, key in section.keys.items():
                if key.shorthand or (section.name == "policies" and name == "settings"):
                    continue                  # (the policy's settings: as tables, below)
                out.append(f"# {key.doc}")
                value = getattr(values, name)
                if key.secret and value:
                    out.append(f"# {name} = (set; not shown)")
                else:
                    out.append(f"{name} = {toml_value(value)}")
            for check, keys in (getattr(values, "settings", None) or {}).items():
                out.append(f"\n[{section.name}.{entry}.{check}]")
                out.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    return "\n".join(out) + "\n"
