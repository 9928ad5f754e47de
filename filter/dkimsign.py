"""DKIM signing of our users' mail (RFC 6376, RFC 8463): the check ``dkim_sign``.

Mail from authenticated submission (the edge's XCLIENT LOGIN tells the filter)
whose From domain has a key in ``[dkim_sign] keys`` ("DOMAIN SELECTOR PATH") is
signed at end of data, after the other checks: the signature covers the message as
it will be sent, with the header edits of the checks before it.  ``rsa-sha256`` for
an RSA key, ``ed25519-sha256`` for an Ed25519 one; one domain may have one key of
each (both signatures are added).  ``headers`` lists the fields signed when
present; those in ``oversign`` are signed once more than they occur, so none can be
added later without breaking the signature (From always is).  Canonicalization
relaxed/relaxed.  Signing runs in the checks' pool (dkimpy); a failure to sign is
a 451 4.3.0, never mail sent unsigned without a word.

Keys: ``smarthost dkim keygen DOMAIN SELECTOR`` writes one (PEM, mode 0600) and
prints the DNS TXT record to publish (:func:`keygen`).
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from shared.checks.core import Request, note
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, setting
from shared.message import HeaderEdits
from filter.dkim import _quiet
from filter.mailauth import checks_pool, compute

DEFAULT_HEADERS = ("from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
                   "content-type", "content-transfer-encoding", "content-disposition", "in-reply-to",
                   "references", "list-id", "list-unsubscribe", "list-unsubscribe-post")
DEFAULT_OVERSIGN = ("from", "reply-to", "subject", "date", "to", "cc", "mime-version", "content-type")


def _key_entry(value: str) -> str:
    parts = value.split(None, 2)
    if len(parts) != 3:
        raise ValueError(f"{value!r} is not 'DOMAIN SELECTOR PATH' (the signing domain, the selector, "
                         f"the absolute path of the private key)")
    domain, selector, path = parts
    from shared.config.schema import domain as domain_rule, path as path_rule
    domain_rule(domain)
    path_rule(path)
    if not selector.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"{value!r}: {selector!r} is not a selector (letters, digits, '-', '_', '.')")
    return f"{domain.lower().rstrip('.')} {selector} {path}"


def _header_name(value: str) -> str:
    if not value or any(c in value for c in ": \t") or not value.isascii():
        raise ValueError(f"{value!r} is not a header field name")
    return value.lower()


@dataclass(frozen=True)
class DkimSignSettings:
    """DKIM signing of authenticated submission at end of data (the check `dkim_sign`)"""
    keys: tuple = setting((), "'DOMAIN SELECTOR PATH' per signing key (PEM, RSA or Ed25519; made by smarthost "
                              "dkim keygen): mail whose From domain is DOMAIN is signed", _key_entry)
    headers: tuple = setting(DEFAULT_HEADERS, "header fields signed when present", _header_name)
    oversign: tuple = setting(DEFAULT_OVERSIGN, "fields signed once more than they occur (none can be added "
                                                "later); from always is", _header_name)
    timeout: float = setting(10.0, "seconds signing may take", SECONDS)


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: bytes          # b"rsa-sha256" | b"ed25519-sha256"
    secret: bytes             # what dkimpy takes: PKCS#1 PEM, or the Ed25519 seed in base64


def load_key(path: str) -> tuple[bytes, bytes]:
    """(algorithm, secret for dkimpy) from a key file: PEM (PKCS#1 or PKCS#8, RSA or
    Ed25519), or an Ed25519 seed in base64 (as other DKIM tools write it)."""
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return b"rsa-sha256", key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption())
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            return b"ed25519-sha256", base64.b64encode(raw)
        raise ValueError("not an RSA or Ed25519 private key")
    raw = base64.b64decode(data.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError("neither PEM nor a base64 Ed25519 seed of 32 bytes")
    return b"ed25519-sha256", base64.b64encode(raw)


def load_keys(own: DkimSignSettings) -> dict[str, list[SigningKey]]:
    out: dict[str, list[SigningKey]] = {}
    for entry in own.keys:
        domain, selector, path = entry.split(None, 2)
        algorithm, secret = load_key(path)
        out.setdefault(domain, []).append(SigningKey(domain, selector, algorithm, secret))
    return out


@dataclass(frozen=True, slots=True)
class Signed:
    signatures: tuple[str, ...]       # "d=example.org s=sel a=rsa-sha256"

    @property
    def log(self) -> str:
        return "dkim_signed=" + ",".join(self.signatures)


def sign(message: bytes, keys: list[SigningKey], include: list[bytes]) -> list[tuple[str, str]]:
    """In a pool thread: the DKIM-Signature fields, (name, value), the first key's on top."""
    out = []
    for key in keys:
        line = dkimpy.sign(message, key.selector.encode(), key.domain.encode(), key.secret,
                           canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm,
                           include_headers=include, logger=_quiet)
        name, _, value = line.decode("ascii").partition(":")
        out.append((name.strip(), value.strip().rstrip("\r\n")))
    return out


