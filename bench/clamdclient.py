"""clamd's INSTREAM two ways: the filter's Twisted client against the ``clamd`` package in a
bounded thread pool.

    .venv/bin/python -m bench.clamdclient [--messages 300] [--concurrency 10]

Starts one clamd (tests/clamd.py: the tests' signatures) and scans the same messages (5 KB and
50 KB, text) through it, `concurrency` at a time, from one reactor:

- ``twisted``: :class:`filter.antivirus.Antivirus` (the check's own client: INSTREAM written
  as the socket takes it, on the reactor);
- ``clamd+pool``: the ``clamd`` package's ``ClamdNetworkSocket.instream`` (a blocking socket
  client) in a :class:`shared.blocking.WorkerPool` of `concurrency` threads, the way a blocking
  library would be run.

Prints, per size and client, this process's CPU per message (the reactor and the threads;
clamd's own CPU is not ours and not counted) and messages per second.  The ``clamd`` package is
in the ``bench`` extra (``pip install -e '.[bench]'``).
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from twisted.internet import defer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=10)
    args = ap.parse_args(argv)
    import clamd as clamd_package
    from filter.antivirus import Antivirus, AntivirusSettings
    from shared.blocking import WorkerPool
    from tests.clamd import start_clamd
    from tests.filter.mailauth import message
    from tests.support import RealReactor

    tmp = Path(tempfile.mkdtemp(prefix="bench-clamd-"))
    server = start_clamd(tmp)
    real = RealReactor()
    host, port = server.address.rsplit(":", 1)
    ours = Antivirus(AntivirusSettings(servers=((host, int(port)),), timeout=30), real.reactor)
    pool = WorkerPool(real.reactor, args.concurrency, name="clamd")
    pool.start()

    def blocking(data: bytes) -> str:
        answer = clamd_package.ClamdNetworkSocket(host, int(port), timeout=30).instream(io.BytesIO(data))
        return answer["stream"][0]

    clients = {"twisted": lambda data: ours.scan(data),
               "clamd+pool": lambda data: pool.run(blocking, data)}
    try:
        for size in (5_000, 50_000):
            line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
            data = message(body=line * (size // len(line)))
            for name, scan in clients.items():
                real.wait(defer.maybeDeferred(scan, data), limit=30)          # connections warm
                cpu0, wall0 = time.process_time(), time.perf_counter()
                left = args.messages
                while left:
                    n = min(args.concurrency, left)
                    real.wait(defer.gatherResults([defer.maybeDeferred(scan, data) for _ in range(n)]), limit=60)
                    left -= n
                cpu = (time.process_time() - cpu0) / args.messages * 1000
                wall = time.perf_counter() - wall0
                print(f"{size // 1000:>3} KB  {name:11} CPU {cpu:6.3f} ms/message   {args.messages / wall:7.1f} "
                      f"messages/s", flush=True)
    finally:
        pool.stop()
        real.close()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
