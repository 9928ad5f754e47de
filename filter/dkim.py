"""DKIM verification (RFC 6376, RFC 8463): the check ``dkim``.

Every DKIM-Signature field is checked (at most ``max_signatures``, the topmost
first), each giving a result with its d= and s=:

- ``pass``: the signature verifies, with a key of at least ``min_key_bits`` (RSA;
  Ed25519 keys are always 256 bits);
- ``fail``: it does not (body hash mismatch, bad signature), or the key is too small;
- ``policy``: it verifies but its l= tag covers only part of the body, so what follows
  is not signed (RFC 6376 8.2) -- unless ``body_length = "accept"``; or it is
  rsa-sha1, which RFC 8301 retired ("MUST NOT be used for signing or verifying") --
  unless ``rsa_sha1 = "accept"`` (what older verifiers do);
- ``neutral``: the signature field is malformed or uses what is not supported;
- ``permerror``: its key record is missing, revoked or malformed;
- ``temperror``: its key could not be looked up (timeout, SERVFAIL).

The keys are looked up first, all at once, on the reactor through the tier's
resolver (and its cache); dkimpy then checks the signatures given those answers, so
it never touches DNS itself: on the reactor for a message up to 64 KB, in a thread
of the checks' pool for a larger one (:func:`filter.mailauth.compute`).  Symbols:
DKIM_VALID per domain with a passing signature, DKIM_INVALID for a failing one,
DKIM_TEMPERROR, DKIM_PERMERROR, DKIM_NONE when unsigned.  A temporary error is
scored (``temperror = "score"``) or answered 451 4.7.1 (``"tempfail"``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy

from shared.checks.core import Request, Symbol, Verdict, note, tempfail
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, bounded, choice, setting
from shared.resolver import NXDOMAIN, OK, Answer, DNSTempError
from filter.mailauth import ContentCheck, MethodResult, compute, tags

# Speed, inside the layer that can prove it.  dkimpy's relaxed canonicalization rewrites every run of white space, single spaces
# included: on a 50 KB body that is most of the cost of a verification.  These do the same
# (a run of spaces and tabs becomes one space; white space before CRLF goes) touching only
# what changes, and skip the trailing-space pass when no line ends in white space.  Tested
# equal to the library's on generated input (tests/filter/test_dkim_canon.py).
_RUNS = re.compile(rb"\t[\t ]*| [\t ]+")


def compress_whitespace(content: bytes) -> bytes:
    return _RUNS.sub(b" ", content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    """White space before each CRLF removed (what follows the last CRLF is left as it is).
    Line by line with rstrip: a regular expression tried at every space of a 50 KB body
    costs ten times as much."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    lines = content.split(b"\r\n")
    last = lines.pop()
    lines = [line.rstrip(b" \t") for line in lines]
    lines.append(last)
    return b"\r\n".join(lines)


# Its RSA code turns integers into bytes one byte at a time in Python; int's own methods do
# the same (big-endian; to a given length, the low bytes, as the library's loop keeps them).
def int2str(n: int, length: int = -1) -> bytes:
    if length < 0:
        return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return (n & ((1 << (8 * length)) - 1)).to_bytes(length, "big")


def str2int(s: bytes) -> int:
    return int.from_bytes(bytes(s), "big")


# Its RSA itself is Python integers: a verification costs a quarter of a millisecond, a
# signature with a 2048-bit key several milliseconds.  The same PKCS #1 v1.5 operations by
# OpenSSL (the cryptography package), on keys made once per modulus:
_PUBLIC: dict[tuple[int, int], object] = {}
_PRIVATE: dict[int, object] = {}
_HASHES = {"sha256": "SHA256", "sha1": "SHA1"}


def _algorithm(hash_obj):
    return utils.Prehashed(getattr(hashes, _HASHES[hash_obj.name.lower()])())


def rsa_verify(hash_obj, signature: bytes, public_key: dict) -> bool:
    ident = (public_key["modulus"], public_key["publicExponent"])
    key = _PUBLIC.get(ident)
    if key is None:
        try:
            key = rsa.RSAPublicNumbers(ident[1], ident[0]).public_key()
        except ValueError as e:           # not a usable RSA key: what the library says of one
            raise dkim.crypto.DigestTooLargeError(str(e)) from None
        if len(_PUBLIC) >= 1000:
            _PUBLIC.clear()
        _PUBLIC[ident] = key
    try:
        key.verify(bytes(signature), hash_obj.digest(), padding.PKCS1v15(), _algorithm(hash_obj))
    except (InvalidSignature, ValueError):
        return False
    return True


