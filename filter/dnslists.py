"""DNS lists with scores: the checks ``dnslists`` (the client's address) and ``urilists``
(the domains of the URLs in the message).

Each entry of ``[dnslists] zones`` and ``[urilists] zones`` is the edge's
``[dnsbl]`` entry (:func:`shared.checks.dnsbl.parse_site`, postscreen's syntax)
with a score and a symbol::

    ZONE[=FILTER]*SCORE [SYMBOL]

    "zen.example=127.0.0.[2..3]*5.5 RBL_ZEN_SBL"
    "list.dnswl.example=127.0.[0..255].[2..3]*-2 DNSWL_MED"
    "multi.uribl.example=127.0.0.[2;4;6]*4 URIBL_MULTI"

- FILTER: which answers count (``127.0.0.[2..11]``, ``127.0.[0..255].[1;3;5..7]``);
  without one any listing counts;
- SCORE: a number, required (-1000 to 1000); negative for an allowlist (DNSWL);
- SYMBOL: what the hit is called on X-Spam-Status and the log line, upper case,
  digits and ``_``; left out, it is made of the zone: ``RBL_`` (``DNSWL_`` for a
  negative score; ``URIBL_`` for a URI list) and the zone's labels,
  ``RBL_ZEN_EXAMPLE``.

Each hit is a symbol (:class:`shared.checks.core.Symbol`) scored by the ``actions``
check; the entry's score is the symbol's default, which ``[actions] scores``
overrides (per recipient domain too), and check-config prints it.  A zone named by
several entries is asked once; every entry whose filter matches one of its answers
counts, once.

dnslists (phase ``mail``): the original client's address (from XCLIENT), an IPv4
address as its reversed octets, IPv6 as its 32 reversed nibbles, IPv4-mapped IPv6
as IPv4 (:func:`shared.checks.dnsbl.query_name`).  Not looked up: authenticated
submission and ``relay.mynetworks``.  Its result (:class:`ListsResult`) is in
``Request.results["dnslists"]`` for the checks after MAIL; ``allowlisted`` is true
when the hits' scores (as ``[actions] scores`` sets them) add up to a negative total
of at most ``allowlist_threshold``; greylisting skips such a client.

urilists (phase ``end_of_data``): the hosts of the ``http://``, ``https://`` and
``ftp://`` URLs and of bare ``www.`` names in the text/plain and text/html parts,
decoded (base64, quoted-printable, their charset); each host is looked up by its
registered domain by the Public Suffix List (``a.b.example.co.uk`` as
``example.co.uk.ZONE``), an IP-literal URL as its reversed address.  At most
``max_domains`` distinct names a message (in the order they occur, from its first
:data:`MAX_HOSTS` distinct hosts), none of ``skip_domains``; at most ``scan_size``
octets of decoded text, from the first 4 x ``scan_size`` octets of the message.  A URI list's symbol counts once a message
however many of its domains are listed; its detail names them.

Every lookup goes through the tier's resolver (:mod:`shared.resolver`): on the
reactor, all of a message's at once, each answer cached for its TTL (at most an
hour; "not listed" for 60 s) and shared with the other checks, across reloads.
Lists fail open: a lookup that times out or fails (SERVFAIL, REFUSED), or an answer
that is no listing -- an address in 127.255.255.0/24, where lists put their error
codes (.254: queries through a public resolver refused, .255: over quota), or one
outside 127.0.0.0/8 -- counts as not listed, and is logged once a minute per zone at
most (:func:`shared.checks.dnsbl.report_due`).  Text scanning is linear in the text
and runs in a thread of the checks' pool for a message over 64 KB
(:func:`filter.mailauth.compute`).
"""
from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass

from twisted.logger import Logger

from filter.mailauth import checks_pool, compute, organizational_domain
from shared.checks.core import CONTINUE, Request, Symbol, note
from shared.checks.dnsbl import Site, listing_problem, parse_site, query_name, report_due
from shared.checks.registry import CheckType
from shared.config.schema import Section, bounded, domain, setting
from shared.dns import client_ip
from shared.netlist import NetworkList
from shared.resolver import NXDOMAIN, NODATA, DNSTempError, resolver_for

log = Logger(namespace="smarthost.dnslists")

MAX_SCORE = 1000.0
MIB = 1024 * 1024
_SCORE = re.compile(r"[+-]?(?:[0-9]{1,4}(?:\.[0-9]{1,3})?|\.[0-9]{1,3})\Z")
_SYMBOL = re.compile(r"[A-Z][A-Z0-9_]{0,63}\Z")


