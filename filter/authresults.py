"""Authentication-Results (RFC 8601): the check ``auth_results``.

After the sender-authentication checks (spf, dkim, arc, dmarc) at end of data,
it writes one Authentication-Results field with the filter's authserv-id
(``[auth_results] authserv_id``, by default ``server.hostname``) and every
method's result, in the order the checks ran -- each check's result lists its
lines (``methods``: :class:`filter.mailauth.MethodResult`).

Incoming Authentication-Results fields that claim our authserv-id are forgeries
(RFC 8601 5: a border MTA removes them): they are removed, those of other hosts
are kept.  ARC-Authentication-Results fields are left alone: they belong to sealed
ARC sets, which the ``arc`` check validates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shared.checks.core import Request, note
from shared.checks.registry import CheckType
from shared.config.schema import Section, hostname, setting
from filter.mailauth import MethodResult

_AUTHSERV = re.compile(r"\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (its first token, comments skipped)."""
    m = _AUTHSERV.match(value)
    return m.group(1).lower() if m else ""


@dataclass(frozen=True)
class AuthResultsSettings:
    """the Authentication-Results field at end of data (the check `auth_results`)"""
    authserv_id: str = setting("", "the name in our Authentication-Results fields (empty: server.hostname); "
                                   "incoming fields with it are removed as forged", hostname)


@dataclass(frozen=True, slots=True)
class Written:
    field: str
    removed: int

    @property
    def log(self) -> str | None:
        return f"forged_auth_results_removed={self.removed}" if self.removed else None


class AuthResults:
    name = "auth_results"

    def __init__(self, authserv_id: str) -> None:
        self.authserv_id = authserv_id.lower()

    def __call__(self, request: Request):
        lines = []
        if request.login:
            lines.append(MethodResult("auth", "pass", "", (("smtp.auth", request.login),)).text())
        for verdict in request.results.values():
            for m in getattr(verdict.result, "methods", ()) or ():
                lines.append(m.text())
        value = f"{self.authserv_id};" + ("".join(f"\r\n\t{ln};" for ln in lines)[:-1] if lines else " none")
        drop = []
        if request.message is not None:
            for i, v in enumerate(request.message.get_all("Authentication-Results")):
                if authserv_id_of(v) == self.authserv_id:
                    drop.append(("authentication-results", i))
        return note(Written(value, len(drop)), add=(("Authentication-Results", value),), drop=tuple(drop))


def _build(own: AuthResultsSettings, ctx):
    return AuthResults(own.authserv_id or ctx.settings.server.hostname)


AUTH_RESULTS = CheckType(
    "auth_results", phases=("end_of_data",), build=_build, section=Section.of("auth_results", AuthResultsSettings),
    timeout=5.0, after=("spf", "dkim", "arc", "dmarc"),
    doc="one Authentication-Results field of every method's result (after them); forged ones with our id removed",
    summary=lambda own, s: f"authserv-id {own.authserv_id or s.server.hostname}")