def rsa_sign(hash_obj, private_key: dict) -> bytes:
    key = _PRIVATE.get(private_key["modulus"])
    if key is None:
        p = private_key
        key = rsa.RSAPrivateNumbers(p["prime1"], p["prime2"], p["privateExponent"], p["exponent1"],
                                    p["exponent2"], p["coefficient"],
                                    rsa.RSAPublicNumbers(p["publicExponent"], p["modulus"])).private_key()
        if len(_PRIVATE) >= 1000:
            _PRIVATE.clear()
        _PRIVATE[private_key["modulus"]] = key
    return key.sign(hash_obj.digest(), padding.PKCS1v15(), _algorithm(hash_obj))


# And it splits the whole message into lines, body included, to find where the header
# section ends and to join the body again with CRLF.  This splits only the header section
# (the library's own code parses it) and leaves a body without bare LFs as it is.
_EMPTY_LINE = re.compile(rb"(?:\A|\n)(\r?\n)")
_BARE_LF = re.compile(rb"\r?\n")


def rfc822_parse(message: bytes):
    m = _EMPTY_LINE.search(message)
    if m is None:
        return LIBRARY["rfc822_parse"](message)
    headers, _ = LIBRARY["rfc822_parse"](message[:m.end(1)])
    body = message[m.end(1):]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = _BARE_LF.sub(b"\r\n", body)
    return headers, body


# And it parses the key record (ASN.1, in Python) at every verification: parsed keys are kept
# by their record's text (a changed record is a new text).
_KEYS: dict[bytes, tuple] = {}


def load_pk_from_dns(name, dnsfunc=None, timeout=5):
    record = dnsfunc(name, timeout=timeout)
    if record:
        parsed = _KEYS.get(record)
        if parsed is not None:
            return parsed
    parsed = dkimpy.evaluate_pk(name, record)
    if record:
        if len(_KEYS) >= 1000:
            _KEYS.clear()
        _KEYS[record] = parsed
    return parsed


import dkim.crypto  # noqa: E402

LIBRARY = {"compress_whitespace": dkimpy.canonicalization.compress_whitespace,
           "strip_trailing_whitespace": dkimpy.canonicalization.strip_trailing_whitespace,
           "int2str": dkim.crypto.int2str, "str2int": dkim.crypto.str2int,
           "rsa_verify": dkimpy.RSASSA_PKCS1_v1_5_verify, "rsa_sign": dkimpy.RSASSA_PKCS1_v1_5_sign,
           "load_pk_from_dns": dkimpy.load_pk_from_dns, "rfc822_parse": dkimpy.rfc822_parse}
dkimpy.canonicalization.compress_whitespace = compress_whitespace
dkimpy.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
dkim.crypto.int2str = int2str
dkim.crypto.str2int = str2int
dkimpy.RSASSA_PKCS1_v1_5_verify = rsa_verify
dkimpy.RSASSA_PKCS1_v1_5_sign = rsa_sign
dkimpy.load_pk_from_dns = load_pk_from_dns
dkimpy.rfc822_parse = rfc822_parse

_quiet = logging.getLogger("smarthost.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,253})\Z")


@dataclass(frozen=True)
class DkimSettings:
    """DKIM verification of every signature at end of data (the check `dkim`)"""
    min_key_bits: int = setting(1024, "RSA keys smaller than this fail (RFC 8301 says 1024)",
                                bounded(512, 8192))
    max_signatures: int = setting(10, "signatures checked per message, the topmost first", bounded(1, 50))
    body_length: str = setting("refuse", "a signature whose l= leaves part of the body unsigned: refuse "
                                         "(result policy, not valid) or accept", choice("refuse", "accept"))
    rsa_sha1: str = setting("refuse", "an rsa-sha1 signature: refuse (result policy: RFC 8301 retired it) or "
                                      "accept (verify it, as older verifiers do)", choice("refuse", "accept"))
    temperror: str = setting("score", "a key lookup failure: score (DKIM_TEMPERROR) or tempfail (451 4.7.1)",
                             choice("score", "tempfail"))
    timeout: float = setting(10.0, "seconds for the key lookups and the checks together", SECONDS)


