"""SPF (RFC 7208) of the MAIL FROM and HELO identities: the check ``spf``.

pyspf evaluates the policy on the reactor, never waiting there: its DNS is
answered from the tier's resolver cache, and a name not in it stops the pass
(:class:`_Evaluation`); the names it needed are looked up asynchronously and the
evaluation starts again, now further (an evaluation is a fraction of a millisecond
of CPU; a thread hand-off would cost more).  The limits of RFC 7208 4.6.4 (10
lookups, 2 void lookups) are pyspf's.  The client is the original one (XCLIENT
from the edge).

- HELO is checked first (``helo = true``) when it is a domain name; for the null
  sender its result is the MAIL FROM result (RFC 7208 2.4).
- Skipped for authenticated submission (XCLIENT LOGIN) and ``relay.mynetworks``:
  their mail is not the Internet's to vouch for.
- Results: pass, fail, softfail, neutral, none, temperror, permerror, each a symbol
  (``SPF_PASS``...); a ``Received-SPF`` field (RFC 7208 9.1) and the spf and
  helo lines of Authentication-Results.
- Failure mode: ``temperror = "score"`` (SPF_TEMPERROR, scored like any symbol;
  DMARC then cannot use SPF) or ``"tempfail"`` (451 4.7.1 to the client);
  ``fail = "reject"`` refuses an SPF fail (550 5.7.23) instead of scoring it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import spf as pyspf

from shared.checks.core import Request, Symbol, Verdict, note, reject, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, choice, setting
from shared.dns import valid_hostname
from shared.netlist import NetworkList
from twisted.internet import defer

from shared.resolver import DNSTempError, normal, resolver_for
from filter.mailauth import MethodResult, domain_of

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_local = threading.local()
MAX_ROUNDS = 40          # look-up rounds of one evaluation (RFC 7208's limits make ~25 the most)


class _Miss(Exception):
    """A name not in the cache: this pass of the evaluation stops."""


class _Evaluation:
    """pyspf's DNS for one evaluation on the reactor: the answers fetched for it (temporary
    failures too, which the cache does not keep), else the resolver's cache, else a miss
    noted in ``missing`` (noted even where pyspf swallows the exception, as it does for
    exp=)."""

    def __init__(self, resolver) -> None:
        self.resolver = resolver
        self.fetched: dict = {}
        self.missing: list = []

    def answer(self, name: str, qtype: str):
        key = (normal(name), qtype)
        answer = self.fetched.get(key)
        if answer is None:
            answer = self.resolver.cached(name, qtype)
        if answer is None:
            self.missing.append(key)
            raise _Miss(key)
        if isinstance(answer, DNSTempError):
            raise answer
        return answer


def _lookup(name, qtype, strict=True, timeout=None):
    """pyspf's DNS (its module-level DNSLookup hook): the answers of the evaluation running."""
    source = getattr(_local, "evaluation", None)
    if source is None:
        raise pyspf.TempError("DNS lookup outside a smarthost check")
    try:
        answer = source.answer(name, qtype)
    except DNSTempError as e:
        raise pyspf.TempError(f"DNS {e}") from None
    return [((answer.name, qtype), r) for r in answer.records]


pyspf.DNSLookup = _lookup


@dataclass(frozen=True)
class SpfSettings:
    """SPF of MAIL FROM and HELO at end of data (the check `spf`)"""
    helo: bool = setting(True, "check the HELO name too (its result stands for the null sender's)")
    temperror: str = setting("score", "a DNS failure: score (symbol SPF_TEMPERROR) or tempfail (451 4.7.1)",
                             choice("score", "tempfail"))
    fail: str = setting("score", "an SPF fail: score (symbol SPF_FAIL) or reject (550 5.7.23)",
                        choice("score", "reject"))
    received_spf: bool = setting(True, "add a Received-SPF field")
    timeout: float = setting(10.0, "seconds the whole SPF evaluation may take (a temperror past it)", SECONDS)


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str                 # the MAIL FROM identity's (or HELO's, for the null sender)
    domain: str                 # the domain it is about (MAIL FROM's, or HELO's)
    identity: str               # "mailfrom" | "helo"
    helo_result: str | None
    comment: str
    sender: str
    helo: str

    @property
    def log(self) -> str:
        return f"spf={self.result}" + (f" (helo {self.helo_result})" if self.helo_result else "")

    @property
    def methods(self) -> tuple[MethodResult, ...]:
        out = []
        if self.identity == "mailfrom":
            out.append(MethodResult("spf", self.result, self.comment, (("smtp.mailfrom", self.sender),)))
        else:
            out.append(MethodResult("spf", self.result, self.comment, (("smtp.helo", self.helo),)))
        return tuple(out)

    @property
    def passed_domain(self) -> str | None:
        """The SPF-authenticated domain DMARC may align with (RFC 7489 3.1.2)."""
        return self.domain if self.result == "pass" else None