# -- the zones entries ----------------------------------------------------------------

@dataclass(frozen=True)
class Listing:
    """One ``zones`` entry: the zone, its filter and score (``site``), and its symbol."""
    site: Site
    symbol: str

    @property
    def zone(self) -> str:
        return self.site.zone

    @property
    def score(self) -> float:
        return self.site.weight


def _score(given: str | None, text: str) -> float:
    if given is None:
        raise ValueError(f"{text!r}: the score is missing: ZONE[=FILTER]*SCORE [SYMBOL], e.g. zen.example*5")
    if not _SCORE.match(given.strip()) or abs(float(given)) > MAX_SCORE:
        raise ValueError(f"{text!r}: the score {given!r} is not a number from -{MAX_SCORE:g} to {MAX_SCORE:g}")
    return float(given)


def default_symbol(zone: str, prefix: str) -> str:
    """``RBL_`` + the zone's labels: zen.example -> RBL_ZEN_EXAMPLE."""
    return (prefix + re.sub(r"[^A-Z0-9]+", "_", zone.upper()).strip("_"))[:64]


def parse_listing(text: str, kind: str) -> Listing:
    """A ``zones`` entry of the check `kind` (dnslists or urilists); ValueError naming the
    entry and what is wrong with it."""
    words = text.split()
    if not 1 <= len(words) <= 2:
        raise ValueError(f"{text!r} is not ZONE[=FILTER]*SCORE [SYMBOL], e.g. zen.example=127.0.0.[2..11]*5.5 RBL_ZEN")
    entry, symbol = words[0], words[1] if len(words) == 2 else ""
    site = parse_site(entry, _score, "zen.example=127.0.0.[2..11]*5.5 RBL_ZEN")
    if not symbol:
        prefix = "URIBL_" if kind == "urilists" else "DNSWL_" if site.weight < 0 else "RBL_"
        symbol = default_symbol(site.zone, prefix)
    elif not _SYMBOL.match(symbol):
        raise ValueError(f"{text!r}: {symbol!r} is not a symbol name (upper case, digits and _, "
                         f"a letter first, at most 64)")
    return Listing(site, symbol)


def _rule(kind: str):
    def check(value: str) -> str:
        parse_listing(value, kind)
        return value
    return check


def listings(own) -> tuple[Listing, ...]:
    return tuple(parse_listing(text, own.kind) for text in own.zones)


# -- settings -------------------------------------------------------------------------

_ZONES_DOC = ("'ZONE[=FILTER]*SCORE [SYMBOL]' entries, the edge's [dnsbl] syntax with a score and a "
              "symbol: e.g. 'zen.example=127.0.0.[2..3]*5.5 RBL_ZEN_SBL'; FILTER's octets are numbers or "
              "[lists] of numbers and A..B ranges separated by ';'; SCORE the symbol's default score "
              "(negative: an allowlist); SYMBOL made of the zone when left out")


@dataclass(frozen=True)
class DnsListsSettings:
    """DNS lists with scores for the client's address (the check `dnslists`)"""
    zones: tuple = setting((), _ZONES_DOC + " (empty: the check is off)", _rule("dnslists"))
    allowlist_threshold: float = setting(0.0, "a client whose hits' scores add up to a negative total of at "
                                              "most this is allowlisted (greylisting skips it; 0: any "
                                              "negative total)", bounded(-MAX_SCORE, 0))

    kind = "dnslists"


@dataclass(frozen=True)
class UriListsSettings:
    """DNS lists with scores for the domains of the URLs in the message (the check `urilists`)"""
    zones: tuple = setting((), _ZONES_DOC + "; the registered domain of each URL's host is looked up "
                               "(empty: the check is off)", _rule("urilists"))
    max_domains: int = setting(20, "distinct domains (and IP addresses) of one message looked up, at most; "
                                   "the first ones found", bounded(1, 1000))
    scan_size: int = setting(MIB, "octets of decoded text (text/plain and text/html parts) scanned for URLs, "
                                  "at most, from the first 4 x scan_size octets of the message",
                             bounded(1024, 64 * MIB))
    skip_domains: tuple = setting((), "registered domains never looked up (ours, our partners')", domain)

    kind = "urilists"