class DkimSigner:
    name = "dkim_sign"

    def __init__(self, own: DkimSignSettings, keys: dict[str, list[SigningKey]], pool) -> None:
        self.own = own
        self.keys = keys
        self.pool = pool
        self.oversign = set(own.oversign) | {"from"}

    def __call__(self, request: Request):
        message = request.message
        if not request.login or message is None or message.read_body is None:
            return note()
        froms = message.get_all("From")
        domains = {a.rpartition("@")[2].lower().rstrip(".") for _, a in getaddresses(froms) if "@" in a}
        if len(froms) != 1 or len(domains) != 1:
            return note()
        keys = self.keys.get(domains.pop())
        if not keys:
            return note()
        present = [n.lower() for n, _ in message.headers]
        include = []
        for name in self.own.headers:
            count = present.count(name)
            include += [name.encode()] * (count + (1 if name in self.oversign else 0))
        for name in self.oversign - set(self.own.headers):
            include += [name.encode()] * (present.count(name) + 1)
        edits = HeaderEdits()
        for verdict in request.results.values():
            edits = edits.then(verdict.edits)
        d = message.read_body()
        d.addCallback(lambda m: compute(self.pool, message.size, sign, edits.apply(m) if edits else m, keys, include))

        def signed(fields):
            tags = tuple(f"d={k.domain} s={k.selector} a={k.algorithm.decode()}" for k in keys)
            return note(Signed(tags), add=tuple(fields))
        return d.addCallback(signed)


def _build(own: DkimSignSettings, ctx):
    if not own.keys:
        return None
    return DkimSigner(own, load_keys(own), checks_pool(ctx))


def _preflight(own: DkimSignSettings, settings) -> None:
    from shared.config import ConfigError
    for i, entry in enumerate(own.keys):
        path = entry.split(None, 2)[2]
        try:
            load_key(path)
        except OSError as e:
            raise ConfigError(settings.path, f"dkim_sign.keys[{i}]", f"{path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(settings.path, f"dkim_sign.keys[{i}]", f"{path}: {e}") from None


DKIM_SIGN = CheckType(
    "dkim_sign", phases=("end_of_data",), build=_build, section=Section.of("dkim_sign", DkimSignSettings),
    timeout=lambda s: s.dkim_sign.timeout, active=lambda own, s: bool(own.keys), preflight=_preflight,
    after=("symbols", "auth_results"),
    doc="DKIM-sign authenticated submission whose From domain has a key (after the other checks)",
    summary=lambda own, s: "keys: " + ", ".join(" ".join(k.split()[:2]) for k in own.keys))


# -- smarthost dkim keygen ------------------------------------------------------------

def txt_record(algorithm: str, public: bytes) -> str:
    return f"v=DKIM1; k={'rsa' if algorithm == 'rsa' else 'ed25519'}; p={base64.b64encode(public).decode()}"


def keygen(domain: str, selector: str, directory: str, algorithm: str = "rsa", bits: int = 2048) -> tuple[Path, str]:
    """Write DIRECTORY/DOMAIN.SELECTOR.key (PEM, 0600, never over an existing file) and give
    (its path, the zone-file line of the TXT record to publish)."""
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    path = Path(directory) / f"{domain}.{selector}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    text = txt_record(algorithm, public)
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)]
    record = f'{selector}._domainkey.{domain}. IN TXT ( ' + " ".join(f'"{c}"' for c in chunks) + " )"
    return path, record
