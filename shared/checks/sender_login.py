"""The ``sender_login`` check: an authenticated user sends only as themselves.

As Postfix's ``reject_sender_login_mismatch`` with ``smtpd_sender_login_maps``:
on a session that authenticated, MAIL FROM must be an address the login owns,
else 553 5.7.1.  A login owns

- the address equal to it (case-insensitive): ``alice@example.test`` sends as
  ``alice@example.test``;
- the addresses ``owners`` gives it: entries ``"SENDER LOGIN [LOGIN...]"``,
  where SENDER is an address, ``@domain`` (every address of the domain) or
  ``<>`` (the null sender, which nobody owns otherwise).

Sessions without AUTH are not judged (the mx role takes no AUTH; the
submission roles require it before MAIL).  On the edge's built-in
``submission`` policy by default.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.checks.core import CONTINUE, Request, Verdict, reject
from shared.checks.registry import CheckType
from shared.config.schema import Section, setting


def _entry(value: str) -> str:
    parts = value.split()
    if len(parts) < 2:
        raise ValueError(f"{value!r}: expected SENDER LOGIN [LOGIN...] (SENDER: an address, @domain or <>)")
    sender = parts[0]
    if sender != "<>" and ("@" not in sender or sender.endswith("@")):
        raise ValueError(f"{sender!r}: SENDER is an address, @domain or <>")
    return value


@dataclass(frozen=True)
class SenderLoginSettings:
    """which authenticated users may use which sender addresses (the check `sender_login`)"""
    owners: tuple = setting((), "extra sender addresses per login: 'SENDER LOGIN [LOGIN...]', SENDER an "
                                "address, @domain or <>; a login always owns the address equal to it",
                            _entry)


class SenderLogin:
    def __init__(self, own: SenderLoginSettings) -> None:
        self.owners: dict[str, frozenset[str]] = {}
        for entry in own.owners:
            sender, *logins = entry.split()
            key = sender.lower()
            self.owners[key] = self.owners.get(key, frozenset()) | {x.lower() for x in logins}

    def owns(self, login: str, sender: str) -> bool:
        login, sender = login.lower(), sender.lower()
        if sender == login:
            return True
        if login in self.owners.get(sender or "<>", ()):
            return True
        domain = sender.rpartition("@")[2]
        return bool(sender) and login in self.owners.get("@" + domain, ())

    def __call__(self, request: Request) -> Verdict:
        if not request.login:
            return CONTINUE
        sender = request.sender or ""
        if self.owns(request.login, sender):
            return CONTINUE
        return reject(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {request.login}")


SENDER_LOGIN = CheckType("sender_login", phases=("mail",), build=lambda own, ctx: SenderLogin(own),
                         section=Section.of("sender_login", SenderLoginSettings),
                         doc="MAIL FROM must be an address the authenticated user owns (553 5.7.1)")