def _finish(name: str):
    def finish(ld) -> None:
        own = ld.values[name]
        key = f"{name}.zones"
        seen, symbols = set(), {}
        for text in own["zones"]:
            entry = parse_listing(text, name)
            if (entry.zone, entry.site.codes) in seen:
                raise ld.error(key, f"{text!r}: {entry.zone} with this filter is listed twice (it would count "
                                    f"twice: give one entry the sum)")
            seen.add((entry.zone, entry.site.codes))
            if entry.symbol in symbols:
                raise ld.error(key, f"{text!r}: the symbol {entry.symbol} is also {symbols[entry.symbol]!r} "
                                    f"(name each entry's symbol)")
            symbols[entry.symbol] = text
        if name == "urilists":
            for text in ld.values["dnslists"]["zones"]:
                other = parse_listing(text, "dnslists").symbol
                if other in symbols:
                    raise ld.error(key, f"{symbols[other]!r}: the symbol {other} is also dnslists' "
                                        f"{text!r} (a symbol has one score)")
        fixed = {s for c in ld.spec.checks if not callable(c.symbols) for s in c.symbols}
        for symbol, text in symbols.items():
            if symbol in fixed:
                raise ld.error(key, f"{text!r}: {symbol} is a symbol of another check")
    return finish


# -- what the checks find -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ListsResult:
    """What a check found (the Verdict's ``result``): the symbols of its hits, their total
    as scored (``[actions] scores`` over the entries' scores), whether the client is
    allowlisted (dnslists), the zones without a usable answer (counted as not listing)
    and how many names were looked up."""
    check: str
    score: float = 0.0
    hits: tuple[str, ...] = ()
    allowlisted: bool = False
    failed: tuple[str, ...] = ()
    looked_up: int = 0

    @property
    def log(self) -> str:
        text = f"{self.check}={' '.join(self.hits) or 'none'}"
        if self.allowlisted:
            text += " (allowlisted)"
        if self.failed:
            text += f" (no answer: {' '.join(self.failed)})"
        return text


class Lists:
    """What both checks share: the entries, the tier's resolver, and the lookup of a set of
    subjects (an address, a domain) in every zone at once."""

    def __init__(self, own, ctx) -> None:
        self.own = own
        self.listings = listings(own)
        self.zones = tuple(dict.fromkeys(e.zone for e in self.listings))
        self.resolver = resolver_for(ctx)
        self.reactor = ctx.reactor
        self.reported = ctx.kept("dnslists:reported", dict)
        actions = ctx.settings.sections.get("actions")
        overrides = dict(getattr(actions, "scores", None) or {})
        self.scores = {e.symbol: overrides.get(e.symbol, e.score) for e in self.listings}

    def look_up(self, subjects: dict[str, object]):
        """Every subject (text -> an IP address or a domain) in every zone: a Deferred of
        ({(subject, zone): addresses}, {zone: problem}); never an errback."""
        names = {}
        for subject, what in subjects.items():
            for zone in self.zones:
                name = query_name(what, zone) if not isinstance(what, str) else f"{what}.{zone}"
                names[(subject, zone)] = name.lower()
        d = self.resolver.prefetch((name, "A") for name in names.values())
        return d.addCallback(self._classified, names)

    def _classified(self, answers, names):
        found, problems = {}, {}
        for (subject, zone), name in names.items():
            answer = answers[(name, "A")]
            if isinstance(answer, DNSTempError):
                problems.setdefault(zone, str(answer))
                continue
            if answer.status in (NXDOMAIN, NODATA):
                continue
            addresses = tuple(a for a in answer.records if isinstance(a, str))
            problem = listing_problem(addresses)
            if problem is not None:
                problems.setdefault(zone, f"{name}: {problem}")
                continue
            found[(subject, zone)] = addresses
        for zone, problem in problems.items():
            if report_due(self.reported, zone, self.reactor.seconds()):
                log.warn("{check}: zone {zone}: {problem}; counted as not listing (reported once a minute at "
                         "most)", check=self.own.kind, zone=zone, problem=problem)
        return found, problems

    def hits(self, found, subjects) -> list[tuple[Listing, list[str], tuple[str, ...]]]:
        """Each entry that matched: (entry, the subjects it lists, the answers)."""
        out = []
        for entry in self.listings:
            listed, codes = [], ()
            for subject in subjects:
                addresses = found.get((subject, entry.zone))
                if addresses and entry.site.matches(addresses):
                    listed.append(subject)
                    codes = codes or addresses
            if listed:
                out.append((entry, listed, codes))
        return out


