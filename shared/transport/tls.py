"""The listeners' TLS: the server's certificates, chosen by SNI, and the client's.

A listener's TLS is a :class:`ServerTLS`, made by :func:`tls_context` from its
``tls_*`` keys (the ``[server]`` ones, or the listener's own) when a
configuration is read: at start-up and, on reload, in the pool, off the reactor
(:class:`shared.daemon.Loaded`).  Every certificate and key is read and checked
then; a pair that does not load refuses the whole configuration, naming its key.

- The server's certificates.  ``tls_cert`` and ``tls_key`` are the default pair;
  each ``tls_sni`` entry ``NAME CERT KEY`` adds one for a server name a client
  asks for in its handshake (SNI, RFC 6066 3): an exact name, or ``*.DOMAIN`` for
  any name one label below DOMAIN, as a wildcard certificate covers.  An exact
  name wins over a wildcard; a client that names no server, or one no entry has,
  gets the default pair.  Each pair is an OpenSSL context of its own with the
  same protocol floor, ciphers and client-certificate settings, and the
  handshake is moved to it (``Connection.set_context``) from the servername
  callback, as soon as the client's hello has named it.
- The client's certificate.  With ``tls_client_certificates = "ask"`` the server
  asks every client for one (as Postfix's ``smtpd_tls_ask_ccert``) and never
  requires it: a client with none, or with one that does not verify, gets TLS
  all the same.  With ``tls_client_ca`` the request names those CAs and a
  certificate counts only if it chains to one of them; without, any certificate
  counts, and what it is worth is judged by its SHA-256 fingerprint (the edge's
  ``client_certificate`` relay permit, :mod:`shared.checks.relay`).
  :func:`client_certificate` says what a connection's client presented.

A session keeps the TLS connection, and so the context, of its handshake; a
reload's new ServerTLS serves the handshakes after it.  Sessions are never
resumed (Twisted's defaults: no session cache, no tickets), so every handshake
is a new TLS session -- what the ``rate_limits`` check's ``tls_rate`` counts.

TRUST: the client's certificate is untrusted input until verified; only its
fingerprint is logged or given to checks (a subject name is the client's own
text).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from shared.config import ConfigError, Settings

# The keys that make a listener's TLS; a listener whose values all equal the [server]
# ones shares the server's context.
TLS_KEYS = ("tls_cert", "tls_key", "tls_min_version", "tls_ciphers", "tls_sni", "tls_client_certificates",
            "tls_client_ca")

_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1_0, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
             "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# connection -> whether its client's certificate chained to tls_client_ca; no entry
# when the listener has no CA.  Written by the verify callback during the handshake.
_VERIFIED: "weakref.WeakKeyDictionary[SSL.Connection, bool]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ClientCertificate:
    """The certificate a client presented: its SHA-256 fingerprint, written as
    ``openssl x509 -noout -fingerprint -sha256`` writes it ("AB:CD:..."), and whether
    it verified against the listener's ``tls_client_ca`` (None: the listener has none)."""
    fingerprint: str
    verified: bool | None

    @property
    def counts(self) -> bool:
        """Whether the checks see it (``Request.client_certificate``): it verified, or
        there was no CA to verify it against.  One that failed is logged and ignored."""
        return self.verified is not False

    def __str__(self) -> str:
        status = {None: "unverified", True: "verified", False: "does not verify against tls_client_ca: "
                                                                "ignored"}[self.verified]
        return f"SHA256 {self.fingerprint} ({status})"


def client_certificate(connection: SSL.Connection) -> ClientCertificate | None:
    """What the client of `connection` (after its handshake) presented, or None."""
    cert = connection.get_peer_certificate()
    if cert is None:
        return None
    digest = cert.to_cryptography().fingerprint(hashes.SHA256())
    return ClientCertificate(":".join(f"{b:02X}" for b in digest), _VERIFIED.get(connection))


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """One listener's TLS (see the module docstring): Twisted's connection creator, and
    context factory, for STARTTLS and implicit-TLS listeners alike."""

    def __init__(self, default: SSL.Context, by_name: dict[str, SSL.Context]) -> None:
        self.default = default
        self.by_name = by_name                  # "mail.example.org" or "*.example.org" -> context
        if by_name:
            default.set_tlsext_servername_callback(self._server_name)

    def getContext(self) -> SSL.Context:
        return self.default

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self.default, None)

    def context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """The context of the ``tls_sni`` entry for the name a client sent: the exact
        name's, else the wildcard's one label up; None: the default pair's (also for a
        name that is not ASCII: RFC 6066 3 sends A-labels only)."""
        try:
            name = (server_name or b"").decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            return None
        if not name:
            return None
        found = self.by_name.get(name)
        if found is None and "." in name:
            found = self.by_name.get("*." + name.partition(".")[2])
        return found

    def _server_name(self, connection: SSL.Connection) -> None:
        found = self.context_for(connection.get_servername())
        if found is not None:
            connection.set_context(found)


