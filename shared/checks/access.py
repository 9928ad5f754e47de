"""The ``access`` check: per-phase access tables, as Postfix's ``check_*_access``.

``[access]`` holds four tables, each a list of entries ``KEY ACTION [CODE ENHANCED TEXT]``
or ``file:/PATH`` (a file of such entries, one per line, ``#`` comments; read again on
reload):

- ``client`` (at connect): KEY is an IP address or CIDR network;
- ``helo`` (at HELO): a hostname or domain;
- ``sender`` (at MAIL) and ``recipient`` (at RCPT): an address ``user@example.org``, a
  local part ``user@``, or a domain ``example.org``.

A domain matches itself and every subdomain; an address is looked up whole, then by its
local part, then by its domain and its parents; the first matching entry of a table
decides, in the order written.  Actions:

- ``ok``: accepted; the phase's later checks are skipped (relay control is not a check
  and is never skipped: an ``ok`` cannot open the relay);
- ``reject`` (554 5.7.1), ``tempfail`` (450 4.7.1), ``disconnect`` (421 4.7.0, then the
  session is closed); each may give its own code, enhanced code and text.

Client keys are compiled like the firewall's (:class:`shared.firewall.AddressMap`), so a
table of 100,000 networks costs a bisection per connection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shared.checks.core import ACCEPT, CONTINUE, Action, Request, Verdict
from shared.checks.registry import CheckType
from shared.config.schema import Section, setting
from shared.config.schema import ConfigError
from shared.firewall import AddressMap, RuleError, address_range, table_file
from shared.smtp.reply import Reply

_DEFAULTS = {"reject": (554, "5.7.1"), "tempfail": (450, "4.7.1"), "disconnect": (421, "4.7.0")}
_CLASS = {"reject": "5", "tempfail": "4", "disconnect": "4"}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_WHAT = {"client": "Client host", "helo": "Helo command", "sender": "Sender address",
         "recipient": "Recipient address"}


def _entry_rule(value: str) -> str:
    """A table entry, checked at load (files are read when the check is built)."""
    if not value.startswith("file:"):
        parse_entry(value, value)
    elif not value[5:].startswith("/"):
        raise ValueError(f"{value!r}: the file must be an absolute path")
    return value


@dataclass(frozen=True)
class AccessSettings:
    """access tables per phase (the check `access`)"""
    client: tuple = setting((), "at connect: 'ADDRESS-OR-CIDR ACTION [CODE ENHANCED TEXT]' entries or "
                                "file:/PATH of them; ACTION: ok, reject, tempfail or disconnect", _entry_rule)
    helo: tuple = setting((), "at HELO: 'HOSTNAME-OR-DOMAIN ACTION ...' entries or file:/PATH", _entry_rule)
    sender: tuple = setting((), "at MAIL: 'ADDRESS, LOCALPART@ OR DOMAIN ACTION ...' entries or file:/PATH",
                            _entry_rule)
    recipient: tuple = setting((), "at RCPT: 'ADDRESS, LOCALPART@ OR DOMAIN ACTION ...' entries or file:/PATH",
                               _entry_rule)


@dataclass(frozen=True)
class Entry:
    key: str
    action: str
    reply: Reply | None


def parse_entry(text: str, where: str) -> Entry:
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[1].lower() not in ("ok", *_DEFAULTS):
        raise RuleError(f"{where}: {text!r} is not 'KEY ACTION' (ACTION: ok, reject, tempfail, disconnect)")
    key, action = parts[0].lower(), parts[1].lower()
    rest = parts[2] if len(parts) > 2 else ""
    if action == "ok":
        if rest:
            raise RuleError(f"{where}: {text!r}: ok takes no reply")
        return Entry(key, action, None)
    if not rest:
        return Entry(key, action, None)
    code, _, more = rest.partition(" ")
    enhanced, _, words = more.partition(" ")
    if not (code.isdigit() and len(code) == 3 and code[0] == _CLASS[action] and _ENHANCED.match(enhanced)
            and enhanced[0] == code[0] and words.strip()):
        raise RuleError(f"{where}: {text!r}: the reply must be 'CODE ENHANCED TEXT' with a "
                        f"{_CLASS[action]}xx code, e.g. {_DEFAULTS[action][0]} {_DEFAULTS[action][1]} text")
    return Entry(key, action, Reply(int(code), enhanced, words.strip()))


def _entries(table: tuple[str, ...], name: str):
    for item in table:
        if not item.startswith("file:"):
            yield parse_entry(item, f"access.{name}")
            continue
        for where, line in table_file(item[5:]):
            yield parse_entry(line, where)


class NameTable:
    """Names, addresses and domains -> the first entry written for each key."""

    def __init__(self, entries) -> None:
        self.keys: dict[str, Entry] = {}
        for e in entries:
            self.keys.setdefault(e.key.rstrip("."), e)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, value: str) -> Entry | None:
        """The entry for an address (whole, local part, domain and parents) or a name."""
        value = value.lower().rstrip(".")
        if "@" in value:
            local, _, domain = value.rpartition("@")
            for key in (value, f"{local}@"):
                if key in self.keys:
                    return self.keys[key]
        else:
            domain = value
        while domain:
            if domain in self.keys:
                return self.keys[domain]
            domain = domain.partition(".")[2]
        return None


class Access:
    PHASES = {"connect": "client", "helo": "helo", "mail": "sender", "rcpt": "recipient"}

    def __init__(self, own: AccessSettings, path: str = "<config>") -> None:
        """Raises ConfigError naming ``access.TABLE`` for a file that cannot be read or a
        bad line in one."""
        try:
            table = "client"
            self.client = AddressMap((address_range(e.key, f"access.client: {e.key}"), e)
                                     for e in _entries(own.client, "client"))
            self.names = {}
            for table in ("helo", "sender", "recipient"):
                self.names[table] = NameTable(_entries(getattr(own, table), table))
        except RuleError as e:
            raise ConfigError(path, f"access.{table}", str(e)) from None

    def __call__(self, request: Request) -> Verdict:
        table = self.PHASES.get(request.phase)
        if table == "client":
            entry, value = self.client.get(request.client_address), request.client_address
        elif table is not None:
            value = {"helo": request.helo, "sender": request.sender, "recipient": request.recipient}[table]
            entry = self.names[table].find(value) if value else None
        else:
            return CONTINUE
        if entry is None:
            return CONTINUE
        if entry.action == "ok":
            return ACCEPT
        reply = entry.reply or Reply(*_DEFAULTS[entry.action],
                                     f"<{value}>: {_WHAT[table]} rejected: Access denied")
        action = {"reject": Action.REJECT, "tempfail": Action.TEMPFAIL, "disconnect": Action.DISCONNECT}
        return Verdict(action[entry.action], reply)


def _active(own: AccessSettings, settings=None) -> bool:
    return bool(own.client or own.helo or own.sender or own.recipient)


def _build(own: AccessSettings, ctx):
    return Access(own, ctx.settings.path) if _active(own) else None


def _preflight(own: AccessSettings, settings) -> None:
    """What start-up would refuse (a table file that does not read), for check-config."""
    if _active(own):
        Access(own, settings.path)


ACCESS = CheckType("access", phases=("connect", "helo", "mail", "rcpt"), build=_build,
                   section=Section.of("access", AccessSettings), active=_active, preflight=_preflight,
                   doc="access tables by client, HELO name, sender and recipient (ok, reject, tempfail, "
                       "disconnect), as Postfix's check_*_access")
