"""What the sender-authentication checks (SPF, DKIM, DMARC, ARC) share.

- :func:`checks_pool`: the threads the libraries (pyspf, dkimpy) run in, kept for the
  life of the process, so no hashing, signature check or library DNS call runs on the
  reactor.  Their DNS goes through the tier's resolver (:mod:`shared.resolver`).
- :func:`organizational_domain`: the registered domain by the Public Suffix List
  (the ``publicsuffixlist`` package, which ships the list), as DMARC aligns on it.
- :func:`tags`: a DKIM/DMARC tag list (``v=DMARC1; p=reject``) as a dict.
- :class:`MethodResult`: one line of Authentication-Results (RFC 8601) a check
  reports in its result's ``methods``; the ``auth_results`` check writes them all.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from shared.blocking import WorkerPool

CHECK_THREADS = 2

_psl = None
_psl_lock = threading.Lock()


def checks_pool(ctx) -> WorkerPool:
    def make() -> WorkerPool:
        pool = WorkerPool(ctx.reactor, size=CHECK_THREADS, name="filter-checks")
        pool.start()
        return pool
    return ctx.kept("mailauth-pool", make)


def public_suffix_list():
    """The list, read once (a few tenths of a second): at build time, never per message."""
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList
            _psl = PublicSuffixList()
        return _psl


def organizational_domain(domain: str) -> str:
    """The registered domain of `domain` ("mail.example.co.uk" -> "example.co.uk"); a
    public suffix itself, or a name under no known suffix, is its own."""
    domain = domain.lower().rstrip(".")
    return public_suffix_list().privatesuffix(domain) or domain


def aligned(a: str, b: str, strict: bool) -> bool:
    """DMARC identifier alignment (RFC 7489 3.1): equal names (strict), or the same
    organizational domain (relaxed)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if a == b:
        return True
    return not strict and organizational_domain(a) == organizational_domain(b)


_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*([^;]*?)\s*(?:;|\Z)")


def tags(text: str) -> dict[str, str] | None:
    """``a=b; c=d`` as {"a": "b", "c": "d"} (names lower case); None when it is not a tag
    list or a tag repeats."""
    out: dict[str, str] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TAG.match(text, pos)
        if not m:
            return None
        name = m.group(1).lower()
        if name in out:
            return None
        out[name] = m.group(2)
        pos = m.end()
    return out


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


_PTYPE_VALUE = re.compile(r'[\x21-\x7e]+')


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One resinfo of Authentication-Results: ``spf=pass smtp.mailfrom=a@example.org``."""
    method: str
    result: str
    reason: str = ""                              # a comment: "(domain of ... designates ...)"
    properties: tuple[tuple[str, str], ...] = ()  # ("smtp.mailfrom", "a@example.org")

    def text(self) -> str:
        out = f"{self.method}={self.result}"
        if self.reason:
            out += " (" + self.reason.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"
        for name, value in self.properties:
            if value and _PTYPE_VALUE.fullmatch(value) and not any(c in value for c in ';()"\\'):
                out += f" {name}={value}"
            elif value:
                out += f' {name}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return out
