"""Self-signed certificates for the demo and the tests (never for production)."""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable


def self_signed(directory: Path, hostname: str, ips: Iterable[str] = (), *,
                days: int = 365, issuer: tuple[Path, Path] | None = None, ca: bool = False) -> tuple[Path, Path]:
    """Write DIRECTORY/cert.pem and DIRECTORY/key.pem for `hostname` (and `ips`).

    `issuer` (a cert.pem and key.pem pair): signed by that CA instead of by itself;
    `ca`: a CA certificate, to issue others with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    signer_name, signer_key = name, key
    if issuer is not None:
        signer_name = x509.load_pem_x509_certificate(Path(issuer[0]).read_bytes()).subject
        signer_key = serialization.load_pem_private_key(Path(issuer[1]).read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(hostname)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(signer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.SubjectAlternativeName(alt), critical=False))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
