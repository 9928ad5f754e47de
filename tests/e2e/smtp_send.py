"""A small SMTP sender on smtplib: importable, and runnable inside a namespace.

The namespace tests run it in the client's namespace::

    python -m tests.e2e.smtp_send --host H --port P --from A --to B [--to C] --file MSG
                                  [--starttls [--ca CERT]]

and read one JSON object from standard output with the server's reply to each
command.  The message file's bytes are sent as they are (smtplib dot-stuffs).
"""
from __future__ import annotations

import argparse
import json
import smtplib
import ssl
import sys
from typing import Any

HELO = "client.e2e.test"


def tls_context(cafile: str | None, check_hostname: bool = True) -> ssl.SSLContext:
    """Verify the server against `cafile`; without one, encrypt without verifying."""
    if cafile is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_hostname
    return ctx


def send(host: str, port: int, sender: str, recipients: list[str], message: bytes, *,
         starttls: bool = False, cafile: str | None = None, check_hostname: bool = True,
         helo: str = HELO, timeout: float = 30) -> dict[str, Any]:
    """One transaction; every reply as [code, text].  Raises only on connection failure."""
    out: dict[str, Any] = {"tls": None, "mail": None, "rcpt": [], "data": None}
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout) as s:
        s.ehlo()
        out["starttls_offered"] = s.has_extn("starttls")
        if starttls:
            code, text = s.starttls(context=tls_context(cafile, check_hostname))
            out["starttls"] = [code, text.decode("utf-8", "replace")]
            out["tls"] = s.sock.version()
            s.ehlo()
            out["starttls_offered_after"] = s.has_extn("starttls")
        code, text = s.mail(sender)
        out["mail"] = [code, text.decode("utf-8", "replace")]
        if code == 250:
            for r in recipients:
                code, text = s.rcpt(r)
                out["rcpt"].append([code, text.decode("utf-8", "replace")])
            if any(c in (250, 251) for c, _ in out["rcpt"]):
                try:
                    code, text = s.data(message)
                except smtplib.SMTPDataError as e:
                    code, text = e.smtp_code, e.smtp_error
                out["data"] = [code, text.decode("utf-8", "replace")]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=25)
    p.add_argument("--from", dest="sender", required=True)
    p.add_argument("--to", dest="recipients", action="append", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--ca")
    args = p.parse_args(argv)
    with open(args.file, "rb") as f:
        message = f.read()
    result = send(args.host, args.port, args.sender, args.recipients, message,
                  starttls=args.starttls, cafile=args.ca)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