class ClientLists(Lists):
    """The check ``dnslists``."""

    def __init__(self, own: DnsListsSettings, ctx) -> None:
        super().__init__(own, ctx)
        self.exempt = NetworkList(list(ctx.settings.relay.mynetworks))

    def __call__(self, request: Request):
        if request.login:
            return CONTINUE
        try:
            ip = client_ip(request.client_address)
        except ValueError:
            return CONTINUE
        subject = str(ip)
        if subject in self.exempt:
            return CONTINUE
        d = self.look_up({subject: ip})
        return d.addCallback(self._verdict, subject)

    def _verdict(self, looked_up, subject: str):
        found, problems = looked_up
        hits = self.hits(found, [subject])
        symbols = tuple(Symbol(e.symbol, f"{subject} in {e.zone}: {','.join(codes)}") for e, _, codes in hits)
        score = round(sum(self.scores[e.symbol] for e, _, _ in hits), 2)
        allowlisted = score < 0 and score <= self.own.allowlist_threshold
        result = ListsResult("dnslists", score, tuple(s.name for s in symbols), allowlisted,
                             tuple(problems), len(self.zones))
        return note(result, symbols=symbols)


# A URL's host after its scheme's "://" (credentials skipped), and a bare www. name; both
# matched at the places a plain search of the lower-cased text finds, not tried at every
# position (a regular expression with a look-behind at each of 50 KB costs milliseconds).
_AFTER_SCHEME = re.compile(r"(?:[^\s/?#@<>\"'\\]*@)?(\[[0-9a-f:.]+\]|[^\s/?#:<>\"'\\()\[\]|,;]+)")
_WWW = re.compile(r"www\.[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_SCHEMES = ("https", "http", "ftp")
_NOT_BEFORE_WWW = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.@/-")
_HOST = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})+\Z")
_DOTTED = re.compile(r"[0-9.]+\Z")
_TEXT_TYPES = ("text/plain", "text/html")
MAX_HOSTS = 10_000          # distinct hosts of one message examined, at most


def _host(raw: str):
    """The URL's host (lower case) as an IP address or a name (None: neither)."""
    host = raw.strip("[]").rstrip(".")
    if raw.startswith("[") or _DOTTED.match(host):
        try:
            return client_ip(host)
        except ValueError:
            return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(host) > 253 or not _HOST.match(host) or host.rpartition(".")[2].isdigit():
        return None
    return host


def url_hosts(text: str):
    """The raw hosts of the URLs (http, https, ftp) and bare www. names in `text`, lower case,
    in the order they occur."""
    low = text.lower()
    found = []
    i = low.find("://")
    while i >= 0:
        if any(low.startswith(scheme, i - len(scheme)) for scheme in _SCHEMES):
            m = _AFTER_SCHEME.match(low, i + 3)
            if m:
                found.append((i, m.group(1)))
        i = low.find("://", i + 3)
    i = low.find("www.")
    while i >= 0:
        if i == 0 or low[i - 1] not in _NOT_BEFORE_WWW:
            m = _WWW.match(low, i)
            if m:
                found.append((i, m.group(0)))
        i = low.find("www.", i + 4)
    found.sort()
    return [host for _, host in found]


_SIMPLE_TYPE = re.compile(rb"^content-type:(?![ \t]*text/plain\b)", re.IGNORECASE | re.MULTILINE)
_ENCODED = re.compile(rb"^content-transfer-encoding:(?![ \t]*(?:7bit|8bit)\b)", re.IGNORECASE | re.MULTILINE)
_FOLDED = re.compile(rb"\r?\n[ \t]")
_CHARSET = re.compile(rb"^content-type:[^\r\n]*charset=\"?([a-z0-9_.:-]+)", re.IGNORECASE | re.MULTILINE)


