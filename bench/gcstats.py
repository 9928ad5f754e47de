"""A tier with its garbage collector watched: what the collections cost while it runs.

    python -m bench.gcstats FILE [--freeze] [--prebuild RULE] -- TIER --config CONFIG

Runs ``python -m shared.cli TIER --config CONFIG`` in this process with a ``gc.callbacks``
hook timing every collection.  On SIGUSR2 it writes FILE (JSON, replaced atomically): per
generation, the collections so far and the seconds they took, and the objects the collector
tracks.  With ``--freeze``, SIGUSR1 calls ``gc.collect()`` and ``gc.freeze()``: everything
alive then moves to a permanent generation that no later collection visits (what a tier could
do once its configuration is built; a what-if for the benchmark, not what the tier does).
``--prebuild RULE`` compiles a firewall of that one rule (``deny file:FEED``) before the tier
starts and throws it away: a tier without the list whose heap went through building it, to
tell the cost of holding and looking up the list from the after-effects of building it.
Used by ``python -m bench.firewall throughput --gc``.
"""
from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    if "--" not in args or not args:
        sys.exit("usage: python -m bench.gcstats FILE [--freeze] -- TIER --config CONFIG")
    split = args.index("--")
    path, options, tier_args = args[0], args[1:split], args[split + 1:]
    if "--prebuild" in options:
        from shared.firewall import Firewall
        Firewall([options[options.index("--prebuild") + 1]])      # built, then garbage
        gc.collect()
    stats = {g: [0, 0.0] for g in range(3)}
    started = [0.0]

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            entry = stats[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - started[0]

    def dump(signum=None, frame=None) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"collections": {g: n for g, (n, _) in stats.items()},
                       "seconds": {g: s for g, (_, s) in stats.items()},
                       "tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}, f)
        os.replace(tmp, path)

    gc.callbacks.append(watch)
    signal.signal(signal.SIGUSR2, dump)
    if "--freeze" in options:
        signal.signal(signal.SIGUSR1, lambda signum, frame: (gc.collect(), gc.freeze()))
    sys.argv = ["shared.cli", *tier_args]
    try:
        runpy.run_module("shared.cli", run_name="__main__", alter_sys=True)
    finally:
        dump()


if __name__ == "__main__":
    main()