@dataclass(frozen=True, slots=True)
class Signature:
    domain: str
    selector: str
    algorithm: str
    result: str             # pass | fail | policy | neutral | permerror | temperror
    reason: str = ""
    b: str = ""             # the first characters of b=, to tell signatures apart (RFC 6008)

    @property
    def method(self) -> MethodResult:
        props = (("header.d", self.domain), ("header.s", self.selector), ("header.a", self.algorithm),
                 ("header.b", self.b))
        return MethodResult("dkim", self.result, self.reason, tuple(p for p in props if p[1]))


@dataclass(frozen=True, slots=True)
class DkimResult:
    signatures: tuple[Signature, ...]

    @property
    def log(self) -> str:
        if not self.signatures:
            return "dkim=none"
        return "dkim=" + ",".join(f"{s.result}:{s.domain or '?'}" for s in self.signatures)

    @property
    def methods(self) -> tuple[MethodResult, ...]:
        if not self.signatures:
            return (MethodResult("dkim", "none"),)
        return tuple(s.method for s in self.signatures)

    def passed_domains(self) -> list[str]:
        return [s.domain for s in self.signatures if s.result == "pass"]

    @property
    def temperror(self) -> bool:
        return any(s.result == "temperror" for s in self.signatures)


def _signature_tags(value: str) -> dict[str, str] | None:
    t = tags(value.replace("\r", "").replace("\n", ""))
    if t is None:
        return None
    return {k: re.sub(r"\s+", "", v) if k in ("b", "bh", "h") else v.strip() for k, v in t.items()}


def key_name(t: dict[str, str]) -> str | None:
    d, s = t.get("d", "").lower().rstrip("."), t.get("s", "")
    if not d or not s or not _SELECTOR.match(s) or "." not in d:
        return None
    return f"{s}._domainkey.{d}"


class _KeyUnavailable(Exception):
    pass


def _dnsfunc(fetched: dict[tuple[str, str], Answer | Exception]):
    """dkimpy's key lookup, answered from what was fetched before (Resolver.prefetch's TXT answers)."""
    keys = {name: answer for (name, _), answer in fetched.items()}

    def lookup(name, timeout=5):
        name = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower().rstrip(".")
        answer = keys.get(name)
        if isinstance(answer, DNSTempError) or answer is None:
            raise _KeyUnavailable(str(answer) if answer else f"{name} was not looked up")
        if answer.status != OK:
            return None
        texts = answer.texts()
        return texts[0] if len(texts) == 1 else (b"" if texts else None)
    return lookup


