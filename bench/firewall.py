"""The cost of the edge's firewall rules with a large list (a country or blocklist feed of N
CIDRs in a file), against no list: in the code alone, and in the edge's throughput.

    python -m bench.firewall [--entries 100000] [--lookups 200000]
    python -m bench.firewall throughput [--out DIR] [--entries 100000] [--runs 5] [--messages 2000]
                                        [--base-port 24300]

The first prints build time, memory and lookup time (the edge runs one lookup per connection, at
admission).  ``throughput`` runs two edges alone into the fsyncing sink (:mod:`bench.sink`), one
without ``[firewall]`` and one with ``rules = ["deny file:FEED"]``, FEED being ``--entries``
random CIDRs (none covering 127.0.0.0/8, but one: 127.0.0.2/32, which proves the list is
loaded: a client from 127.0.0.2 must get 554); 5 KB messages over 10 sessions (``python -m
bench.load send``), the two edges interleaved (order swapped every run), ``--runs`` runs each.
Prints msg/s at the sink per run, the medians, the ratio with/without (the target: at least
0.95; also the median of the ratios of consecutive pairs, which a slow minute of the machine
spoils less), the edge's CPU per message, and the CPU the rest of the machine used meanwhile;
writes OUT/firewall.json.  ``--gc`` runs the edges under :mod:`bench.gcstats` and adds the time
each spent in the garbage collector per message; ``--freeze`` adds a third edge with the list
whose objects are frozen out of the collector's reach (``gc.freeze()``) after its warm-up: what
that fix would give, measured, not what the edge does; ``--prebuilt`` an edge without the list
whose process built the same list and threw it away before starting (what building it leaves
behind in the heap, without the list).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from shared.firewall import Firewall

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
PROOF = "127.0.0.2"              # the feed's one loopback entry


def feed(path: Path, n: int, rng: random.Random, *, proof: bool = False) -> None:
    """`n` random CIDRs (/16 to /32) into `path`; with `proof`, none covers 127.0.0.0/8 but
    the first line, PROOF/32."""
    lines = [f"{PROOF}/32"] if proof else []
    while len(lines) < n:
        prefix = rng.choice((16, 20, 22, 24, 24, 24, 28, 32))
        addr = ipaddress.IPv4Address(rng.randrange(1 << 32))
        network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        if proof and network.overlaps(LOOPBACK):
            continue
        lines.append(str(network))
    path.write_text("\n".join(lines) + "\n")


def micro(args) -> None:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "feed.txt"
        feed(path, args.entries, rng)
        tracemalloc.start()
        t0 = time.perf_counter()
        wall = Firewall(["allow 192.0.2.0/24", f"deny file:{path}"])
        build = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    empty = Firewall(["allow 192.0.2.0/24"])
    addresses = [str(ipaddress.IPv4Address(rng.randrange(1 << 32))) for _ in range(args.lookups)]

    def per_lookup(fw: Firewall) -> float:
        t = time.perf_counter()
        for a in addresses:
            fw.decide(a)
        return (time.perf_counter() - t) / len(addresses)
    small, large = per_lookup(empty), per_lookup(wall)
    denied = sum(1 for a in addresses[:20_000] if (d := wall.decide(a)) is not None and not d.allowed)
    print(f"firewall: {args.entries} CIDRs from a file -> {wall.map.ranges} disjoint ranges; "
          f"build {build:.2f} s, peak memory while building {peak / 1e6:.0f} MB")
    print(f"lookup: {small * 1e6:.2f} us with 1 rule, {large * 1e6:.2f} us with {args.entries} "
          f"({denied / 200:.1f} % of random addresses denied)")


def refused_from(address: str, port: int) -> bytes:
    """The first reply line a client bound to `address` gets from 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((address, 0))
        s.connect(("127.0.0.1", port))
        return s.makefile("rb").readline().strip()


class _WithSink:
    """An edge alone with the sink as its second measured tier (for Bench.smtp_source_run)."""

    def __init__(self, system, sink_proc) -> None:
        self.system, self.sink_proc, self.ports = system, sink_proc, system.ports

    def tier_pids(self, tier: str) -> list[int]:
        return [self.sink_proc.pid] if tier == "sink" else self.system.tier_pids(tier)

    def master_pid(self, tier: str) -> int | None:
        return self.sink_proc.pid if tier == "sink" else self.system.master_pid(tier)

    def queue_empty(self, tier: str) -> bool:
        return True


MODES = {"kept": "bench.load: 10 sessions kept open, messages back to back",
         "per-connection": "smtp-source: 10 sessions, one message per connection"}


