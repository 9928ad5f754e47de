"""The ``helo_name`` check: refuse HELO/EHLO names no real mail server sends.

As Postfix's ``reject_invalid_helo_hostname`` and ``reject_non_fqdn_helo_hostname``:
a name that is neither a hostname nor an address literal is refused with 501
5.5.2, one without a dot (``localhost``, ``WORKSTATION``) with 504 5.5.2; with
``reject_own_name``, a client that greets with this server's own name (a
common forgery) with 550 5.7.1.  Off by default: add it to a policy's ``helo``
(or, behind the edge, ``mail``: the filter sees the original client's HELO
from XCLIENT) phase.

This module is the worked example of docs/architecture.md: a settings
dataclass (its ``[helo_name]`` section), a build function, and the
registration every tier that lists it gets.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shared.checks.core import CONTINUE, Request, Verdict, reject
from shared.checks.registry import CheckType
from shared.config.schema import Section, setting


@dataclass(frozen=True)
class HeloNameSettings:
    """the HELO/EHLO name check (the check `helo_name`)"""
    reject_invalid: bool = setting(True, "refuse (501 5.5.2) a name that is neither a hostname nor an "
                                         "address literal such as [192.0.2.1]")
    reject_non_fqdn: bool = setting(True, "refuse (504 5.5.2) a hostname without a dot")
    reject_own_name: bool = setting(False, "refuse (550 5.7.1) this server's own name (server.hostname) "
                                           "from anyone but relay.mynetworks")


def _literal(name: str) -> bool:
    """An address literal: [192.0.2.1] or [IPv6:2001:db8::1] (RFC 5321 4.1.3)."""
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        ipaddress.ip_address(inner)
    except ValueError:
        return False
    return True


def _hostname(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(name) <= 255 and all(
        0 < len(lab) <= 63 and lab[0] != "-" and lab[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in lab) for lab in labels) \
        and not labels[-1].isdigit()


class HeloName:
    def __init__(self, own: HeloNameSettings, hostname: str, mynetworks) -> None:
        self.own = own
        self.hostname = hostname.lower()
        self.mynetworks = mynetworks

    def __call__(self, request: Request) -> Verdict:
        name = request.helo
        if not name:                     # before any HELO (a check at mail, and no EHLO): nothing to judge
            return CONTINUE
        if _literal(name):
            return CONTINUE
        if not _hostname(name):
            if self.own.reject_invalid:
                return reject(501, "5.5.2", f"<{name[:255]}>: Helo command rejected: Invalid name")
            return CONTINUE
        if self.own.reject_non_fqdn and "." not in name.rstrip("."):
            return reject(504, "5.5.2", f"<{name}>: Helo command rejected: need fully-qualified hostname")
        if (self.own.reject_own_name and name.rstrip(".").lower() == self.hostname
                and request.client_address not in self.mynetworks):
            return reject(550, "5.7.1", f"<{name}>: Helo command rejected: that is my name")
        return CONTINUE


def _build(own: HeloNameSettings, ctx) -> HeloName:
    from shared.netlist import NetworkList
    return HeloName(own, ctx.settings.hostname, NetworkList(ctx.settings.relay.mynetworks))


HELO_NAME = CheckType("helo_name", phases=("helo", "mail", "rcpt"), build=_build,
                      section=Section.of("helo_name", HeloNameSettings),
                      doc="refuse invalid (501), non-FQDN (504) and, optionally, our own HELO names")
