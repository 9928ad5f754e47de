"""Scores and actions: what the content checks found, summed, decides what happens.

Each content check reports *symbols* (``Verdict.symbols``: ``SPF_FAIL``,
``DKIM_VALID``, ...).  The check ``actions``, last at end of data, gives each
its score -- ``[actions] scores`` when set there, else the default the check
registered (``CheckType.symbols``, printed by check-config) -- sums them and
maps the total to the strongest action whose threshold it reaches::

    reject           550 5.7.1 to the client (through the edge, in its transaction: no bounce)
    tempfail         451 4.7.1
    quarantine       kept in the filter's quarantine (smarthost quarantine ...), 250 to the client
    rewrite_subject  the Subject gets ``subject`` ("***SPAM*** %s"), and the headers below
    add_header       X-Spam-Flag: YES, and the headers below
    (below them)     accepted as it is, with X-Spam-Score and X-Spam-Status (``headers``)

A threshold of 0 turns its action off.  ``[actions.domains."example.org"]`` gives a
recipient domain thresholds and scores of its own; since a message gets one answer
at end of data, a transaction holds recipients of one profile only: a recipient of
another profile gets 452 4.5.3 at RCPT and the client sends it in a transaction of
its own (RFC 5321 4.5.3.1.10), as Postfix's client and every MTA do.

A check may also decide on its own (a DMARC p=reject failure rejects whatever the
score): it answers with a final verdict, and this check never runs.  Incoming
X-Spam-* fields are removed: only ours reach the mailbox.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.checks.core import CONTINUE, Action, Request, Verdict, note, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import Section, domain as domain_rule, setting
from shared.smtp.reply import Reply

ACTIONS = ("reject", "tempfail", "quarantine", "rewrite_subject", "add_header")
_SPAM_FIELDS = ("x-spam-score", "x-spam-status", "x-spam-flag")


MAX_SCORE = 1000.0


def _threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{value!r} is not a score (a number; 0 turns the action off)")
    if abs(value) > MAX_SCORE:
        raise ValueError(f"{value!r}: a score is at least -{MAX_SCORE:g} and at most {MAX_SCORE:g}")
    return float(value)


def _scores(value: dict) -> dict:
    out = {}
    for name, score in value.items():
        if not isinstance(name, str) or not name.replace("_", "").isalnum() or name.upper() != name:
            raise ValueError(f"{name!r} is not a symbol name (upper case, digits and _)")
        try:
            out[name] = _threshold(score)
        except ValueError:
            raise ValueError(f"symbol {name}: {score!r} is not a score (a number)") from None
    return out


def _profile(value: dict) -> dict:
    out = {}
    for key, v in value.items():
        if key in ACTIONS:
            out[key] = _threshold(v)
        elif key == "scores":
            if not isinstance(v, dict):
                raise ValueError("scores: must be a table of SYMBOL = score")
            out[key] = _scores(v)
        else:
            raise ValueError(f"{key!r}: unknown key (a domain's table may set {', '.join(ACTIONS)} and scores)")
    return out


def _domains(value: dict) -> dict:
    out = {}
    for name, profile in value.items():
        d = domain_rule(name)
        if not isinstance(profile, dict):
            raise ValueError(f"{name}: must be a table ([actions.domains.\"{name}\"])")
        try:
            out[d] = _profile(profile)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


@dataclass(frozen=True)
class ActionsSettings:
    """scores and actions at end of data (the check `actions`)"""
    reject: float = setting(15.0, "score from which the message is refused, 550 5.7.1 (0: never)", _threshold)
    tempfail: float = setting(0.0, "score from which it is refused for now, 451 4.7.1 (0: never)", _threshold)
    quarantine: float = setting(0.0, "score from which it is kept in the quarantine instead of delivered "
                                     "(0: never)", _threshold)
    rewrite_subject: float = setting(0.0, "score from which the Subject is rewritten (0: never)", _threshold)
    add_header: float = setting(6.0, "score from which X-Spam-Flag: YES is added (0: never)", _threshold)
    subject: str = setting("***SPAM*** %s", "the rewritten Subject; %s is the original")
    headers: bool = setting(True, "add X-Spam-Score and X-Spam-Status (score and symbols) to every message "
                                  "(false: only from add_header on)")
    scores: dict = setting({}, "SYMBOL = score: scores other than the checks' defaults", _scores, kind=dict)
    domains: dict = setting({}, "recipient domain = { thresholds and scores }: that domain's own "
                                "([actions.domains.\"example.org\"] reject = 10)", _domains, kind=dict)


@dataclass(frozen=True, slots=True)
class Profile:
    thresholds: dict[str, float]
    scores: dict[str, float]
    name: str = ""                      # "" for the default profile, else the recipient domain

    def action(self, score: float) -> str:
        for name in ACTIONS:
            limit = self.thresholds[name]
            if limit and score >= limit:
                return name
        return "no action"


@dataclass(frozen=True, slots=True)
class Scored:
    """The actions check's result: the total, the action and each symbol with its score."""
    score: float
    action: str
    symbols: tuple[tuple[str, float, str], ...] = field(default=())     # (name, score, detail)
    required: float = 0.0

    @property
    def log(self) -> str:
        return f"score={self.score:.2f}/{self.required:g}, action={self.action.replace(' ', '_')}"

    def status(self) -> str:
        flag = "Yes" if self.action != "no action" else "No"
        tests = ",".join(f"{n}({s:g})" for n, s, _ in self.symbols) or "none"
        return f"{flag}, score={self.score:.2f} required={self.required:g} action={self.action}\r\n\ttests={tests}"


