"""ARC sealing on the way out (RFC 8617): the check ``arc_seal``.

When ``[arc_seal] key`` is set ("DOMAIN SELECTOR PATH", an RSA key: ARC signs
rsa-sha256 only), every message the filter passes on gets an ARC set of ours, after
every other check: ARC-Authentication-Results (a copy of our Authentication-Results,
so the ``auth_results`` check must run), ARC-Message-Signature and ARC-Seal, the
chain validation (cv=) taken from the ``arc`` result we recorded.  A later hop that
trusts us can then use our SPF, DKIM and DMARC results even after a forwarder or a
list changed the message.  Sealing runs in the checks' pool (dkimpy); a failure to
seal is 451 4.3.0, never a message passed on half-sealed.
"""
from __future__ import annotations

from dataclasses import dataclass

import dkim as dkimpy

from shared.checks.core import Request, note
from shared.checks.registry import CheckType
from shared.config.schema import SECONDS, Section, setting
from shared.message import HeaderEdits
from filter.dkim import _quiet
from filter.dkimsign import _key_entry, load_key
from filter.mailauth import checks_pool, compute

ARC_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
               b"content-type")


def _rsa_key(value: str) -> str:
    return _key_entry(value) if value else value


@dataclass(frozen=True)
class ArcSealSettings:
    """ARC sealing of what the filter passes on, after every other check (the check `arc_seal`)"""
    key: str = setting("", "'DOMAIN SELECTOR PATH' of the RSA key to seal with (empty: no sealing)", _rsa_key)
    timeout: float = setting(10.0, "seconds sealing may take", SECONDS)


@dataclass(frozen=True, slots=True)
class Sealed:
    instance: int
    cv: str

    @property
    def log(self) -> str:
        return f"arc_sealed=i={self.instance} cv={self.cv}"


def seal(message: bytes, domain: str, selector: str, secret: bytes, srv_id: str) -> list[tuple[str, str]]:
    """In a pool thread: the ARC set's fields (name, value), in the order they go on top."""
    lines = dkimpy.arc_sign(message, selector.encode(), domain.encode(), secret, srv_id.encode(),
                            include_headers=[h for h in ARC_HEADERS], logger=_quiet)
    out = []
    for line in lines:
        name, _, value = line.decode("ascii").partition(":")
        out.append((name.strip(), value.strip().rstrip("\r\n")))
    return out


class ArcSealer:
    name = "arc_seal"

    def __init__(self, own: ArcSealSettings, srv_id: str, pool) -> None:
        self.domain, self.selector, path = own.key.split(None, 2)
        algorithm, self.secret = load_key(path)
        if algorithm != b"rsa-sha256":
            raise ValueError(f"{path}: ARC seals with RSA keys only")
        self.srv_id = srv_id
        self.pool = pool

    def __call__(self, request: Request):
        message = request.message
        if message is None or message.read_body is None:
            return note()
        edits = HeaderEdits()
        for verdict in request.results.values():
            edits = edits.then(verdict.edits)
        d = message.read_body()
        d.addCallback(lambda m: compute(self.pool, message.size, seal, edits.apply(m) if edits else m, self.domain,
                                        self.selector, self.secret, self.srv_id))

        def sealed(fields):
            if not fields:
                raise RuntimeError("no Authentication-Results of ours to seal: list auth_results before arc_seal")
            seal_value = next((v for n, v in fields if n.lower() == "arc-seal"), "")
            tags = dict(p.strip().split("=", 1) for p in seal_value.replace("\r\n", "").split(";") if "=" in p)
            return note(Sealed(int(tags.get("i", "0") or 0), tags.get("cv", "?")), add=tuple(fields))
        return d.addCallback(sealed)


def _build(own: ArcSealSettings, ctx):
    if not own.key:
        return None
    authserv = ctx.settings.auth_results.authserv_id or ctx.settings.server.hostname
    return ArcSealer(own, authserv, checks_pool(ctx))


def _preflight(own: ArcSealSettings, settings) -> None:
    from shared.config import ConfigError
    if not own.key:
        return
    path = own.key.split(None, 2)[2]
    try:
        algorithm, _ = load_key(path)
    except OSError as e:
        raise ConfigError(settings.path, "arc_seal.key", f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(settings.path, "arc_seal.key", f"{path}: {e}") from None
    if algorithm != b"rsa-sha256":
        raise ConfigError(settings.path, "arc_seal.key", f"{path}: ARC seals with RSA keys only (rsa-sha256)")


ARC_SEAL = CheckType(
    "arc_seal", phases=("end_of_data",), build=_build, section=Section.of("arc_seal", ArcSealSettings),
    timeout=lambda s: s.arc_seal.timeout, active=lambda own, s: bool(own.key), preflight=_preflight,
    after=("*",), doc="add our ARC set (RFC 8617) over our Authentication-Results (after every other check)",
    summary=lambda own, s: "sealing as " + " ".join(own.key.split()[:2]))