def evaluate(evaluation: _Evaluation, ip: str, sender: str, helo: str, receiver: str, check_helo: bool,
             timeout: float):
    """(SpfResult, Received-SPF value or None), pyspf's DNS answered by `evaluation` (raises
    _Miss at the first name it does not have)."""
    _local.evaluation = evaluation
    try:
        helo_result = None
        helo_ok = bool(helo) and valid_hostname(helo.lower().rstrip(".")) and "." in helo
        if check_helo and helo_ok:
            hq = pyspf.query(i=ip, s="postmaster@" + helo, h=helo, receiver=receiver, querytime=timeout)
            helo_result = hq.check()[0]
        if not sender:
            if helo_result is None:
                if not helo_ok:
                    return SpfResult("none", "", "helo", None, "no identity to check", sender, helo), None
                hq = pyspf.query(i=ip, s="postmaster@" + helo, h=helo, receiver=receiver, querytime=timeout)
                helo_result = hq.check()[0]
            comment = hq.get_header_comment(helo_result)
            header = hq.get_header(helo_result, receiver)
            return SpfResult(helo_result, helo.lower().rstrip("."), "helo", None, f"{receiver}: {comment}",
                             sender, helo), header
        q = pyspf.query(i=ip, s=sender, h=helo or "unknown", receiver=receiver, querytime=timeout)
        result = q.check()[0]
        comment = q.get_header_comment(result)
        header = q.get_header(result, receiver)
        return SpfResult(result, domain_of(sender), "mailfrom", helo_result, f"{receiver}: {comment}",
                         sender, helo), header
    finally:
        _local.evaluation = None


def evaluate_async(resolver, ip: str, sender: str, helo: str, receiver: str, check_helo: bool, timeout: float,
                   _ev: _Evaluation | None = None, _round: int = 0):
    """:func:`evaluate` on the reactor: the result at once when every answer is cached, else a
    Deferred of it, after as many rounds of asynchronous look-ups as the policy needs."""
    args = (ip, sender, helo, receiver, check_helo, timeout)
    ev = _ev or _Evaluation(resolver)
    ev.missing = []
    try:
        done = evaluate(ev, *args)
        if not ev.missing:            # else pyspf swallowed a miss (exp=): look it up too
            return done
    except _Miss:
        pass
    if _round >= MAX_ROUNDS:
        return SpfResult("temperror", domain_of(sender) or helo, "mailfrom" if sender else "helo", None,
                         f"{receiver}: too many DNS rounds", sender, helo), None
    d = resolver.prefetch(ev.missing)
    d.addCallback(ev.fetched.update)
    return d.addCallback(lambda _: evaluate_async(resolver, *args, _ev=ev, _round=_round + 1))


class SpfCheck:
    name = "spf"

    def __init__(self, own: SpfSettings, ctx) -> None:
        self.own = own
        self.resolver = resolver_for(ctx)
        self.receiver = ctx.settings.server.hostname
        self.mynetworks = NetworkList(ctx.settings.relay.mynetworks) if ctx.settings.relay.mynetworks else None

    def __call__(self, request: Request):
        if request.login:
            return note(_Skipped("authenticated"))
        ip = request.client_address
        if not ip:
            return note(_Skipped("no client address"))
        if self.mynetworks is not None and ip in self.mynetworks:
            return note(_Skipped("mynetworks"))
        done = evaluate_async(self.resolver, ip, request.sender or "", request.helo or "", self.receiver,
                              self.own.helo, self.own.timeout)
        if isinstance(done, defer.Deferred):
            return done.addCallback(self._verdict)
        return self._verdict(done)

    def _verdict(self, done) -> Verdict:
        result, header = done
        symbols = (Symbol("SPF_" + result.result.upper(), result.domain),)
        add = (("Received-SPF", header),) if header and self.own.received_spf else ()
        if result.result == "temperror" and self.own.temperror == "tempfail":
            v = tempfail(451, "4.7.1", f"SPF lookup failed for {result.domain or 'the sender'}: try again later")
            return Verdict(v.action, v.reply, result=result, symbols=symbols)
        if result.result == "fail" and self.own.fail == "reject":
            v = reject(550, "5.7.23", f"SPF: {result.domain} does not designate this host as a permitted sender")
            return Verdict(v.action, v.reply, result=result, symbols=symbols)
        return note(result, add=add, symbols=symbols)


@dataclass(frozen=True, slots=True)
class _Skipped:
    why: str
    methods: tuple = ()

    @property
    def log(self) -> str:
        return f"spf=skipped ({self.why})"

    passed_domain = None
    result = "skipped"


def _build(own: SpfSettings, ctx):
    return SpfCheck(own, ctx)


SPF = CheckType(
    "spf", phases=("end_of_data",), build=_build, section=Section.of("spf", SpfSettings),
    timeout=lambda s: s.spf.timeout + 1,
    doc="SPF of MAIL FROM and HELO for the original client (pyspf); Received-SPF",
    symbols={"SPF_PASS": (-0.2, "the client may send for the MAIL FROM domain"),
             "SPF_FAIL": (3.0, "the domain says the client may not send for it (-all)"),
             "SPF_SOFTFAIL": (1.0, "the domain says the client probably may not (~all)"),
             "SPF_NEUTRAL": (0.0, "the domain says nothing about the client (?all)"),
             "SPF_NONE": (0.0, "no SPF record"),
             "SPF_TEMPERROR": (0.0, "a DNS failure: no result"),
             "SPF_PERMERROR": (0.5, "a broken SPF record")})
