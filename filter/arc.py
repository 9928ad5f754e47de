"""ARC (RFC 8617): verify the chain a message arrived with: the check ``arc``.

An intermediary (a mailing list, a forwarder) that changed a message may have
sealed what it saw: ARC-Authentication-Results, ARC-Message-Signature and
ARC-Seal, one set per hop.  This check validates the whole chain with dkimpy
(in a thread of the checks' pool, every key looked up before through the
tier's resolver) and records the chain validation result: ``pass``, ``fail``
or ``none`` (no chain), ``temperror`` when a key could not be looked up.
Symbols ARC_PASS, ARC_FAIL, ARC_TEMPERROR, ARC_NONE; the ``arc`` line of
Authentication-Results.  A passing chain does not by itself override DMARC
(a site may give ARC_PASS a larger negative score).
"""
from __future__ import annotations

from dataclasses import dataclass

import dkim as dkimpy

from shared.checks.core import Request, Symbol, Verdict, note
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, bounded, setting
from filter.dkim import _KeyUnavailable, _dnsfunc, _quiet, _signature_tags, key_name
from filter.mailauth import ContentCheck, MethodResult, compute

MAX_SETS = 50            # RFC 8617 4.2.1: at most 50 ARC sets


@dataclass(frozen=True)
class ArcSettings:
    """ARC chain verification at end of data (the check `arc`)"""
    min_key_bits: int = setting(1024, "RSA keys smaller than this fail the chain", bounded(512, 8192))
    timeout: float = setting(10.0, "seconds for the key lookups and the check together", SECONDS)


@dataclass(frozen=True, slots=True)
class ArcResult:
    result: str              # pass | fail | none | temperror
    instances: int = 0
    reason: str = ""
    domain: str = ""         # the sealer of the latest set

    @property
    def log(self) -> str:
        return f"arc={self.result}" + (f" (i={self.instances} {self.domain})" if self.instances else "")

    @property
    def methods(self) -> tuple[MethodResult, ...]:
        comment = f"i={self.instances} d={self.domain}" if self.instances else ""
        if self.result not in ("pass", "none") and self.reason:
            comment = f"{comment}: {self.reason}" if comment else self.reason
        return (MethodResult("arc", self.result, comment[:200]),)


def verify_chain(message: bytes, keys: dict, own: ArcSettings, instances: int, domain: str) -> ArcResult:
    """In a pool thread."""
    try:
        cv, _results, reason = dkimpy.arc_verify(message, logger=_quiet, dnsfunc=_dnsfunc(keys),
                                                 minkey=own.min_key_bits)
    except _KeyUnavailable:
        return ArcResult("temperror", instances, "key lookup failed", domain)
    except Exception as e:       # hostile input: a result, never a crash
        return ArcResult("fail", instances, f"{type(e).__name__}: {e}"[:120], domain)
    cv = cv.decode() if isinstance(cv, bytes) else str(cv)
    reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason or "")
    return ArcResult(cv.lower(), instances, reason, domain)


class ArcCheck(ContentCheck):
    name = "arc"

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note(ArcResult("none"))
        seals = message.get_all("ARC-Seal")
        signatures = message.get_all("ARC-Message-Signature")
        if not seals and not signatures:
            return note(ArcResult("none"), symbols=(Symbol("ARC_NONE"),))
        if len(seals) > MAX_SETS or len(signatures) > MAX_SETS:
            return note(ArcResult("fail", len(seals), "too many ARC sets"), symbols=(Symbol("ARC_FAIL"),))
        names, latest, domain = [], -1, ""
        for value in seals + signatures:
            t = _signature_tags(value)
            if t is None:
                continue
            name = key_name(t)
            if name:
                names.append((name, "TXT"))
            try:
                i = int(t.get("i", "0"))
            except ValueError:
                continue
            if value in seals and i > latest:
                latest, domain = i, t.get("d", "").lower()
        d = self.resolver.prefetch(names)
        body = message.read_body()
        d.addCallback(lambda keys: body.addCallback(
            lambda m: compute(self.pool, message.size, verify_chain, m, keys, self.own, max(latest, 0), domain)))
        return d.addCallback(self._verdict)

    @staticmethod
    def _verdict(result: ArcResult) -> Verdict:
        symbol = {"pass": "ARC_PASS", "fail": "ARC_FAIL", "temperror": "ARC_TEMPERROR"}.get(result.result, "ARC_NONE")
        return note(result, symbols=(Symbol(symbol, result.domain),))


def _build(own: ArcSettings, ctx):
    return ArcCheck(own, ctx)


ARC = CheckType(
    "arc", phases=("end_of_data",), build=_build, section=Section.of("arc", ArcSettings),
    timeout=lambda s: s.arc.timeout,
    doc="verify the ARC chain the message came with (dkimpy), keys through the tier's resolver",
    symbols={"ARC_PASS": (-0.5, "a valid ARC chain"),
             "ARC_FAIL": (0.5, "an ARC chain that does not validate"),
             "ARC_TEMPERROR": (0.0, "an ARC key could not be looked up"),
             "ARC_NONE": (0.0, "no ARC chain")})