def verify_all(message: bytes, parsed: list[tuple[dict | None, int]], keys: dict, own: DkimSettings):
    """In a pool thread: one Signature per signature field."""
    checker = dkimpy.DKIM(message, logger=_quiet, minkey=own.min_key_bits)
    dnsfunc = _dnsfunc(keys)
    keys = {name: answer for (name, _), answer in keys.items()}
    out = []
    body_len = None
    for t, idx in parsed:
        if t is None:
            out.append(Signature("", "", "", "neutral", "malformed signature field"))
            continue
        d, s, a = t.get("d", "").lower(), t.get("s", ""), t.get("a", "")
        b = t.get("b", "")[:8]
        name = key_name(t)
        if name is None:
            out.append(Signature(d, s, a, "neutral", "missing or invalid d= or s=", b))
            continue
        if a.lower() == "rsa-sha1" and own.rsa_sha1 == "refuse":
            out.append(Signature(d, s, a, "policy", "rsa-sha1 is historic (RFC 8301)", b))
            continue
        answer = keys.get(name)
        if isinstance(answer, DNSTempError):
            out.append(Signature(d, s, a, "temperror", "key lookup failed", b))
            continue
        if answer is not None and answer.status in (NXDOMAIN,) or (answer is not None and not answer.texts()):
            out.append(Signature(d, s, a, "permerror", "no key for signature", b))
            continue
        try:
            ok = checker.verify(idx=idx, dnsfunc=dnsfunc)
        except _KeyUnavailable:
            out.append(Signature(d, s, a, "temperror", "key lookup failed", b))
            continue
        except dkimpy.KeyFormatError as e:
            small = "too small" in str(e)
            out.append(Signature(d, s, a, "fail" if small else "permerror",
                                 (f"key of {checker.keysize} bits, under {own.min_key_bits}" if small else str(e))[:120],
                                 b))
            continue
        except dkimpy.ValidationError as e:       # body hash mismatch, and the like
            out.append(Signature(d, s, a, "fail", str(e)[:120], b))
            continue
        except dkimpy.DKIMException as e:
            out.append(Signature(d, s, a, "neutral", str(e)[:120], b))
            continue
        except Exception as e:      # a library error on hostile input: a result, never a crash
            out.append(Signature(d, s, a, "neutral", f"{type(e).__name__}: {e}"[:120], b))
            continue
        if not ok:
            reason = "signature did not verify"
            if checker.keysize and checker.ktag == b"rsa" and checker.keysize < own.min_key_bits:
                reason = f"key of {checker.keysize} bits, under {own.min_key_bits}"
            out.append(Signature(d, s, a, "fail", reason, b))
            continue
        if "l" in t and own.body_length == "refuse":
            if body_len is None:
                body_len = _canonical_body_length(checker, t)
            try:
                signed = int(t["l"])
            except ValueError:
                signed = -1
            if signed != body_len:
                out.append(Signature(d, s, a, "policy", f"l={t['l']} signs {signed} of {body_len} body octets", b))
                continue
        out.append(Signature(d, s, a, "pass", "", b))
    return DkimResult(tuple(out))


def _canonical_body_length(checker, t: dict) -> int:
    policy = CanonicalizationPolicy.from_c_value(t.get("c", "simple/simple").encode())
    return len(policy.canonicalize_body(checker.body))


class DkimCheck(ContentCheck):
    name = "dkim"

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note(DkimResult(()))
        fields = message.get_all("DKIM-Signature")[:self.own.max_signatures]
        if not fields:
            return note(DkimResult(()), symbols=(Symbol("DKIM_NONE"),))
        parsed = [(_signature_tags(v), i) for i, v in enumerate(fields)]
        names = [(n, "TXT") for t, _ in parsed if t is not None and (n := key_name(t))]
        keys = self.resolver.prefetch(names)
        body = message.read_body()
        d = keys.addCallback(lambda k: body.addCallback(lambda m: (m, k)))
        d.addCallback(lambda mk: compute(self.pool, message.size, verify_all, mk[0], parsed, mk[1], self.own))
        return d.addCallback(self._verdict)

    def _verdict(self, result: DkimResult) -> Verdict:
        symbols = []
        for s in result.signatures:
            name = {"pass": "DKIM_VALID", "fail": "DKIM_INVALID", "temperror": "DKIM_TEMPERROR",
                    "permerror": "DKIM_PERMERROR"}.get(s.result, "DKIM_NEUTRAL")
            sym = Symbol(name, s.domain)
            if sym not in symbols:
                symbols.append(sym)
        if result.temperror and not result.passed_domains() and self.own.temperror == "tempfail":
            v = tempfail(451, "4.7.1", "DKIM key lookup failed: try again later")
            return Verdict(v.action, v.reply, result=result, symbols=tuple(symbols))
        return note(result, symbols=tuple(symbols))


def _build(own: DkimSettings, ctx):
    return DkimCheck(own, ctx)


DKIM = CheckType(
    "dkim", phases=("end_of_data",), build=_build, section=Section.of("dkim", DkimSettings),
    timeout=lambda s: s.dkim.timeout,
    doc="verify every DKIM signature (dkimpy; RSA and Ed25519), keys through the tier's resolver",
    symbols={"DKIM_VALID": (-0.5, "a valid signature (per signing domain)"),
             "DKIM_INVALID": (1.0, "a signature that does not verify"),
             "DKIM_NEUTRAL": (0.0, "a malformed or unsupported signature, or one with a partial l="),
             "DKIM_TEMPERROR": (0.0, "its key could not be looked up"),
             "DKIM_PERMERROR": (0.0, "its key is missing or malformed"),
             "DKIM_NONE": (0.0, "no signature")})
