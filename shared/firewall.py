"""Firewall-like rules by client address: who may open a session at all.

Rules are ordered, ``allow`` or ``deny``, each naming a network (IPv4 or IPv6
CIDR, or a single address) or a file of them (``deny file:/etc/smarthost/drop.txt``:
one address or CIDR per line, ``#`` comments; a country list or a blocklist feed
of 100,000 entries).  A listener's own rules come first, then the global
``[firewall]`` ones; the first rule that matches decides, and an address no rule
matches is allowed.  A denied client gets ``554 5.7.1`` instead of a greeting and
is disconnected, before any other work (no reverse lookup, no session, no log
line of its own but the one that says it was denied).

Lookups cost O(log n) whatever the number of rules: :class:`Firewall` turns
the ordered, possibly overlapping rules into disjoint address ranges, each
holding the decision of the first rule that covers it, and looks an address up
by bisection.  Building takes O(n log n) (about a second for 100,000 CIDRs) and
happens when the configuration is loaded, so files are read again on reload.
"""
from __future__ import annotations

import heapq
import socket
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

ACTIONS = ("allow", "deny")


class RuleError(ValueError):
    """A rule or a rule file that cannot be used; the text names the rule or file and line."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str          # the rule as written, "file:PATH" rules with the line's network appended

    def __str__(self) -> str:
        return self.rule


def parse_rule(text: str) -> tuple[str, str]:
    """``"deny 192.0.2.0/24"`` -> ("deny", "192.0.2.0/24"); the target is checked later."""
    action, _, target = text.strip().partition(" ")
    target = target.strip()
    if action not in ACTIONS or not target or " " in target:
        raise RuleError(f"{text!r} is not a rule: write 'allow NETWORK', 'deny NETWORK' or "
                        f"'deny file:/PATH' (a file of networks, one per line)")
    if target.startswith("file:") and not target[5:].startswith("/"):
        raise RuleError(f"{text!r}: the file must be an absolute path")
    if not target.startswith("file:"):
        address_range(target, text)
    return action, target


_FAMILIES = ((6, socket.AF_INET6, 128), (4, socket.AF_INET, 32))


def _address(text: str) -> tuple[int, int, int] | None:
    """(version, integer, bits) of an IP address string, IPv4-mapped IPv6 as IPv4; None if
    it is not one.  inet_pton, not the ipaddress module: a 100,000-line feed is parsed on
    every reload, and each connection is looked up."""
    version, family, bits = _FAMILIES[0] if ":" in text else _FAMILIES[1]
    try:
        value = int.from_bytes(socket.inet_pton(family, text), "big")
    except (OSError, ValueError):
        return None
    if version == 6 and value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF, 32
    return version, value, bits


def address_range(value: str, where: str) -> tuple[int, int, int]:
    """(version, first address, first address after) of a network "ADDR[/PREFIX]"."""
    addr, slash, prefix = value.partition("/")
    parsed = _address(addr)
    mapped = parsed is not None and parsed[0] == 4 and ":" in addr
    if parsed is not None and (not slash or (prefix.isdigit() and int(prefix) <= parsed[2] and not mapped)):
        version, number, bits = parsed
        host_bits = bits - (int(prefix) if slash else bits)
        start = number >> host_bits << host_bits
        return version, start, start + (1 << host_bits)
    if mapped:
        raise RuleError(f"{where}: {value!r}: write an IPv4-mapped network as the IPv4 network it holds")
    raise RuleError(f"{where}: {value!r} is not an IP address or CIDR network")


def _networks(target: str):
    """The address ranges of one rule's target, with their label for the log."""
    if not target.startswith("file:"):
        yield address_range(target, target), target
        return
    for where, entry in table_file(target[5:]):
        yield address_range(entry, where), f"{target} ({entry})"


def table_file(path: str):
    """("PATH line N", entry) for each entry of a rule or table file: one per line, blank
    lines and ``#`` comments skipped.  RuleError names the file it cannot read."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise RuleError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                yield f"{path} line {number}", entry


class AddressMap:
    """A first-match map from address ranges to values: ``entries`` are
    ``((version, start, end), value)`` in order of priority; :meth:`get` gives the
    value of the first entry whose range holds an address, in O(log n)."""

    def __init__(self, entries) -> None:
        spans: dict[int, list[tuple[int, int, int, Any]]] = {4: [], 6: []}
        for order, ((version, start, end), value) in enumerate(entries):
            spans[version].append((start, end, order, value))
        self.count = len(spans[4]) + len(spans[6])
        self._tables = {v: _disjoint(s) for v, s in spans.items()}

    def __len__(self) -> int:
        return self.count

    @property
    def ranges(self) -> int:
        """How many disjoint ranges the entries became."""
        return sum(len(t[0]) for t in self._tables.values())

    def get(self, address: str) -> Any:
        parsed = _address(address)
        if parsed is None:
            return None
        version, value, _ = parsed
        starts, ends, values = self._tables[version]
        i = bisect_right(starts, value) - 1
        if i >= 0 and value < ends[i]:
            return values[i]
        return None


class Firewall:
    """Ordered rules compiled for O(log n) lookups (see the module docstring)."""

    def __init__(self, rules: list[str] | tuple[str, ...]) -> None:
        self.rules = tuple(rules)
        self.map = AddressMap(self._entries())

    def _entries(self):
        for text in self.rules:
            action, target = parse_rule(text)
            for span, label in _networks(target):
                yield span, Decision(action == "allow", f"{action} {label}")

    def __bool__(self) -> bool:
        return len(self.map) > 0

    def decide(self, address: str) -> Decision | None:
        """The first matching rule's decision for `address`, or None when none matches."""
        return self.map.get(address)


def _disjoint(spans: list[tuple[int, int, int, Any]]):
    """Disjoint ranges [start, end) and, for each, the value of the first entry (lowest
    order) covering it: a sweep over the range ends with a heap of the entries open there."""
    points = sorted({p for s in spans for p in (s[0], s[1])})
    by_start: dict[int, list] = {}
    for s in spans:
        by_start.setdefault(s[0], []).append(s)
    starts, ends, values = [], [], []
    active: list[tuple[int, int, Any]] = []      # (order, end, value)
    for here, nxt in zip(points, points[1:]):
        for start, end, order, value in by_start.get(here, ()):
            heapq.heappush(active, (order, end, value))
        while active and active[0][1] <= here:
            heapq.heappop(active)                 # ended: entries lower in order may show
        if not active:
            continue
        value = active[0][2]
        if ends and ends[-1] == here and values[-1] is value:
            ends[-1] = nxt                        # the same entry goes on
        else:
            starts.append(here)
            ends.append(nxt)
            values.append(value)
    return starts, ends, values