def throughput(args) -> int:
    from bench.run import Bench, clear_dir, fmt, host_info, log
    from bench.sink import stats as sink_stats
    from bench.smarthost import SmarthostEdgeAlone, port_free
    out = Path(args.out or tempfile.mkdtemp(prefix=time.strftime("smarthost-firewall-%Y%m%d-%H%M%S-"),
                                            dir="/tmp")).resolve()
    base = args.base_port
    ports = {"sink": base, "without": base + 1, "with": base + 2, "with+freeze": base + 3, "prebuilt": base + 4}
    busy = [p for p in ports.values() if not port_free(p)]
    if busy:
        raise SystemExit(f"ports in use on 127.0.0.1: {busy}; choose another --base-port")
    bench = Bench(argparse.Namespace(out=str(out), no_postfix=True))
    work = bench.work
    work.mkdir(parents=True, exist_ok=True)
    path = work / "feed.txt"
    feed(path, args.entries, random.Random(1), proof=True)
    results = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "ports": ports,
                        "entries": args.entries, "feed": str(path), "messages": args.messages,
                        "host": host_info(), "modes": MODES},
               "runs": []}
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    modes = [m for m in MODES if m == "kept" or os.path.exists(tool)]
    try:
        sink_dir = work / "sink"
        bench.start_sink(ports["sink"], sink_dir)
        rules = (f"deny file:{path}",)
        systems = {"without": SmarthostEdgeAlone(work / "without", ports["without"], ports["sink"], gc_stats=args.gc),
                   "with": SmarthostEdgeAlone(work / "with", ports["with"], ports["sink"], firewall=rules,
                                              gc_stats=args.gc)}
        if args.freeze:
            systems["with+freeze"] = SmarthostEdgeAlone(work / "with-freeze", ports["with+freeze"], ports["sink"],
                                                        firewall=rules, gc_freeze=True)
        if args.prebuilt:
            systems["prebuilt"] = SmarthostEdgeAlone(work / "prebuilt", ports["prebuilt"], ports["sink"],
                                                     prebuild=rules[0])
        for name, system in systems.items():
            t0 = time.monotonic()
            bench.start(system)
            results["meta"][f"start_s_{name}"] = round(time.monotonic() - t0, 2)
        proof = refused_from(PROOF, ports["with"])
        results["meta"]["proof"] = proof.decode(errors="replace")
        log(f"firewall: {args.entries} CIDRs loaded (start {results['meta']['start_s_with']} s, without "
            f"{results['meta']['start_s_without']} s); a client from {PROOF} gets {proof[:60]!r}")
        if not proof.startswith(b"554"):
            raise SystemExit("the edge with the feed did not refuse the feed's 127.0.0.2: list not loaded?")
        for name, system in systems.items():                # warm-up
            bench.sink_run(name, system, ports["sink"], sink_dir, 200, "5k", 10, f"warm{name}")
            if system.gc_freeze:
                system.freeze()
        names = list(systems)
        for mode in modes:
            for k in range(args.runs):
                for name in (names if k % 2 == 0 else names[::-1]):
                    gc0 = systems[name].gc_now() if systems[name].gc_stats else None
                    if mode == "kept":
                        r = bench.sink_run(name, systems[name], ports["sink"], sink_dir, args.messages, "5k", 10,
                                           f"fw{name[0]}{k}")
                        r.pop("raw")
                    else:
                        r = bench.smtp_source_run(tool, [], _WithSink(systems[name], bench.sink_proc),
                                                  args.messages, count=lambda: sink_stats(ports["sink"])["stored"],
                                                  tiers=("edge", "sink"))
                        r["cpu_s_per_msg"] = {"edge": r["cpu_ms_per_msg"]["edge"] / 1000}
                        r["peak_rss_mb"] = {"edge": None}
                        clear_dir(sink_dir)
                    r.update(system=name, mode=mode, order=k, messages=args.messages)
                    if gc0 is not None:
                        r["gc"] = gc_delta(gc0, systems[name].gc_now(), args.messages)
                    results["runs"].append(r)
                    log(f"  {mode} run {k + 1}/{args.runs} {name:7}: {fmt(r['delivered_per_s'])} msg/s at the "
                        f"sink ({r['delivered']}/{args.messages}), edge CPU {r['cpu_s_per_msg']['edge'] * 1000:.3f}"
                        f" ms/msg; others {r['others_cpus']:.2f} CPUs, load {r['loadavg_1m_before']:.2f}, "
                        f"calibration {r['calibration_ms']:.0f} ms")
                    (out / "firewall.json").write_text(json.dumps(results, indent=1))
    finally:
        bench.stop_all()
    results["summary"] = {mode: summarize([r for r in results["runs"] if r["mode"] == mode], names)
                          for mode in modes}
    (out / "firewall.json").write_text(json.dumps(results, indent=1))
    print(f"\n==== edge alone -> fsyncing sink, 5 KB, 10 sessions, {args.messages} messages x {args.runs} "
          f"runs each, the two edges interleaved ====")
    for mode in modes:
        summary = results["summary"][mode]
        print(f"  {MODES[mode]}:")
        for name in names:
            s = summary[name]
            gc_text = (f", in the collector {s['gc_ms_per_msg']:.3f} ms/msg ({s['gc2_per_1000']:.1f} full collections "
                       f"per 1,000 messages, {s['gc2_ms_each']:.0f} ms each)" if s.get("gc_ms_per_msg") is not None else "")
            print(f"    {name:11} ({0 if name in ('without', 'prebuilt') else args.entries} CIDRs): median {s['median']:.0f} msg/s "
                  f"(runs {', '.join(f'{x:.0f}' for x in s['delivered_per_s'])}), edge CPU "
                  f"{s['cpu_ms_per_msg']:.3f} ms/msg{gc_text}, others' CPUs {', '.join(map(str, s['others_cpus']))}"
                  + (f", {s['failed']} not delivered" if s["failed"] else ""))
        print(f"    with/without: {summary['ratio']:.3f} of the medians, {summary['ratio_pairs_median']:.3f} the "
              f"median of the run pairs ({', '.join(map(str, summary['ratio_per_run']))}); target >= 0.95: "
              f"{'met' if summary['ratio'] >= 0.95 else 'MISSED'}; edge CPU per message with/without "
              f"{summary['cpu_ratio']:.3f}")
        for name, what in (("with+freeze", "a what-if: gc.freeze() after warm-up"),
                           ("prebuilt", "no list, but the process built one and dropped it before starting")):
            if f"ratio_{name}" in summary:
                print(f"    {name}/without ({what}): {summary[f'ratio_{name}']:.3f} of the medians, "
                      f"{summary[f'ratio_pairs_median_{name}']:.3f} the median of the run pairs; edge CPU per "
                      f"message {summary[f'cpu_ratio_{name}']:.3f}")
    kept = results["summary"]["kept"]
    print(f"  the edge's peak RSS: {kept['without']['peak_rss_mb']:.0f} MB without the list, "
          f"{kept['with']['peak_rss_mb']:.0f} MB with it")
    log(f"firewall: results {out / 'firewall.json'}")
    return 0


