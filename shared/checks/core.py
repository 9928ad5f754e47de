"""Check, Verdict, Request and Chain: see :mod:`shared.checks`."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.smtp.reply import TEMPFAIL_CHECK, Reply

log = Logger(namespace="smarthost.checks")

PHASES = ("connect", "helo", "mail", "rcpt", "data")


class Action(enum.Enum):
    CONTINUE = "continue"       # no opinion: next check
    ACCEPT = "accept"           # decided yes: skip the rest of this phase's chain
    REJECT = "reject"           # 5xx
    TEMPFAIL = "tempfail"       # 4xx
    DISCONNECT = "disconnect"   # reply, then close the session


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reply: Reply | None = None
    check: str = ""             # the name of the check that gave it, for logs

    @property
    def final(self) -> bool:
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)


def accept(reply: Reply | None = None) -> Verdict:
    return Verdict(Action.ACCEPT, reply)


def reject(code: int, enhanced: str, text: str) -> Verdict:
    return Verdict(Action.REJECT, Reply(code, enhanced, text))


def tempfail(code: int, enhanced: str, text: str) -> Verdict:
    return Verdict(Action.TEMPFAIL, Reply(code, enhanced, text))


def disconnect(code: int, enhanced: str, text: str) -> Verdict:
    return Verdict(Action.DISCONNECT, Reply(code, enhanced, text))


@dataclass(frozen=True, slots=True)
class Request:
    """What a check may look at: flat and labelled with its phase.

    Like a policy-delegation request, a check reads the fields it needs and
    ignores the rest.  Fields not yet known in a phase are None.
    """
    phase: str
    client_address: str
    client_port: int | None = None
    client_name: str | None = None
    helo: str | None = None
    protocol: str | None = None
    tls: bool = False
    login: str | None = None
    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    recipients: tuple[str, ...] = ()
    size: int | None = None
    received_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def at(self, phase: str, **changes: Any) -> "Request":
        return replace(self, phase=phase, **changes)


CheckFn = Callable[[Request], "Verdict | defer.Deferred[Verdict]"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    phase: str
    fn: CheckFn
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"check {self.name}: unknown phase {self.phase!r}")


class Chain:
    """The checks of every phase, in the order configuration gave them."""

    def __init__(self, checks: list[Check], *, reactor) -> None:
        self.reactor = reactor
        self.checks = list(checks)
        self._by_phase = {p: [c for c in self.checks if c.phase == p] for p in PHASES}

    def describe(self) -> str:
        """The order checks run in, one line each (printed by check-config)."""
        lines = []
        for phase in PHASES:
            for i, c in enumerate(self._by_phase[phase], 1):
                lines.append(f"{phase:8} {i:2}. {c.name} (timeout {c.timeout:g}s)")
        return "\n".join(lines) or "(no checks)"

    def has(self, phase: str) -> bool:
        return bool(self._by_phase[phase])

    def run(self, request: Request) -> defer.Deferred:
        """Fire the phase's checks in order; a Deferred of the first final Verdict or CONTINUE.

        A check that answers at once (a cache hit, a table look-up) costs a plain
        call: no timer and no Deferred of its own; only a check that returns a
        Deferred is given its timeout.
        """
        return self._continue(iter(self._by_phase[request.phase]), request)

    def _continue(self, checks, request: Request) -> defer.Deferred:
        for check in checks:
            try:
                result = check.fn(request)
            except Exception:
                return defer.succeed(self._failed(Failure(), check))
            if isinstance(result, defer.Deferred):
                result.addTimeout(check.timeout, self.reactor)
                result.addCallback(self._checked, check).addErrback(self._failed, check)
                return result.addCallback(lambda v: v if v.final else self._continue(checks, request))
            try:
                verdict = self._checked(result, check)
            except Exception:
                verdict = self._failed(Failure(), check)
            if verdict.final:
                return defer.succeed(verdict)
        return defer.succeed(CONTINUE)

    @staticmethod
    def _checked(verdict, check: Check) -> Verdict:
        if not isinstance(verdict, Verdict):
            raise TypeError(f"check {check.name} returned {verdict!r}, not a Verdict")
        if verdict.final and not verdict.check:
            verdict = replace(verdict, check=check.name)
        return verdict

    def _failed(self, failure: Failure, check: Check) -> Verdict:
        log.failure("check {check} failed; answering tempfail", failure, check=check.name)
        return Verdict(Action.TEMPFAIL, TEMPFAIL_CHECK, check.name)
