"""Relay control: denied unless a rule permits.

Mail to a hosted domain (``relay.relay_domains``) is accepted from anyone;
mail to any other destination only from a client inside ``relay.mynetworks``
(the original client, as reported by a trusted upstream's XCLIENT).  There is
no other way to relay: everything else is 554 5.7.1.
"""
from __future__ import annotations

from shared.checks.core import CONTINUE, Action, Request, Verdict
from shared.netlist import NetworkList
from shared.smtp.reply import RELAY_DENIED


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class RelayPolicy:
    def __init__(self, relay_domains: list[str], mynetworks: list) -> None:
        self.relay_domains = frozenset(d.lower() for d in relay_domains)
        self.mynetworks = NetworkList(mynetworks)

    def __call__(self, request: Request) -> Verdict:
        rcpt = request.recipient or ""
        if "@" not in rcpt and rcpt.lower() == "postmaster":
            return CONTINUE       # RFC 5321: postmaster must be accepted (local postmaster)
        if domain_of(rcpt) in self.relay_domains:
            return CONTINUE
        if request.client_address in self.mynetworks:
            return CONTINUE
        return Verdict(Action.REJECT, RELAY_DENIED, "relay")
