"""What the sender-authentication checks (SPF, DKIM, DMARC, ARC) share.

- :func:`checks_pool` and :func:`compute`: where dkimpy's work runs.  Nothing it does
  waits (its DNS answers are fetched before, through the tier's resolver,
  :mod:`shared.resolver`), so for a message of up to :data:`INLINE_MAX` octets it runs on
  the reactor: a 5 KB message's signature costs 0.7 ms of CPU there, against some 2 ms
  with the hand-off to a thread and back (bench/checks.py; threads give Python code no
  second core).  A larger message, whose canonicalization and hashing grow with its
  size (some 4 ms at 50 KB, 70 at 1 MB), goes to the pool's threads so the reactor
  stays responsive.
- :func:`organizational_domain`: the registered domain by the Public Suffix List
  (the ``publicsuffixlist`` package, which ships the list), as DMARC aligns on it.
- :func:`tags`: a DKIM/DMARC tag list (``v=DMARC1; p=reject``) as a dict.
- :class:`MethodResult`: one line of Authentication-Results (RFC 8601) a check
  reports in its result's ``methods``; the ``auth_results`` check writes them all.
"""
from __future__ import annotations

# The name codecs the Public Suffix List uses, loaded while the tier can still read its
# installation (see below).
import encodings.idna  # noqa: F401
import encodings.punycode  # noqa: F401
import re
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from shared.blocking import WorkerPool
from shared.resolver import resolver_for

CHECK_THREADS = 2
INLINE_MAX = 64 * 1024

# Read when the tier's code is loaded, as root (the daemon drops privileges after: server.user
# need not be able to read the installation); a tenth of a second.
_psl = PublicSuffixList()


def checks_pool(ctx) -> WorkerPool:
    def make() -> WorkerPool:
        pool = WorkerPool(ctx.reactor, size=CHECK_THREADS, name="filter-checks")
        pool.start()
        return pool
    return ctx.kept("mailauth-pool", make)


class ContentCheck:
    """What the checks that run the libraries start with: their settings, the tier's resolver
    and the checks' pool."""

    def __init__(self, own, ctx) -> None:
        self.own = own
        self.resolver = resolver_for(ctx)
        self.pool = checks_pool(ctx)


def compute(pool, size: int, fn, *args):
    """``fn(*args)``: at once for a message of `size` up to INLINE_MAX, else a Deferred of it
    from a pool thread."""
    if size <= INLINE_MAX:
        return fn(*args)
    return pool.run(fn, *args)


def public_suffix_list():
    """The list (read when this module was loaded)."""
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
