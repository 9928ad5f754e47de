"""CPU per message of each of the filter's end-of-data checks, in the code alone.

    .venv/bin/python -m bench.checks [--messages 500] [--out FILE]

Runs the filter's default end-of-data chain in this process on a real reactor, against
a real DNS server (tests/dnsserver.py) with the test zones (tests/filter/mailauth.py:
sender.test with SPF, a DKIM key and DMARC p=reject), on messages DKIM-signed with
dkimpy (RSA 2048), 5 KB and 50 KB.  First the whole chain, then each check alone (with
what it reads: dmarc with spf and dkim), so the CPU of each check is the difference.
The DNS answers are cached after the first message, as in a steady flow of mail from
few senders; the first message's lookups are not counted.  "full" adds the antivirus (a
real clamd with the tests' signatures, started here: its CPU is clamd's, not counted; what
is counted is our side of INSTREAM) and a URI list (the body has two URLs).  Prints CPU ms per message
(process CPU: the reactor thread and the checks' pool threads) and messages per second
of one core; with --out, the figures as JSON.
"""
from __future__ import annotations

import argparse
import os
import json
import tempfile
import time
from pathlib import Path

from twisted.internet import defer

CHAINS = {
    "all (default)": ("spf", "dkim", "arc", "dmarc", "auth_results", "actions"),
    "full": ("antivirus", "urilists", "spf", "dkim", "arc", "dmarc", "auth_results", "actions"),
    "antivirus": ("antivirus",),
    "urilists": ("urilists",),
    "spf": ("spf",),
    "dkim": ("dkim",),
    "arc": ("arc",),
    "spf+dkim+dmarc": ("spf", "dkim", "dmarc"),
    "spf+dkim": ("spf", "dkim"),
    "auth_results+actions": ("auth_results", "actions"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from shared.blocking import InlinePool
    from shared.checks.core import Request
    from shared.checks.registry import BuildContext, build_policies
    from shared.config.schema import parse, tier_spec
    from shared.message import MessageView
    from tests.dnsserver import start_dns_server
    from tests.filter.mailauth import message, signed, zones
    from tests.support import RealReactor

    from tests.clamd import start_clamd
    tmp = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    server = start_dns_server(tmp, {**zones(), "uribl.bench.test": [("listed.test", "A", "127.0.0.2")]})
    clamd = start_clamd(tmp)
    real = RealReactor()
    out = {}
    try:
        for size in (5_000, 50_000):
            line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
            body = ("Read it online: https://www.sender.test/news or http://news.example.org/a\r\n"
                    + line * (size // len(line)))
            msg = signed(message(body=body))
            whole = b"Received: from mx.sender.test by filter.example.test\r\n" + msg
            header = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"
            for label, checks in CHAINS.items():
                s = parse("filter", {"next_hop": {"hosts": ["127.0.0.1:1"]}, "queue": {"directory": str(tmp / "q")},
                                     "server": {"hostname": "filter.example.test"},
                                     "dns": {"nameservers": [f"127.0.0.1:{server.address[1]}"]},
                                     "antivirus": {"servers": [clamd.address]},
                                     "urilists": {"zones": ["uribl.bench.test*4 BENCH_URIBL"]},
                                     "policies": {"default": {"end_of_data": list(checks), "rcpt": []}}})
                ctx = BuildContext(s, real.reactor, InlinePool())
                if os.environ.get("INLINE"):
                    ctx.store["mailauth-pool"] = InlinePool()
                chain = build_policies(s, tier_spec("filter"), ctx)["default"].chain

                def one():
                    results = {}
                    view = MessageView(header, len(whole), lambda: defer.succeed(whole))
                    req = Request(phase="end_of_data", client_address="127.0.0.1", helo="mx.sender.test",
                                  sender="alice@sender.test", recipients=("bob@example.test",), message=view,
                                  results=results)
                    return real.wait(chain.run(req, lambda n, v: results.__setitem__(n, v)), limit=30)
                one()                               # DNS answers into the cache
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(args.messages):
                    one()
                cpu = (time.process_time() - cpu0) / args.messages * 1000
                wall = (time.perf_counter() - wall0) / args.messages * 1000
                out[f"{size // 1000}k {label}"] = {"cpu_ms": round(cpu, 3), "wall_ms": round(wall, 3)}
                print(f"{size // 1000:>3} KB  {label:22} CPU {cpu:7.3f} ms/message   wall {wall:7.3f} ms", flush=True)
                for close in ctx.closers:
                    close()
    finally:
        real.close()
        server.stop()
        clamd.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
