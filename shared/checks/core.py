"""Check, Verdict, Request and Chain: see :mod:`shared.checks`."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.message import HeaderEdits, MessageView
from shared.smtp.reply import TEMPFAIL_CHECK, Reply

log = Logger(namespace="smarthost.checks")

# The SMTP phases a check can run in: "starttls" at the STARTTLS command, before the
# handshake (a refusal, 454, keeps the session in plaintext); "data" at the DATA command
# (before the body); "end_of_data" when the message is whole (the only phase that sees it).
PHASES = ("connect", "helo", "starttls", "auth", "mail", "rcpt", "data", "end_of_data")


class Action(enum.Enum):
    CONTINUE = "continue"       # no opinion: next check
    ACCEPT = "accept"           # decided yes: skip the rest of this phase's chain
    REJECT = "reject"           # 5xx
    TEMPFAIL = "tempfail"       # 4xx
    DISCONNECT = "disconnect"   # reply, then close the session


@dataclass(frozen=True, slots=True)
class Symbol:
    """One finding of a content check, as rspamd names them: ``SPF_FAIL``, ``DKIM_VALID``.
    Its score is not the check's to say: the ``actions`` check looks it up in its settings
    (``[actions] scores``, per recipient domain), where each check's registered default
    (``CheckType.symbols``) is the fallback.  ``detail`` says what it is about, for the
    X-Spam-Status field and the log ("example.org", "d=example.org s=sel").  ``factor``
    multiplies the score: an outside scanner's own score (spamd's 7.3 is SPAMD with factor
    7.3, so ``[actions] scores = { SPAMD = 0.5 }`` halves what it counts)."""
    name: str
    detail: str = ""
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's answer: what to do (``action``, and the ``reply`` for the client), what it
    found (``result``: free-form, e.g. "pass" or a mapping, seen by later checks in
    ``Request.results``; a result with a ``log`` attribute has that text on the message's
    log line), its findings (``symbols``, scored by the ``actions`` check), and header
    fields to add or remove (``edits``; at end of data, applied by the sink, see
    :mod:`shared.message`).  ``quarantine`` (at end of data, with action CONTINUE or
    ACCEPT) asks the sink to keep the message out of delivery, for the reason given.
    A result whose ``allowlisted`` attribute is true before MAIL (the dnsbl check's)
    vouches for the client: the listener's pregreet wait ends for it."""
    action: Action
    reply: Reply | None = None
    check: str = ""             # the name of the check that gave it, for logs
    result: Any = None
    edits: HeaderEdits | None = None
    symbols: tuple[Symbol, ...] = ()
    quarantine: str | None = None

    @property
    def final(self) -> bool:
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)


def note(result: Any = None, *, add: tuple[tuple[str, str], ...] = (), remove: tuple[str, ...] = (),
         drop: tuple[tuple[str, int], ...] = (), symbols: tuple[Symbol, ...] = ()) -> Verdict:
    """No opinion on the session, but a result for later checks, symbols to score and
    header edits."""
    edits = HeaderEdits(add=tuple(add), remove=frozenset(remove), drop=frozenset(drop)) \
        if add or remove or drop else None
    return Verdict(Action.CONTINUE, result=result, edits=edits, symbols=tuple(symbols))


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
    ignores the rest.  Fields not yet known in a phase are None.  The client is
    the original one (from XCLIENT behind the edge); ``tls`` is its TLS protocol
    and cipher ("TLSv1.3 TLS_AES_256_GCM_SHA384"), None in plaintext;
    ``client_certificate`` the SHA-256 fingerprint ("AB:CD:...") of the certificate
    it presented in its TLS handshake, when the listener asked for one and it counts
    (:class:`shared.transport.tls.ClientCertificate`) -- only the edge knows it:
    XCLIENT does not carry it; ``login`` its AUTH identity.  ``results`` maps each
    check that ran before in this transaction (or session, before MAIL) to its
    Verdict; ``message`` is the message, at end of data only.
    """
    phase: str
    client_address: str
    client_port: int | None = None
    client_name: str | None = None
    helo: str | None = None
    protocol: str | None = None
    tls: str | None = None
    login: str | None = None
    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    recipients: tuple[str, ...] = ()
    size: int | None = None
    received_count: int = 0
    results: Mapping[str, Verdict] = field(default_factory=dict)
    message: MessageView | None = None
    listener: str | None = None
    mechanism: str | None = None      # auth phase: the SASL mechanism
    client_certificate: str | None = None

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
        self._names = {p: frozenset(c.name for c in cs) for p, cs in self._by_phase.items()}

    def has(self, phase: str) -> bool:
        return bool(self._by_phase[phase])

    def runs(self, name: str, phase: str) -> bool:
        """Whether the check `name` runs in `phase` here."""
        return name in self._names[phase]

    def run(self, request: Request, record: Callable[[str, Verdict], None] | None = None) -> defer.Deferred:
        """Fire the phase's checks in order; a Deferred of the first final Verdict or CONTINUE.

        ``record(name, verdict)`` is told every check's verdict as it comes (the
        session keeps them: ``Request.results`` of the checks after, header edits).
        A check that answers at once (a cache hit, a table look-up) costs a plain
        call: no timer and no Deferred of its own; only a check that returns a
        Deferred is given its timeout.
        """
        return self._continue(iter(self._by_phase[request.phase]), request, record)

    def _continue(self, checks, request: Request, record) -> defer.Deferred:
        for check in checks:
            try:
                result = check.fn(request)
            except Exception:
                return defer.succeed(self._recorded(self._failed(Failure(), check), check, record))
            if isinstance(result, defer.Deferred):
                result.addTimeout(check.timeout, self.reactor)
                result.addCallback(self._checked, check).addErrback(self._failed, check)
                result.addCallback(self._recorded, check, record)
                return result.addCallback(lambda v: v if v.final else self._continue(checks, request, record))
            try:
                verdict = self._checked(result, check)
            except Exception:
                verdict = self._failed(Failure(), check)
            self._recorded(verdict, check, record)
            if verdict.final:
                return defer.succeed(verdict)
        return defer.succeed(CONTINUE)

    @staticmethod
    def _recorded(verdict: Verdict, check: Check, record) -> Verdict:
        if record is not None:
            record(check.name, verdict)
        return verdict

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