def _known_symbols(settings) -> dict[str, float]:
    """Every symbol the tier's checks report under `settings`, with its default score."""
    from shared.config.schema import tier_spec
    out = {}
    for t in tier_spec(settings.tier).checks:
        for name, (score, _doc) in t.symbols_for(settings).items():
            out[name] = score
    return out


def _profiles(own: ActionsSettings, defaults: dict[str, float]) -> tuple[Profile, dict[str, Profile]]:
    base_thresholds = {a: getattr(own, a) for a in ACTIONS}
    base_scores = {**defaults, **own.scores}
    base = Profile(base_thresholds, base_scores)
    per_domain = {d: Profile({**base_thresholds, **{k: v for k, v in p.items() if k in ACTIONS}},
                             {**base_scores, **p.get("scores", {})}, d)
                  for d, p in own.domains.items()}
    return base, per_domain


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class Actions:
    name = "actions"

    def __init__(self, own: ActionsSettings, defaults: dict[str, float]) -> None:
        self.own = own
        self.base, self.domains = _profiles(own, defaults)

    def profile(self, recipient: str) -> Profile:
        return self.domains.get(_domain_of(recipient), self.base) if self.domains else self.base

    def __call__(self, request: Request) -> Verdict:
        if request.phase == "rcpt":
            return self.rcpt(request)
        return self.end_of_data(request)

    def rcpt(self, request: Request) -> Verdict:
        """One profile per transaction: a recipient of another waits for a transaction of its own."""
        if not self.domains or not request.recipients:
            return CONTINUE
        if self.profile(request.recipient or "") is not self.profile(request.recipients[0]):
            return tempfail(452, "4.5.3", "Recipient has other filtering rules: send it in another transaction")
        return CONTINUE

    def end_of_data(self, request: Request) -> Verdict:
        profile = self.profile(request.recipients[0]) if request.recipients else self.base
        found = []
        for verdict in request.results.values():
            for sym in verdict.symbols:
                found.append((sym.name, round(profile.scores.get(sym.name, 0.0) * sym.factor, 2), sym.detail))
        total = round(sum(s for _, s, _ in found), 2)
        action = profile.action(total)
        required = profile.thresholds["reject"] or profile.thresholds["add_header"]
        scored = Scored(total, action.replace("_", " "), tuple(found), required)
        if action == "reject":
            return Verdict(Action.REJECT, Reply(550, "5.7.1", "Spam message rejected"), result=scored)
        if action == "tempfail":
            return Verdict(Action.TEMPFAIL, Reply(451, "4.7.1", "Try again later"), result=scored)
        add: list[tuple[str, str]] = []
        drop: list[tuple[str, int]] = []
        message = request.message
        spammy = action in ("quarantine", "rewrite_subject", "add_header")
        if self.own.headers or spammy:
            add.append(("X-Spam-Score", f"{total:.2f}"))
            add.append(("X-Spam-Status", scored.status()))
        if spammy:
            add.append(("X-Spam-Flag", "YES"))
        if action == "rewrite_subject" and message is not None:
            subject = message.get("Subject", "")
            if not subject.startswith(self.own.subject.replace("%s", "").strip()):
                add.append(("Subject", self.own.subject.replace("%s", subject)))
                drop += [("subject", i) for i in range(len(message.get_all("Subject")))]
        if add and message is not None:       # theirs go (only where there are some: no removal pass)
            for name in _SPAM_FIELDS:
                drop += [(name, i) for i in range(len(message.get_all(name)))]
        verdict = note(scored, add=tuple(add), drop=tuple(drop))
        if action == "quarantine":
            return Verdict(Action.CONTINUE, result=scored, edits=verdict.edits,
                           quarantine=f"score {total:.2f} >= {profile.thresholds['quarantine']:g}")
        return verdict


def _build(own: ActionsSettings, ctx):
    return Actions(own, _known_symbols(ctx.settings))


def _summary(own: ActionsSettings, settings) -> str:
    def line(thresholds: dict, scores: dict, prefix: str) -> str:
        t = ", ".join(f"{a} {thresholds[a]:g}" for a in ACTIONS if thresholds.get(a))
        changed = ", ".join(f"{n} {s:g}" for n, s in scores.items())
        return f"{prefix}{t or 'no thresholds'}{'; scores: ' + changed if changed else ''}"
    out = [line({a: getattr(own, a) for a in ACTIONS}, own.scores, "thresholds: ")]
    for d, p in own.domains.items():
        out.append(line({**{a: getattr(own, a) for a in ACTIONS}, **p}, p.get("scores", {}), f"recipients @{d}: "))
    return "\n                  ".join(out)


def _preflight(own: ActionsSettings, settings) -> None:
    from shared.config import ConfigError
    known = _known_symbols(settings)
    for where, scores in [("actions.scores", own.scores),
                          *((f"actions.domains.{d}.scores", p.get("scores", {})) for d, p in own.domains.items())]:
        for name in scores:
            if name not in known:
                raise ConfigError(settings.path, where, f"{name}: no check of this tier reports that symbol "
                                                        f"(they are: {', '.join(sorted(known))})")


ACTIONS_CHECK = CheckType(
    "actions", phases=("rcpt", "end_of_data"), build=_build, section=Section.of("actions", ActionsSettings),
    doc="sum the symbols' scores; the total decides: reject, tempfail, quarantine, rewrite subject, add header",
    timeout=5.0, summary=_summary, preflight=_preflight, after={"end_of_data": ("symbols",)})
