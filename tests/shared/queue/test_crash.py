"""SIGKILL a real process that acknowledged messages; a restart delivers all of them.

The child uses the real thread pool, real fsyncs and its own (not installed)
reactor; the messages it acknowledged are in incoming/ or active/ when it is
killed (its delivery function never answers), plus one half-received file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from shared.queue.store import Spool
from tests.shared.queue.helpers import T0, FakeDeliver, make_manager, run_until, sync_runner

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent("""
    import sys
    from twisted.internet.defer import Deferred
    from twisted.internet.selectreactor import SelectReactor
    from shared.envelope import Envelope, Recipient
    from shared.queue.manager import QueueManager, QueueSettings
    from shared.queue.store import Spool

    reactor = SelectReactor()
    spool = Spool(sys.argv[1], reactor=reactor, threadpool_size=4)
    spool.start()
    manager = QueueManager(spool, lambda items: Deferred(),
                           QueueSettings(batch_size=5, concurrency=2), reactor=reactor)
    manager.start()
    N = 30

    def go():
        acked = []
        for i in range(N):
            m = spool.new_message()
            m.write(b"Subject: crash test %d\\r\\n\\r\\nbody\\r\\n" % i)

            def ok(_, m=m):
                print("ACK", m.qid, flush=True)
                manager.notify(m.qid)
                acked.append(m.qid)
                if len(acked) == N:
                    half = spool.new_message()
                    half.write(b"Subject: never acknowledged\\r\\n" + b"x" * 70000)   # on disk
                    reactor.callLater(0.05, print, "READY", flush=True)
            m.commit(Envelope("alice@example.org", [Recipient("bob@example.net")])).addCallback(ok)

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
""")


def test_sigkill_then_restart_delivers_every_acknowledged_message(tmp_path):
    root = tmp_path / "spool"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    acked = []
    deadline = time.monotonic() + 30
    try:
        for line in child.stdout:
            if line.startswith("ACK "):
                acked.append(line.split()[1])
            elif line.startswith("READY"):
                break
            assert time.monotonic() < deadline
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
    assert len(acked) == 30, stderr
    assert os.listdir(root / "active"), "the child should have been delivering"
    # one half-received message, beside the empty files the spool keeps in reserve
    leftovers = [p for p in (root / "tmp").iterdir()]
    assert len([p for p in leftovers if p.stat().st_size]) == 1

    clock = Clock()
    clock.advance(T0)
    spool = Spool(root, reactor=clock, fsync=False, runner=sync_runner)
    spool.start()                                     # the dead child's lock is gone
    deliver = FakeDeliver()
    manager = make_manager(spool, deliver, clock)
    with capturedLogs():
        report = manager.start()
    run_until(clock, clock.seconds() + 1)
    assert len(report.removed_tmp) == len(leftovers) and report.corrupt == []
    assert os.listdir(root / "tmp") == []
    assert sorted(deliver.delivered) == sorted(acked)
    assert all(spool.list(s) == [] for s in ("incoming", "active", "deferred", "hold"))
    spool.stop()
