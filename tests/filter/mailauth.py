"""Test keys, zones and messages for the sender-authentication checks.

``keys()`` makes the test keys once per process (RSA 2048, RSA 512 for the
minimum-size check, Ed25519); ``zones(keys)`` the DNS data the real test DNS
server (:mod:`tests.dnsserver`) serves; ``message(...)`` builds a message and
``signed(...)`` signs it with dkimpy, independently of the code under test.
"""
from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class Key:
    private: bytes          # what dkimpy signs with
    record: str             # the TXT record


def _rsa(bits: int) -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


def _ed() -> Key:
    k = ed25519.Ed25519PrivateKey.generate()
    raw = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(base64.b64encode(raw), f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}")


@functools.lru_cache(maxsize=1)
def keys() -> dict[str, Key]:
    # "small" is small against a floor of 2048 bits (the library refuses to make keys under 1024).
    return {"rsa": _rsa(2048), "small": _rsa(1024), "ed": _ed(), "other": _rsa(1024)}


def _txt(text: str) -> list[str]:
    return [text[i:i + 250] for i in range(0, len(text), 250)]


def zones(k: dict[str, Key] | None = None) -> dict:
    k = k or keys()
    return {"test": [
        # sender.test: everything right, p=reject
        ("sender.test", "TXT", "v=spf1 ip4:127.0.0.0/8 ip6:::1 -all"),
        ("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject; sp=quarantine; adkim=r; aspf=r"),
        ("sel._domainkey.sender.test", "TXT", _txt(k["rsa"].record)),
        ("ed._domainkey.sender.test", "TXT", _txt(k["ed"].record)),
        ("small._domainkey.sender.test", "TXT", _txt(k["small"].record)),
        ("mx.sender.test", "A", "127.0.0.1"),
        ("mx.sender.test", "TXT", "v=spf1 a -all"),
        # forged.test: the client is not allowed, p=reject
        ("forged.test", "TXT", "v=spf1 ip4:198.51.100.0/24 -all"),
        ("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject"),
        # soft.test: softfail, p=none
        ("soft.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all"),
        ("_dmarc.soft.test", "TXT", "v=DMARC1; p=none"),
        ("neutral.test", "TXT", "v=spf1 ?all"),
        ("broken.test", "TXT", "v=spf1 ip4:192.0.2.1 bogus:x -all"),
        # quar.test: fail, p=quarantine
        ("quar.test", "TXT", "v=spf1 -all"),
        ("_dmarc.quar.test", "TXT", "v=DMARC1; p=quarantine"),
        # half.test: p=reject at pct=0: never applied as reject
        ("half.test", "TXT", "v=spf1 -all"),
        ("_dmarc.half.test", "TXT", "v=DMARC1; p=reject; pct=0"),
        # other.test signs for itself: aligned with nothing else
        ("other.test", "TXT", "v=spf1 -all"),
        ("sel._domainkey.other.test", "TXT", _txt(k["other"].record)),
        # strict.test: strict alignment; mail.strict.test signs and sends for it
        ("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s"),
        ("mail.strict.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
        ("sel._domainkey.mail.strict.test", "TXT", _txt(k["rsa"].record)),
        ("strict.test", "TXT", "v=spf1 -all"),
        # temp.test: its lookups fail in the server (SERVFAIL)
        ("temp.test", "SERVFAIL", None),
        ("_dmarc.temp.test", "SERVFAIL", None),
        ("_dmarc.tempdmarc.test", "SERVFAIL", None),
        ("tempdmarc.test", "TXT", "v=spf1 -all"),
        ("sel._domainkey.tempkey.test", "SERVFAIL", None),
        ("_dmarc.tempkey.test", "TXT", "v=DMARC1; p=reject"),
        ("tempkey.test", "TXT", "v=spf1 -all"),
    ]}


def message(sender: str = "alice@sender.test", *, subject: str = "Hello", body: str | None = None,
            extra: str = "", to: str = "bob@example.test") -> bytes:
    body = body if body is not None else "Hello Bob,\r\n\r\nthis is a test.\r\n" * 5
    return (f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\nMessage-ID: <t.{abs(hash(body)) % 10**8}@sender.test>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}").encode()


def signed(msg: bytes, domain: str = "sender.test", selector: str = "sel", key: str = "rsa", *,
           length: bool = False) -> bytes:
    k = keys()[key]
    algorithm = b"ed25519-sha256" if key == "ed" else b"rsa-sha256"
    sig = dkim.sign(msg, selector.encode(), domain.encode(), k.private, signature_algorithm=algorithm,
                    canonicalize=(b"relaxed", b"relaxed"), length=length,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"from"])
    return sig + msg


def attachment(data: bytes, name: str = "file.bin", *, nested: bool = False) -> bytes:
    """A message with `data` as a base64 attachment (inside a second multipart when `nested`)."""
    part = (b"--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n\r\n"
            + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--B--\r\n")
    inner = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee\r\n" + part
    if nested:
        inner = (b"Content-Type: multipart/mixed; boundary=O\r\n\r\n--O\r\nContent-Type: text/plain\r\n\r\nouter\r\n"
                 b"--O\r\n" + inner + b"--O--\r\n")
    head, _, body = message(body="").partition(b"Content-Type: text/plain\r\n\r\n")
    return head + inner.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + inner.split(b"\r\n\r\n", 1)[1]
