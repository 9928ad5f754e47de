"""The configuration schema of every tier, its safe defaults, and the loader.

A tier's configuration is one TOML file.  Every key is declared here with its
type, default and rule; an unknown section or key is an error (a typo must not
silently fall back to a default), and each error names the file, the key and the
reason.  A daemon whose configuration does not load does not start; on SIGHUP a
bad file is reported and the old settings stay.

Defaults are the safe ones: no open relay (``mynetworks`` is empty), XCLIENT
accepted from nobody, and the queue fsyncs.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

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
    return host, int(port)


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


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def _readable_file(value: str) -> str:
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"file {value!r} does not exist or is not readable")
    return value


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    doc: str
    item: Callable[[Any], Any] | None = None    # rule for a scalar, or for each list item
    required_in: tuple[str, ...] = ()            # tiers that must set it


SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key(str, "", "name in the greeting, EHLO and Received headers (default: the host's FQDN)"),
        "listen": Key(list, ["127.0.0.1:25"], "addresses to listen on, host:port", _hostport),
        "max_message_size": Key(int, 10_240_000, "largest message accepted, bytes (0: no limit)", _non_negative),
        "max_recipients": Key(int, 1000, "recipients per message", _positive),
        "max_line_length": Key(int, 1000, "longest line in a message, octets with CRLF (RFC 5321: 1000; 0: no limit)",
                               _non_negative),
        "max_connections": Key(int, 1000, "simultaneous client sessions", _positive),
        "max_connections_per_client": Key(int, 50, "simultaneous sessions from one client address (upstream_hosts are exempt)", _positive),
        "max_errors": Key(int, 20, "client errors before the session is closed with 421", _positive),
        "command_timeout": Key((int, float), 300, "seconds to wait for a command or a DATA chunk", _positive),
        "session_timeout": Key((int, float), 3600, "longest session, seconds", _positive),
        "shutdown_timeout": Key((int, float), 30, "on SIGTERM, seconds open sessions may take to finish", _non_negative),
        "max_received_headers": Key(int, 50, "mail loop limit: Received headers above this are rejected 554 5.4.6", _positive),
        "tls_cert": Key(str, "", "PEM certificate chain; STARTTLS is offered only when set", _readable_file),
        "tls_key": Key(str, "", "PEM private key for tls_cert", _readable_file),
        "upstream_hosts": Key(list, [], "clients allowed to send XCLIENT/XFORWARD (addresses or CIDRs)", _network),
        "reverse_lookup": Key(bool, True, "look up and forward-confirm each client's reverse name before "
                                          "the greeting (not for upstream_hosts, whose XCLIENT says it)"),
        "user": Key(str, "", "drop privileges to this user after binding the listeners"),
        "allow_any_client": Key(bool, False, "filter and domain tiers: also take mail from clients outside "
                                             "upstream_hosts and relay.mynetworks, skipping the tiers before "
                                             "this one (off: 554 5.7.1 at connect; the edge ignores this key)"),
    },
    "relay": {
        "relay_domains": Key(list, [], "domains accepted from anyone", _domain),
        "mynetworks": Key(list, [], "clients allowed to relay to any destination (CIDRs)", _network),
    },
    "next_hop": {
        "hosts": Key(list, [], "next tier's SMTP servers, host:port, tried in order", _hostport,
                     required_in=("edge", "filter")),
        "connect_timeout": Key((int, float), 30, "seconds", _positive),
        "command_timeout": Key((int, float), 300, "seconds to wait for each reply", _positive),
        "tls": Key(str, "may", "STARTTLS to the next hop: none, may or encrypt", _choice("none", "may", "encrypt")),
        "xclient": Key(bool, True, "pass the original client with XCLIENT when the next hop offers it"),
        "max_messages_per_connection": Key(int, 100, "messages carried by one connection", _positive),
        "helo_name": Key(str, "", "name sent in EHLO (default: server.hostname)"),
        "domains": Key(list, [], "recipient domains the next hop serves (empty: at the filter, "
                                 "relay.relay_domains; at the edge, every domain); mail for any other "
                                 "domain has no route and is deferred, never sent", _domain),
    },
    "queue": {
        "directory": Key(str, "", "spool directory", required_in=("filter",)),
        "retry_min": Key((int, float), 300, "first retry delay, seconds (doubles each attempt)", _positive),
        "retry_max": Key((int, float), 4000, "longest retry delay, seconds", _positive),
        "lifetime": Key((int, float), 5 * 86400, "seconds before an undeliverable message bounces", _positive),
        "concurrency": Key(int, 20, "parallel connections to the next hop", _positive),
        "scan_interval": Key((int, float), 300, "seconds between scans of the deferred queue", _positive),
        "fsync": Key(bool, True, "fsync queue files and directories before 250 (never turn off in production)"),
        "double_bounce_recipient": Key(str, "postmaster", "who is told when a bounce cannot be delivered "
                                                          "(the double bounce)", _mailbox),
    },
    "verify": {
        "recipients": Key(bool, True, "filter: ask the next hop about each recipient before answering RCPT"),
        "positive_ttl": Key((int, float), 3600, "seconds a recipient the next hop accepted stays known", _non_negative),
        "negative_ttl": Key((int, float), 300, "seconds a recipient the next hop rejected stays known", _non_negative),
    },
    "mailboxes": {
        "domains": Key(list, [], "hosted domains", _domain, required_in=("domain",)),
        "maildir_root": Key(str, "", "mailboxes are ROOT/DOMAIN/LOCALPART/Maildir", required_in=("domain",)),
        "users": Key(list, [], "user addresses with a mailbox", _address),
        "aliases": Key(dict, {}, "alias address -> list of user addresses"),
    },
    "dns": {
        "nameservers": Key(list, [], "DNS servers, host:port (empty: those of /etc/resolv.conf)", _hostport),
        "timeout": Key((int, float), 5, "seconds one lookup may take before it counts as a temporary failure",
                       _positive),
    },
    "log": {
        "level": Key(str, "info", "debug, info, warn or error", _choice("debug", "info", "warn", "error")),
        "file": Key(str, "-", "log file, or - for standard error"),
    },
}


@dataclass(frozen=True)
class Settings:
    tier: str
    path: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def hostname(self) -> str:
        return self.values["server"]["hostname"]


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"list": "array", "dict": "table", "str": "string", "int": "integer",
            "bool": "boolean"}.get(t.__name__, t.__name__)


def _check_value(path: str, name: str, key: Key, value: Any) -> Any:
    # TOML booleans are ints in Python: keep them apart.
    if isinstance(value, bool) and key.type is not bool:
        raise ConfigError(path, name, f"expected {_type_name(key.type)}, got a boolean")
    if not isinstance(value, key.type):
        raise ConfigError(path, name, f"expected {_type_name(key.type)}, got {type(value).__name__} {value!r}")
    try:
        if key.type is list:
            return [key.item(v) if key.item else v for v in value]
        if key.item is not None:
            return key.item(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(path, name, str(e)) from None
    return value


def parse(tier: str, data: dict[str, Any], path: str = "<config>") -> Settings:
    """Validate a parsed TOML document for `tier` and fill in the defaults."""
    if tier not in TIERS:
        raise ConfigError(path, None, f"unknown tier {tier!r} (edge, filter or domain)")
    data = dict(data)
    declared = data.pop("tier", tier)
    if declared != tier:
        raise ConfigError(path, "tier", f"this file configures the {declared!r} tier, not {tier!r}")
    for section in data:
        if section not in SCHEMA:
            raise ConfigError(path, section, f"unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(data[section], dict):
            raise ConfigError(path, section, "must be a table ([section])")
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        for name in given:
            if name not in keys:
                raise ConfigError(path, f"{section}.{name}", "unknown key")
        out = {}
        for name, key in keys.items():
            full = f"{section}.{name}"
            if name in given:
                out[name] = _check_value(path, full, key, given[name])
            else:
                if tier in key.required_in:
                    raise ConfigError(path, full, f"required for the {tier} tier")
                out[name] = _check_value(path, full, key, key.default)
        values[section] = out
    _cross_checks(tier, path, values)
    return Settings(tier, path, values)


def _cross_checks(tier: str, path: str, v: dict[str, dict[str, Any]]) -> None:
    srv = v["server"]
    if not srv["hostname"]:
        srv["hostname"] = socket.getfqdn() or "localhost"
    if bool(srv["tls_cert"]) != bool(srv["tls_key"]):
        raise ConfigError(path, "server.tls_key" if srv["tls_cert"] else "server.tls_cert",
                          "tls_cert and tls_key must be set together")
    if not srv["listen"]:
        raise ConfigError(path, "server.listen", "at least one listen address is needed")
    q = v["queue"]
    if q["retry_max"] < q["retry_min"]:
        raise ConfigError(path, "queue.retry_max", f"smaller than queue.retry_min ({q['retry_min']})")
    if not v["next_hop"]["helo_name"]:
        v["next_hop"]["helo_name"] = srv["hostname"]
    mb = v["mailboxes"]
    if tier == "domain":
        users = set(mb["users"])
        for user in users:
            if user.split("@", 1)[1] not in mb["domains"]:
                raise ConfigError(path, "mailboxes.users", f"{user} is not in a hosted domain (mailboxes.domains)")
        aliases = {}
        for alias, targets in mb["aliases"].items():
            key = f"mailboxes.aliases.{alias}"
            try:
                alias = _address(alias)
            except ValueError as e:
                raise ConfigError(path, key, str(e)) from None
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets:
                raise ConfigError(path, key, "expected an address or a non-empty array of addresses")
            try:
                targets = [_address(t) for t in targets]
            except (ValueError, TypeError) as e:
                raise ConfigError(path, key, str(e)) from None
            for t in targets:
                if t not in users:
                    raise ConfigError(path, key, f"target {t} is not a user (mailboxes.users)")
            aliases[alias] = targets
        mb["aliases"] = aliases
        if not v["relay"]["relay_domains"]:
            v["relay"]["relay_domains"] = list(mb["domains"])


def load(tier: str | None, path: str | os.PathLike) -> Settings:
    """Read and validate a tier's TOML file; raises ConfigError naming file, key and reason.

    With `tier` None, the file's top-level ``tier`` key says which tier it configures.
    """
    p = str(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(p, None, "file not found") from None
    except PermissionError:
        raise ConfigError(p, None, "permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"not valid TOML: {e}") from None
    except IsADirectoryError:
        raise ConfigError(p, None, "is a directory, not a file") from None
    if tier is None:
        tier = data.get("tier")
        if tier is None:
            raise ConfigError(p, "tier", "missing: say which tier this file configures "
                                         "(tier = \"edge\", \"filter\" or \"domain\")")
        if tier not in TIERS:
            raise ConfigError(p, "tier", f"unknown tier {tier!r} (edge, filter or domain)")
    return parse(tier, data, p)


def toml_value(v: Any) -> str:
    """A value in TOML syntax (host/port pairs and networks as their config strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], int):   # host, port
        host, port = v
        return toml_value(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return toml_value(str(v))
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dump(tier: str, sections: dict[str, dict[str, Any]]) -> str:
    """A tier's configuration file from {section: {key: value}}."""
    lines = [f'tier = "{tier}"']
    for section, keys in sections.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


def render(settings: Settings) -> str:
    """The effective settings as TOML, each key with its meaning, for `smarthost check-config`."""
    out = [f"# effective settings of the {settings.tier} tier from {settings.path}",
           f'tier = "{settings.tier}"']
    for section, keys in SCHEMA.items():
        out.append(f"\n[{section}]")
        for name, key in keys.items():
            out.append(f"# {key.doc}")
            out.append(f"{name} = {toml_value(settings.values[section][name])}")
    return "\n".join(out) + "\n"