class _Unloadable(Exception):
    """A file that does not load: which one is to blame ("cert", "key", "ca"), and why."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(reason)
        self.which, self.reason = which, reason


def _read(path: str, which: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _Unloadable(which, f"cannot read {path}: {e.strerror}") from None


def load_pair(cert_path: str, key_path: str, cert_label: str) -> tuple[ssl.PrivateCertificate, list]:
    """The certificate of PEM file `cert_path` with its key, and the chain after it (the
    intermediates a client needs).  Raises _Unloadable naming the file to blame;
    `cert_label` names the certificate when the key does not go with it."""
    pem = {"cert": _read(cert_path, "cert"), "key": _read(key_path, "key")}
    for which, path, what, loader in (
            ("cert", cert_path, "certificate", ssl.Certificate.loadPEM),
            ("key", key_path, "private key", lambda b: ssl.KeyPair.load(b, crypto.FILETYPE_PEM))):
        try:
            loader(pem[which])
        except Exception as e:
            raise _Unloadable(which, f"no PEM {what} in {path}: {e}") from None
    try:
        cert = ssl.PrivateCertificate.loadPEM(pem["cert"] + b"\n" + pem["key"])
    except Exception as e:
        raise _Unloadable("key", f"{key_path} does not go with {cert_label} {cert_path}: {e}") from None
    return cert, [ssl.Certificate.loadPEM(b).original for b in pem_blocks(pem["cert"])[1:]]


def pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [b + end for b in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in b]


def tls_context(settings: Settings, s=None, prefix: str = "server") -> ServerTLS | None:
    """The TLS of the ``[server]`` keys (None when ``tls_cert`` is unset), or of a
    listener's own (`s`, its keys under `prefix`).

    Raises ConfigError naming the key: ``tls_cert`` or ``tls_key`` when a file cannot be
    read or holds no PEM certificate or key, ``tls_key`` when the key is not the
    certificate's, ``tls_sni`` (and the entry's name) for an entry's pair,
    ``tls_client_ca`` for a CA file without a certificate, ``tls_ciphers`` for a
    cipher list that selects nothing.
    """
    s = s if s is not None else settings.server
    if not s.tls_cert:
        return None

    def refused(key: str, reason: str) -> ConfigError:
        return ConfigError(settings.path, f"{prefix}.{key}", reason)
    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(s.tls_ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise refused("tls_ciphers", f"{s.tls_ciphers!r} selects no cipher this OpenSSL knows") from None
    cas = _client_cas(s, refused)
    try:
        default = load_pair(s.tls_cert, s.tls_key, f"{prefix}.tls_cert")
    except _Unloadable as e:
        raise refused(f"tls_{e.which}", e.reason) from None
    by_name = {}
    for entry in s.tls_sni:
        name, cert, key = entry.split()
        try:
            by_name[name] = _context(s, load_pair(cert, key, "certificate"), cas)
        except _Unloadable as e:
            raise refused("tls_sni", f"{name}: {e.reason}") from None
    return ServerTLS(_context(s, default, cas), by_name)


def _client_cas(s, refused) -> list | None:
    """The CA certificates of ``tls_client_ca`` (None: no file, or no certificate asked for)."""
    if s.tls_client_certificates != "ask" or not s.tls_client_ca:
        return None
    try:
        blocks = pem_blocks(_read(s.tls_client_ca, "ca"))
    except _Unloadable as e:
        raise refused("tls_client_ca", e.reason) from None
    try:
        cas = [ssl.Certificate.loadPEM(b).original for b in blocks]
    except Exception as e:
        raise refused("tls_client_ca", f"{s.tls_client_ca}: not a PEM certificate: {e}") from None
    if not cas:
        raise refused("tls_client_ca", f"no PEM certificate in {s.tls_client_ca}")
    return cas


def _context(s, pair: tuple[ssl.PrivateCertificate, list], cas: list | None) -> SSL.Context:
    """An OpenSSL context for one certificate pair, with the listener's protocol floor,
    ciphers and client-certificate settings (every context of a listener alike: a
    handshake moved to another by SNI keeps the first one's verify mode)."""
    cert, chain = pair
    version = _VERSIONS[s.tls_min_version]
    floor = {"raiseMinimumTo": version} if version > ssl.TLSVersion.TLSv1_2 else \
        {"insecurelyLowerMinimumTo": version}
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                     extraCertChain=chain,
                                     acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
                                         s.tls_ciphers), **floor)
    ctx = options.getContext()
    # No renegotiation (TLS 1.2): a client-initiated one costs the server a handshake each
    # time (a DoS lever) and mail has no use for it.
    ctx.set_options(SSL.OP_NO_RENEGOTIATION)
    if s.tls_client_certificates == "ask":
        for ca in cas or ():
            ctx.get_cert_store().add_cert(ca)
            ctx.add_client_ca(ca)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _verify_callback(cas is not None))
    return ctx


def _verify_callback(has_ca: bool):
    """OpenSSL's verify callback for a listener that asks for client certificates: it
    records whether the chain verified (with a CA) and never fails the handshake."""
    def verify(connection, certificate, error, depth, ok) -> bool:
        if has_ca:
            _VERIFIED[connection] = bool(ok) and _VERIFIED.get(connection, True)
        return True
    return verify


def tls_contexts(settings: Settings) -> dict[str, ServerTLS | None]:
    """Each listener's TLS (None: no certificate), the ``[server]`` one shared by every
    listener that does not set TLS keys of its own."""
    srv = settings.server
    shared = tls_context(settings)
    out: dict[str, Any] = {}
    for name, listener in settings.listeners.items():
        if all(getattr(listener, k) == getattr(srv, k) for k in TLS_KEYS):
            out[name] = shared
        else:
            out[name] = tls_context(settings, listener, f"listeners.{name}")
    return out