def gc_delta(before: dict, after: dict, messages: int) -> dict:
    """What the edge's collector did between two bench.gcstats figures."""
    d = {key: {g: after[key][g] - before[key][g] for g in after[key]} for key in ("collections", "seconds")}
    d["ms_per_msg"] = sum(d["seconds"].values()) * 1000 / messages
    d["tracked"] = after["tracked"]
    return d


def summarize(runs: list[dict], names: list[str]) -> dict:
    summary = {}
    for name in names:
        mine = [r for r in runs if r["system"] == name]
        summary[name] = {
            "delivered_per_s": [round(r["delivered_per_s"], 1) for r in mine],
            "median": statistics.median(r["delivered_per_s"] for r in mine),
            "cpu_ms_per_msg": statistics.median(r["cpu_s_per_msg"]["edge"] * 1000 for r in mine),
            "peak_rss_mb": max((r["peak_rss_mb"]["edge"] or 0) for r in mine),
            "others_cpus": [round(r["others_cpus"], 2) for r in mine],
            "failed": sum(r["messages"] - r["delivered"] for r in mine),
        }
        gcs = [r["gc"] for r in mine if "gc" in r]
        if gcs:
            full = sum(g["collections"]["2"] for g in gcs)
            summary[name].update(
                gc_ms_per_msg=statistics.median(g["ms_per_msg"] for g in gcs),
                gc2_per_1000=full * 1000 / sum(r["messages"] for r in mine),
                gc2_ms_each=sum(g["seconds"]["2"] for g in gcs) * 1000 / full if full else 0.0)
    for name in names[1:]:
        key = "" if name == "with" else f"_{name}"
        pairs = [w["delivered_per_s"] / wo["delivered_per_s"] for w, wo in zip(
            (r for r in runs if r["system"] == name), (r for r in runs if r["system"] == "without"))]
        summary[f"ratio{key}"] = summary[name]["median"] / summary["without"]["median"]
        summary[f"ratio_per_run{key}"] = [round(x, 3) for x in pairs]
        summary[f"ratio_pairs_median{key}"] = statistics.median(pairs)
        summary[f"cpu_ratio{key}"] = summary[name]["cpu_ms_per_msg"] / summary["without"]["cpu_ms_per_msg"]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.firewall", description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=200_000)
    sub = p.add_subparsers(dest="mode")
    t = sub.add_parser("throughput", help="the edge's msg/s into the sink with and without the list")
    t.add_argument("--out", default=None, help="output directory (default: a new /tmp/smarthost-firewall-*)")
    t.add_argument("--entries", type=int, default=100_000)
    t.add_argument("--runs", type=int, default=5, help="runs per edge")
    t.add_argument("--messages", type=int, default=2000, help="messages per run")
    t.add_argument("--base-port", type=int, default=24300,
                   help="sink N, edges N+1 (without), N+2 (with), N+3 (with+freeze), N+4 (prebuilt)")
    t.add_argument("--gc", action="store_true",
                   help="run the edges under bench.gcstats: time in the garbage collector per message")
    t.add_argument("--freeze", action="store_true",
                   help="also an edge with the list whose objects are frozen (gc.freeze()) after warm-up: "
                        "a what-if, not the edge's behaviour (implies --gc for it)")
    t.add_argument("--prebuilt", action="store_true",
                   help="also an edge without the list whose process built the same list and dropped it "
                        "before starting (bench.gcstats --prebuild): the after-effects of building it")
    args = p.parse_args(argv)
    if args.mode == "throughput":
        return throughput(args)
    micro(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
