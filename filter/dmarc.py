"""DMARC (RFC 7489): the From domain's policy over the SPF and DKIM results: the check ``dmarc``.

Runs after ``spf`` and ``dkim`` (it reads their results) at end of data:

1. The author domain: the message must have exactly one From field with addresses of
   one domain; anything else is ``permerror`` (symbol DMARC_BAD_FROM).
2. The policy: the TXT record at ``_dmarc.<From domain>``, else at
   ``_dmarc.<organizational domain>`` (Public Suffix List), where ``sp`` (else ``p``)
   applies.  Only a record starting ``v=DMARC1`` counts; none (or several): no policy.
3. Alignment: SPF passed for a MAIL FROM (or, for the null sender, HELO) domain
   aligned with the From domain, or a DKIM signature passed for an aligned d=;
   relaxed (same organizational domain) unless ``aspf``/``adkim`` is ``s``.
4. ``pct``: the policy applies to that share of failing messages; the others get
   the next milder one (reject -> quarantine -> none), as RFC 7489 6.6.4 says.

What a failure does is configured: ``reject_policy`` (p=reject) is ``reject`` (550
5.7.1 to the client, whatever the score), ``quarantine`` or ``score`` (the symbol
DMARC_REJECT only); ``quarantine_policy`` likewise for p=quarantine.  A DNS failure,
or SPF/DKIM temporary errors that leave DMARC undecided, is ``temperror``: 451 4.7.1
(``temperror = "tempfail"``, the default: a policy may say reject) or scored.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import getaddresses

from shared.checks.core import Action, Request, Symbol, Verdict, note, reject, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, choice, setting
from shared.resolver import OK, DNSTempError, resolver_for
from filter.mailauth import MethodResult, aligned, organizational_domain, tags

POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class DmarcSettings:
    """DMARC of the From domain at end of data (the check `dmarc`)"""
    reject_policy: str = setting("reject", "what a failure under p=reject does: reject (550 5.7.1), quarantine "
                                           "or score (symbol DMARC_REJECT)", choice("reject", "quarantine", "score"))
    quarantine_policy: str = setting("score", "what a failure under p=quarantine does: quarantine, or score "
                                              "(symbol DMARC_QUARANTINE)", choice("quarantine", "score"))
    temperror: str = setting("tempfail", "no decision for a DNS failure: tempfail (451 4.7.1) or score "
                                         "(DMARC_TEMPERROR)", choice("tempfail", "score"))
    timeout: float = setting(10.0, "seconds the policy lookups may take", SECONDS)


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str                 # pass | fail | none | temperror | permerror
    domain: str = ""            # the From domain
    policy: str = ""            # the policy published (p, or sp for a subdomain)
    applied: str = ""           # what the policy means for this message after pct: none|quarantine|reject
    reason: str = ""

    @property
    def log(self) -> str:
        return f"dmarc={self.result}" + (f" ({self.domain} p={self.policy})" if self.policy else "")

    @property
    def methods(self) -> tuple[MethodResult, ...]:
        props = (("header.from", self.domain),) if self.domain else ()
        comment = self.reason
        if self.policy:
            comment = f"policy={self.policy}" + (f" disposition={self.applied}" if self.result == "fail"
                                                 and self.applied and self.applied != self.policy else "")
        return (MethodResult("dmarc", self.result, comment, props),)


def author_domain(request: Request) -> str | None:
    if request.message is None:
        return None
    froms = request.message.get_all("From")
    if len(froms) != 1:
        return None
    domains = {addr.rpartition("@")[2].lower().rstrip(".") for _, addr in getaddresses(froms) if "@" in addr}
    if len(domains) != 1:
        return None
    d = domains.pop()
    return d if d and "." in d else None


def parse_record(texts: list[bytes]) -> dict | None:
    found = []
    for t in texts:
        text = t.decode("utf-8", "replace")
        if text.strip().lower().startswith("v=dmarc1"):
            found.append(text)
    if len(found) != 1:
        return None
    t = tags(found[0].strip().rstrip(";"))
    if t is None or t.get("v", "").upper() != "DMARC1":
        return None
    return t


class DmarcCheck:
    name = "dmarc"

    def __init__(self, own: DmarcSettings, ctx) -> None:
        self.own = own
        self.resolver = resolver_for(ctx)

    def __call__(self, request: Request):
        spf = request.results.get("spf")
        if spf is not None and spf.result is not None and getattr(spf.result, "result", None) == "skipped":
            return note(_Skipped())
        domain = author_domain(request)
        if domain is None:
            return self._decide(DmarcResult("permerror", reason="not one From domain"),
                                (Symbol("DMARC_BAD_FROM"),))
        org = organizational_domain(domain)
        d = self.resolver.lookup("_dmarc." + domain, "TXT")
        d.addCallback(self._found, request, domain, org, False)
        d.addErrback(self._dns_failed, domain)
        return d

    def _found(self, answer, request, domain, org, at_org):
        record = parse_record(answer.texts()) if answer.status == OK else None
        if record is None:
            if not at_org and org != domain:
                d = self.resolver.lookup("_dmarc." + org, "TXT")
                d.addCallback(self._found, request, domain, org, True)
                d.addErrback(self._dns_failed, domain)
                return d
            return self._decide(DmarcResult("none", domain, reason="no DMARC record"), (Symbol("DMARC_NONE", domain),))
        p = record.get("p", "").lower()
        if p not in POLICIES:
            if "rua" in record and not p:
                p = "none"           # RFC 7489 6.6.3: a record with rua= but no valid p= is p=none
            else:
                return self._decide(DmarcResult("permerror", domain, reason="invalid p="),
                                    (Symbol("DMARC_PERMERROR", domain),))
        policy = p
        if at_org:
            sp = record.get("sp", "").lower()
            policy = sp if sp in POLICIES else p
        strict_spf = record.get("aspf", "r").lower() == "s"
        strict_dkim = record.get("adkim", "r").lower() == "s"
        try:
            pct = max(0, min(100, int(record.get("pct", "100"))))
        except ValueError:
            pct = 100

        spf = getattr(request.results.get("spf"), "result", None)
        dkim = getattr(request.results.get("dkim"), "result", None)
        spf_domain = getattr(spf, "passed_domain", None)
        dkim_domains = dkim.passed_domains() if dkim is not None else []
        if (spf_domain and aligned(spf_domain, domain, strict_spf)) or \
                any(aligned(d, domain, strict_dkim) for d in dkim_domains):
            return self._decide(DmarcResult("pass", domain, policy, "none"), (Symbol("DMARC_PASS", domain),))
        undecided = getattr(spf, "result", None) == "temperror" or getattr(dkim, "temperror", False)
        if undecided:
            return self._decide(DmarcResult("temperror", domain, policy, reason="SPF or DKIM lookup failed"),
                                (Symbol("DMARC_TEMPERROR", domain),))
        applied = policy
        if pct < 100 and random.random() * 100 >= pct:
            applied = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
        symbol = {"reject": "DMARC_REJECT", "quarantine": "DMARC_QUARANTINE"}.get(applied, "DMARC_FAIL_NONE")
        return self._decide(DmarcResult("fail", domain, policy, applied), (Symbol(symbol, domain),))

    def _dns_failed(self, failure, domain):
        failure.trap(DNSTempError)
        return self._decide(DmarcResult("temperror", domain, reason="policy lookup failed"),
                            (Symbol("DMARC_TEMPERROR", domain),))

    def _decide(self, result: DmarcResult, symbols) -> Verdict:
        if result.result == "temperror" and self.own.temperror == "tempfail":
            v = tempfail(451, "4.7.1", f"DMARC policy of {result.domain or 'the sender'} could not be "
                                       f"evaluated: try again later")
            return Verdict(v.action, v.reply, result=result, symbols=symbols)
        if result.result == "fail" and result.applied == "reject":
            if self.own.reject_policy == "reject":
                v = reject(550, "5.7.1", f"Rejected by the DMARC policy of {result.domain}")
                return Verdict(v.action, v.reply, result=result, symbols=symbols)
            if self.own.reject_policy == "quarantine":
                return Verdict(Action.CONTINUE, result=result, symbols=symbols,
                               quarantine=f"DMARC p=reject of {result.domain}")
        if result.result == "fail" and result.applied == "quarantine" and self.own.quarantine_policy == "quarantine":
            return Verdict(Action.CONTINUE, result=result, symbols=symbols,
                           quarantine=f"DMARC p=quarantine of {result.domain}")
        return note(result, symbols=symbols)


@dataclass(frozen=True, slots=True)
class _Skipped:
    methods: tuple = ()
    log: str = "dmarc=skipped"


def _build(own: DmarcSettings, ctx):
    return DmarcCheck(own, ctx)


DMARC = CheckType(
    "dmarc", phases=("end_of_data",), build=_build, section=Section.of("dmarc", DmarcSettings),
    timeout=lambda s: s.dmarc.timeout, after=("spf", "dkim"),
    doc="the From domain's DMARC policy over the spf and dkim results (after them); p=reject refuses",
    symbols={"DMARC_PASS": (-0.5, "SPF or DKIM passed for a domain aligned with From"),
             "DMARC_REJECT": (2.0, "failed, and the domain says reject"),
             "DMARC_QUARANTINE": (1.5, "failed, and the domain says quarantine"),
             "DMARC_FAIL_NONE": (0.1, "failed, and the domain says none"),
             "DMARC_NONE": (0.0, "the From domain publishes no policy"),
             "DMARC_BAD_FROM": (1.0, "not exactly one From domain"),
             "DMARC_PERMERROR": (0.5, "an invalid DMARC record"),
             "DMARC_TEMPERROR": (0.0, "no decision: a DNS failure")})
