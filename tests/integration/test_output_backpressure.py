"""A client that pipelines commands and never reads its replies, against a
running edge: the edge stops reading it instead of buffering every reply, so
its memory stays flat and nothing is left behind when the client goes.

The commands are EHLOs, which the edge answers every time (through its HELO
checks), each with a reply several times the command's size.  Run with
``pytest -s`` to see the figures (VmRSS of the edge process).
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.integration.helpers import Client

pytestmark = pytest.mark.slow

FLOOD_SECONDS = 9
MAX_GROWTH_MIB = 15          # the edge's VmRSS, above its figure before the flood
MAX_LATE_GROWTH_MIB = 3      # from the first third of the flood to its end
BURST = b"EHLO flood.example.net\r\n" * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_client_that_does_not_read_its_replies_costs_bounded_memory(make_pipeline):
    p = make_pipeline(start=("edge",))
    pid = p.edge.pid
    with Client(p.edge.port) as c:          # one whole dialogue first: the edge's steady state
        c.ehlo()
        c.cmd("QUIT")
    time.sleep(0.5)
    before = rss_mib(pid)

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # set before connecting
        s.connect(("127.0.0.1", p.edge.port))
        s.sendall(b"EHLO flood.example.net\r\n")
        s.setblocking(False)
        stream, pos, sent = memoryview(BURST), 0, 0     # BURST again and again, partial sends continued
        samples = []                                # (seconds since the start, MiB)
        start = time.monotonic()
        next_sample = start
        while (now := time.monotonic()) - start < FLOOD_SECONDS:
            try:
                n = s.send(stream[pos:])
                sent += n
                pos = (pos + n) % len(BURST)
            except BlockingIOError:
                time.sleep(0.01)                    # the edge has stopped reading us
            if now >= next_sample:
                samples.append((now - start, rss_mib(pid)))
                next_sample += 0.5
        during = [mib for _, mib in samples]
    assert p.edge.running, p.edge.log_tail()
    time.sleep(1)
    after = rss_mib(pid)

    print(f"\nedge VmRSS: before {before:.1f} MiB, during max {max(during):.1f} MiB, "
          f"end of flood {during[-1]:.1f} MiB, after close {after:.1f} MiB; "
          f"{sent / 2**20:.1f} MiB of commands sent in {FLOOD_SECONDS} s, never reading")
    print("samples: " + ", ".join(f"{t:.1f}s={mib:.1f}" for t, mib in samples))
    assert max(during) - before < MAX_GROWTH_MIB, samples
    third = during[len(during) // 3]
    assert max(during[len(during) // 3:]) - third < MAX_LATE_GROWTH_MIB, samples   # no steady growth
    assert after - before < MAX_GROWTH_MIB, (before, after)
    with Client(p.edge.port) as c:          # and the edge still serves others
        c.ehlo()
