"""SPF (RFC 7208) of the MAIL FROM and HELO identities: the check ``spf``.

pyspf evaluates the policy in a thread of the checks' pool; its DNS goes through
the tier's resolver (cached answers read in the thread, the rest asked of the
reactor), with the limits of RFC 7208 4.6.4 (10 lookups, 2 void lookups) that
pyspf enforces.  The client is the original one (XCLIENT from the edge).

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
from shared.resolver import DNSTempError, resolver_for
from filter.mailauth import MethodResult, checks_pool, domain_of

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_local = threading.local()


def _lookup(name, qtype, strict=True, timeout=None):
    """pyspf's DNS (its module-level DNSLookup hook), in a checks-pool thread: the resolver
    of the check that runs in this thread."""
    resolver = getattr(_local, "resolver", None)
    if resolver is None:
        raise pyspf.TempError("DNS lookup outside a smarthost check")
    try:
        answer = resolver.blocking(name, qtype)
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


def evaluate(resolver, ip: str, sender: str, helo: str, receiver: str, check_helo: bool, timeout: float):
    """In a pool thread: (SpfResult, Received-SPF value or None)."""
    _local.resolver = resolver
    try:
        helo_result = None
        helo_ok = bool(helo) and valid_hostname(helo.lower().rstrip(".")) and "." in helo
        if check_helo and helo_ok:
            hq = pyspf.query(i=ip, s="postmaster@" + helo, h=helo, receiver=receiver, querytime=timeout)
            helo_result, _, hexp = hq.check()
        if not sender:
            if helo_result is None:
                if not helo_ok:
                    return SpfResult("none", "", "helo", None, "no identity to check", sender, helo), None
                hq = pyspf.query(i=ip, s="postmaster@" + helo, h=helo, receiver=receiver, querytime=timeout)
                helo_result, _, hexp = hq.check()
            comment = hq.get_header_comment(helo_result)
            header = hq.get_header(helo_result, receiver)
            return SpfResult(helo_result, helo.lower().rstrip("."), "helo", None, f"{receiver}: {comment}",
                             sender, helo), header
        q = pyspf.query(i=ip, s=sender, h=helo or "unknown", receiver=receiver, querytime=timeout)
        result, _, exp = q.check()
        comment = q.get_header_comment(result)
        header = q.get_header(result, receiver)
        return SpfResult(result, domain_of(sender), "mailfrom", helo_result, f"{receiver}: {comment}",
                         sender, helo), header
    finally:
        _local.resolver = None


class SpfCheck:
    name = "spf"

    def __init__(self, own: SpfSettings, ctx) -> None:
        self.own = own
        self.resolver = resolver_for(ctx)
        self.pool = checks_pool(ctx)
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
        d = self.pool.run(evaluate, self.resolver, ip, request.sender or "", request.helo or "", self.receiver,
                          self.own.helo, self.own.timeout)
        return d.addCallback(self._verdict)

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
