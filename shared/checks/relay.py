"""Relay control: denied unless a rule permits.

A policy's ``relay`` list names the permit rules, tried in order for each
recipient; the first that permits lets RCPT go on to the checks, and when none
does the answer is 554 5.7.1.  There is no other way past it: the checks of the
rcpt phase run only after it, and none of them can permit what it refused.

- ``relay_domains``: the recipient's domain is hosted here (``relay.relay_domains``),
  so it is not relaying at all: accepted from anyone;
- ``mynetworks``: the client (the original one, as a trusted upstream's XCLIENT
  reports it) is inside ``relay.mynetworks``;
- ``authenticated``: the client authenticated (SMTP AUTH at the edge, or XCLIENT
  LOGIN from a trusted upstream tier);
- ``client_certificate`` (the edge's, :data:`CLIENT_CERTIFICATE`): the client
  presented, in its TLS handshake, a certificate whose SHA-256 fingerprint is in
  ``relay.client_certificates`` (Postfix's ``permit_tls_clientcerts`` with
  ``relay_clientcerts``).  The listener must ask for certificates
  (``tls_client_certificates = "ask"``, :mod:`shared.transport.tls`); with
  ``tls_client_ca``, only one that verifies against it counts.  Only the edge can
  judge it: XCLIENT does not carry the certificate, so the filter and domain
  tiers never see it, and mail the edge relays for such a client must be mail
  the filter takes from it too (its ``relay_domains``, or the client's address in
  its ``mynetworks``).

The bare ``postmaster`` is always accepted (RFC 5321 4.5.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from shared.checks.core import CONTINUE, Action, Request, Verdict
from shared.netlist import NetworkList
from shared.smtp.reply import RELAY_DENIED


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class PermitRule:
    """A relay permit rule: ``build(settings)`` gives ``permits(request) -> bool``."""
    name: str
    doc: str
    build: Callable[[Any], Callable[[Request], bool]]


class RelayControl:
    """One policy's permit rules, as ``(name, permits(request) -> bool)`` pairs."""

    def __init__(self, rules: list[tuple[str, Callable[[Request], bool]]]) -> None:
        self.rules = tuple(rules)

    def __call__(self, request: Request) -> Verdict:
        rcpt = request.recipient or ""
        if "@" not in rcpt and rcpt.lower() == "postmaster":
            return CONTINUE       # RFC 5321: postmaster must be accepted (local postmaster)
        for _name, permits in self.rules:
            if permits(request):
                return CONTINUE
        return Verdict(Action.REJECT, RELAY_DENIED, "relay")


def _relay_domains(settings) -> Callable[[Request], bool]:
    hosted = frozenset(d.lower() for d in settings.relay.relay_domains)
    return lambda request: domain_of(request.recipient or "") in hosted


def _mynetworks(settings) -> Callable[[Request], bool]:
    networks = NetworkList(settings.relay.mynetworks)
    return lambda request: request.client_address in networks


def _authenticated(settings) -> Callable[[Request], bool]:
    return lambda request: bool(request.login)


PERMITS = (
    PermitRule("relay_domains", "the recipient's domain is in relay.relay_domains (hosted here)",
               _relay_domains),
    PermitRule("mynetworks", "the client's address is in relay.mynetworks", _mynetworks),
    PermitRule("authenticated", "the client authenticated (SMTP AUTH, or XCLIENT LOGIN from an "
                                "upstream tier)", _authenticated),
)


def _client_certificate(settings) -> Callable[[Request], bool]:
    listed = frozenset(settings.relay.client_certificates)
    return lambda request: request.client_certificate in listed


CLIENT_CERTIFICATE = PermitRule("client_certificate", "the client's TLS certificate has a SHA-256 fingerprint "
                                                      "listed in relay.client_certificates", _client_certificate)


def relay_policy(relay_domains, mynetworks) -> RelayControl:
    """The default chain (relay_domains, mynetworks) from plain lists: for tests and tools."""
    hosted = frozenset(d.lower() for d in relay_domains)
    networks = NetworkList(mynetworks)
    return RelayControl([("relay_domains", lambda r: domain_of(r.recipient or "") in hosted),
                         ("mynetworks", lambda r: r.client_address in networks)])