def _plain(message: bytes, scan_size: int) -> str | None:
    """The body of a single-part text/plain message with no transfer encoding, decoded (the
    common case, read without a MIME parse); None for anything else."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = _FOLDED.sub(b" ", message[:end + 2])          # unfolded (a DKIM-Signature is folded)
    if _SIMPLE_TYPE.search(head) or _ENCODED.search(head):
        return None                       # another type, or an encoding: parse it
    m = _CHARSET.search(head)
    charset = m.group(1).decode() if m else "utf-8"
    body = message[end + 4:end + 4 + scan_size]
    try:
        return body.decode(charset, "replace")
    except LookupError:
        return body.decode("utf-8", "replace")


def texts(message: bytes, scan_size: int):
    """The decoded text of the message's text/plain and text/html parts, in order, at most
    `scan_size` octets of it, from its first 4 x `scan_size` octets."""
    plain = _plain(message, scan_size)
    if plain is not None:
        yield plain
        return
    parsed = email.message_from_bytes(message[:4 * scan_size], policy=email.policy.compat32)
    left = scan_size
    for part in parsed.walk():
        if left <= 0:
            return
        if part.get_content_type() not in _TEXT_TYPES:
            continue
        payload = part.get_payload(decode=True)
        if not payload:
            continue
        payload = payload[:left]
        left -= len(payload)
        charset = part.get_content_charset() or "utf-8"
        try:
            yield payload.decode(charset, "replace")
        except LookupError:
            yield payload.decode("utf-8", "replace")


def url_subjects(message: bytes, scan_size: int, max_domains: int, skip=frozenset()) -> dict[str, object]:
    """The registered domains (and IP addresses) of the message's URLs, in the order they
    first occur, at most `max_domains`, from its first MAX_HOSTS distinct hosts: {text:
    domain or address}."""
    out: dict[str, object] = {}
    seen: set[str] = set()
    for text in texts(message, scan_size):
        for raw in url_hosts(text):
            if raw in seen or len(raw) > 255:
                continue
            if len(seen) >= MAX_HOSTS:
                return out
            seen.add(raw)
            host = _host(raw)
            if host is None:
                continue
            if isinstance(host, str):
                host = organizational_domain(host)
                if host in skip or "." not in host:
                    continue
            key = str(host)
            if key not in out:
                out[key] = host
                if len(out) >= max_domains:
                    return out
    return out


class UriLists(Lists):
    """The check ``urilists``."""

    def __init__(self, own: UriListsSettings, ctx) -> None:
        super().__init__(own, ctx)
        self.pool = checks_pool(ctx)
        self.skip = frozenset(own.skip_domains)

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note()
        d = message.read_body()
        d.addCallback(lambda whole: compute(self.pool, len(whole), url_subjects, whole, self.own.scan_size,
                                            self.own.max_domains, self.skip))
        return d.addCallback(self._subjects)

    def _subjects(self, subjects):
        if not subjects:
            return note(ListsResult("urilists"))
        return self.look_up(subjects).addCallback(self._verdict, list(subjects))

    def _verdict(self, looked_up, subjects):
        found, problems = looked_up
        hits = self.hits(found, subjects)
        symbols = tuple(Symbol(e.symbol, ",".join(listed[:3]) + (",..." if len(listed) > 3 else ""))
                        for e, listed, _ in hits)
        score = round(sum(self.scores[e.symbol] for e, _, _ in hits), 2)
        for e, listed, codes in hits:
            log.info("urilists: {domains} listed by {zone} ({codes}): {symbol}", domains=", ".join(listed),
                     zone=e.zone, codes=",".join(codes), symbol=e.symbol)
        result = ListsResult("urilists", score, tuple(s.name for s in symbols), False, tuple(problems),
                             len(subjects))
        return note(result, symbols=symbols)


# -- registration ---------------------------------------------------------------------

def _active(own, settings=None) -> bool:
    return bool(own.zones)


def _symbols(own, settings) -> dict[str, tuple[float, str]]:
    what = "the client's address" if own.kind == "dnslists" else "a domain of the message's URLs"
    return {e.symbol: (e.score, f"{what} is listed by {e.site.text}") for e in listings(own)}


def _summary(own, settings) -> str:
    zones = ", ".join(f"{e.site.text} {e.symbol}" for e in listings(own))
    if own.kind == "dnslists":
        extra = f"allowlist_threshold {own.allowlist_threshold:g}"
    else:
        extra = f"max_domains {own.max_domains}, scan_size {own.scan_size}" + \
            (f", skip_domains {', '.join(own.skip_domains)}" if own.skip_domains else "")
    return f"zones {zones}; {extra}; lookups within {settings.dns.timeout:g}s (the resolver's [dns] timeout)"


def _check_type(name: str, phase: str, settings_class, check_class, seconds: float, doc: str) -> CheckType:
    """One of the two checks: off until its zones are set; its timeout the resolver's and
    `seconds` more (a lookup that times out fails open before the check's own timeout would
    tempfail)."""
    return CheckType(name, phases=(phase,), build=lambda own, ctx: check_class(own, ctx) if own.zones else None,
                     section=Section.of(name, settings_class, finish=_finish(name)), active=_active,
                     timeout=lambda s: s.dns.timeout + seconds, summary=_summary, symbols=_symbols,
                     doc=doc + f" (off until [{name}] zones is set)")


DNSLISTS = _check_type("dnslists", "mail", DnsListsSettings, ClientLists, 2,
                       "DNS lists with scores for the client's address (RBL, DNSWL): each hit a symbol")
URILISTS = _check_type("urilists", "end_of_data", UriListsSettings, UriLists, 10,
                       "DNS lists with scores for the domains of the message's URLs (URIBL, SURBL): each hit a "
                       "symbol")
