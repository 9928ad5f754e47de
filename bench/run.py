"""The benchmark: smarthost against Postfix, in one run, on 127.0.0.1.

    python -m bench.run [--quick] [--out DIR] [--base-port N] [--runs K] [--scale X] [--points 5k:10,...]
                        [--no-postfix] [--no-independent] [--no-concurrency] [--no-single-hop]

1. Chain: the smarthost tiers (:class:`bench.smarthost.SmarthostChain`) and three chained Postfix
   instances (:class:`bench.postfix.PostfixChain`) run side by side.  For every message size
   (5 KB, 50 KB, 1 MB) and number of sessions (1, 10, 50) the load generator
   (``python -m bench.load send``, its own process) sends N messages to each system's edge and
   watches the Maildir; systems alternate, K runs per point (default 3).  Between runs: every
   message delivered, every queue empty, Maildirs cleared, dirty pages written back (sync).
   Per run and tier: CPU seconds from /proc (live processes, plus the reaped children's time
   charged to Postfix's master) and peak RSS (sum of VmRSS over the tier's processes, sampled
   every 100 ms).
1b. Independent generator: Postfix's ``smtp-source`` (installed with Postfix; part of neither
   system under test) at each chain's edge, 5 KB, 10 sessions, first one message per
   connection (its default), then many per connection (``-d``); accepted = messages / its run
   time, delivered = until the Maildir holds them all; CPU per tier as above.
2. Single hop: smarthost's edge alone (:class:`bench.smarthost.SmarthostEdgeAlone`) and one
   Postfix instance (:class:`bench.postfix.PostfixSingleHop`), both relaying to the fsyncing
   sink (:mod:`bench.sink`), 5 KB, 10 sessions; the sink is measured alone first.
3. Concurrency: idle connections (greeting, EHLO, then nothing) to smarthost's edge up to
   10,000, and to Postfix's edge smtpd with its default process limit.

Prints a table per point, writes OUT/results.json (every raw figure) and OUT/delivered.png.
Everything it starts is stopped by pid when it ends, on Ctrl-C and on SIGTERM too.

Numbers to read with care: CPU is per process from /proc (see :func:`bench.load.cpu_seconds`);
kernel work on behalf of the tiers (loopback TCP, the file system journal) is charged to no tier.
RSS is the sum of VmRSS over a tier's processes, so Postfix's shared pages count once per
process; PSS (sampled every second) splits them.  The load generator, the Maildir watcher and
this process share the machine's CPUs with the systems under test.

results.json (every time in seconds, every rate in messages per second)::

    meta        {started, finished, duration_s, quick, argv, ports{...},
                 host{python, kernel, cpus, cpu_model, mem_total_mb, twisted, postfix},
                 plan{runs, messages{"SIZE/SESSIONS": N}, single_hop_messages, concurrency_target}}
    chain       [POINT...]
    POINT       {size ("5k"|"50k"|"1m"), size_bytes, sessions, messages,
                 systems{smarthost|postfix: {runs: [RUN...], summary: SUMMARY}},
                 ratio_delivered: smarthost/postfix of the median delivered msg/s
                                  (null when a message was not accepted or not delivered)}
    independent {tool, size_bytes, sessions, messages, modes{MODE: {smarthost|postfix:
                 {runs: [{exit, output, accepted_per_s, delivered, delivered_per_s,
                          cpu_ms_per_msg{tier}}], summary: {accepted_per_s{median, min, max},
                          delivered_per_s{...}, cpu_ms_per_msg{tier}}}, ratio_delivered}}}
    single_hop  {size, sessions, messages, sink_alone: RUN (tier "sink"),
                 systems{smarthost|postfix: {runs: [RUN...], summary: SUMMARY}}}
                 (tier "edge" only; delivered = stored by the sink)
    concurrency {smarthost|postfix: {port, target, baseline_rss_mb, baseline_pss_mb,
                 milestones: [{milestone|holding, attempted, ready, open, seconds, rss_mb, pss_mb,
                               processes}],
                 vmhwm_mb (smarthost), result: bench.load idle's result}}
    RUN         bench.load send's result: {run_id, size, sessions, messages, pipelining,
                 accepted, delivered, replies{code: count}, session_errors, accept_seconds,
                 deliver_seconds, accepted_per_s, delivered_per_s, latency_250_ms{p50, p99, max},
                 latency_maildir_ms{...}, generator_cpu_s, watcher_cpu_s,
                 raw{t0, t_mail_s[], t_250_s[], t_maildir_s[], codes[]}   (per message, seconds
                 from the first MAIL; null when it did not happen)}
                 plus {system, order, window_s, machine_busy_cpus, others_cpus (the CPUs everything
                 but the measured tiers, the sink and the load used meanwhile), calibration_ms
                 (bench.load.calibration_ms before the run), loadavg_1m_before,
                 cpu_s{tier}, cpu_s_per_msg{tier}, peak_rss_mb{tier},
                 peak_pss_mb{tier}, vmhwm_mb{tier} (smarthost: peak since the process started),
                 drain_s (last 250 to empty queues), sink{stored, last_stored_s, cpu_s} (single hop)}
    SUMMARY     {accepted_per_s{median, min, max}, delivered_per_s{median, min, max},
                 latency_250_ms{p50, p99}, latency_maildir_ms{p50, p99} (all runs' messages pooled),
                 cpu_ms_per_msg{tier} (median of runs), peak_rss_mb{tier}, peak_pss_mb{tier} (max),
                 failed (not answered 250), undelivered (250 but never seen in the Maildir)}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import sink
from bench.load import NoiseWindow, RssSampler, percentile, proc_status_kb, pss_kb, rss_kb, tier_cpu_seconds
from bench.sink import stats as sink_stats
from bench.smarthost import REPO, SmarthostChain, SmarthostEdgeAlone, port_free, repo_env, run_bench, stop_process

SIZES = ("5k", "50k", "1m")
SIZE_BYTES = {"5k": 5 * 1024, "50k": 50 * 1024, "1m": 1024 * 1024}
SIZE_LABEL = {"5k": "5 KB", "50k": "50 KB", "1m": "1 MB"}
SESSIONS = (1, 10, 50)
TIERS = ("edge", "filter", "domain")
# Messages per point: each run lasts a few seconds on a 2-core machine.
# Messages per point, for runs of about 2-7 s on a 2-core machine (where smarthost and Postfix
# deliver some 250-550 msg/s at 5 KB, 230-450 at 50 KB, 50-120 at 1 MB).
MESSAGES = {
    ("5k", 1): 1500, ("5k", 10): 2000, ("5k", 50): 2500,
    ("50k", 1): 1200, ("50k", 10): 1500, ("50k", 50): 1500,
    ("1m", 1): 200, ("1m", 10): 250, ("1m", 50): 300,
}
QUICK_MESSAGES = 300
SINGLE_HOP_MESSAGES = 2000
INDEPENDENT_MESSAGES = 2000
CONCURRENCY_TARGET = 10_000
QUICK_CONCURRENCY_TARGET = 1_000
RCPT = "alice@example.test"
REPLY_TIMEOUT = 30          # seconds a session may wait for one reply before it is given up


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def quiesce() -> None:
    """Write back what earlier runs left dirty before a measured run starts.

    Each run leaves thousands of written and deleted files (queue files, Maildir files) that
    the kernel writes back over the next seconds; without this, that work lands in the next
    run's window, which is the other system's, and shows as fsync latency there.
    """
    os.sync()
    time.sleep(0.5)


def send_argv(port: int, size: str, sessions: int, n: int, tag: str) -> list[str]:
    """bench.load's arguments for `n` messages of `size` over `sessions` to 127.0.0.1:port."""
    return ["send", "--port", str(port), "--size", size, "--sessions", str(sessions),
            "--messages", str(n), "--rcpt", RCPT, "--run-id", tag]


def clear_maildir(maildir: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        d = maildir / sub
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for entry in it:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass


def clear_dir(d: Path) -> None:
    if d.is_dir():
        with os.scandir(d) as it:
            for entry in it:
                os.unlink(entry.path)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.started: list = []          # systems to stop, last first
        self.load_proc: subprocess.Popen | None = None
        self.sink_proc: subprocess.Popen | None = None
        self.results: dict = {"meta": {}, "chain": [], "independent": None, "single_hop": None,
                              "concurrency": {}}
        self.use_postfix = not args.no_postfix

    # -- lifecycle ------------------------------------------------------------------------------

    def stop_all(self) -> None:
        if self.load_proc is not None and self.load_proc.poll() is None:
            self._kill_pid(self.load_proc)
        while self.started:
            system = self.started.pop()
            try:
                system.stop()
            except Exception as e:            # keep stopping the others
                log(f"error while stopping {type(system).__name__}: {e}")
        if self.sink_proc is not None and self.sink_proc.poll() is None:
            self._kill_pid(self.sink_proc)
        self.sink_proc = None

    _kill_pid = staticmethod(stop_process)

    def start(self, system):
        self.started.append(system)
        system.start()
        return system

    def stop(self, system) -> None:
        self.started.remove(system)
        system.stop()

    # -- one load run -----------------------------------------------------------------------------

    def load(self, argv: list[str], timeout: float) -> dict:
        self.load_proc = subprocess.Popen([sys.executable, "-m", "bench.load", *argv], cwd=REPO,
                                          env=repo_env(), stdout=subprocess.PIPE, text=True)
        try:
            out, _ = self.load_proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_pid(self.load_proc)
            raise RuntimeError(f"bench.load {' '.join(argv)} did not finish in {timeout:.0f} s")
        finally:
            proc, self.load_proc = self.load_proc, None
            if proc.poll() is None:             # interrupted (Ctrl-C, SIGTERM): stop_all no longer sees it
                self._kill_pid(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.load {' '.join(argv)} exited {proc.returncode}")
        return json.loads(out.strip().splitlines()[-1])

    def measured_run(self, name: str, system, tiers, argv: list[str], drained,
                     maildir: Path | None, timeout: float, also_measured=None) -> dict:
        """One load run against `system` with CPU and memory charged to each of `tiers`, and
        the machine's other work meanwhile (`also_measured()`: CPU seconds of a further
        measured process, the sink, so far)."""
        if maildir is not None:
            clear_maildir(maildir)
        quiesce()
        load_before = os.getloadavg()[0]
        extra0 = also_measured() if also_measured else 0.0
        window = NoiseWindow()
        before = {t: tier_cpu_seconds(system.tier_pids(t), system.master_pid(t)) for t in tiers}
        sampler = RssSampler({t: (lambda t=t: system.tier_pids(t)) for t in tiers})
        with sampler:
            result = self.load(argv, timeout)
            t_end = time.monotonic()
            deadline = t_end + 120
            while not drained():
                if time.monotonic() > deadline:
                    log(f"  {name}: queues not empty 120 s after the run")
                    break
                time.sleep(0.01)
            drain_s = time.monotonic() - t_end
        time.sleep(0.2)                          # let the masters reap exited daemons
        after = {t: tier_cpu_seconds(system.tier_pids(t), system.master_pid(t)) for t in tiers}
        done = result["delivered"] if result["delivered"] is not None else result["accepted"]
        cpu_s = {t: after[t] - before[t] for t in tiers}
        extra = (also_measured() - extra0) if also_measured else 0.0
        result.update({
            "system": name,
            **window.noise(sum(cpu_s.values()) + extra),
            "loadavg_1m_before": load_before,
            "cpu_s": cpu_s,
            "cpu_s_per_msg": {t: (cpu_s[t] / done if done else None) for t in tiers},
            "peak_rss_mb": {t: sampler.peak_kb[t] / 1024 for t in tiers},
            "peak_pss_mb": {t: sampler.peak_pss_kb[t] / 1024 for t in tiers},
            "drain_s": round(drain_s, 3),
        })
        if isinstance(system, (SmarthostChain, SmarthostEdgeAlone)):
            result["vmhwm_mb"] = {t: sum(proc_status_kb(p, b"VmHWM:") for p in system.tier_pids(t)) / 1024
                                  for t in tiers}
        if maildir is not None:
            clear_maildir(maildir)
        return result

    # -- summaries ----------------------------------------------------------------------------------

    @staticmethod
    def summarize(runs: list[dict], tiers) -> dict:
        lat250, latmd, failed, undelivered = [], [], 0, 0
        for r in runs:
            raw = r["raw"]
            watched = r["latency_maildir_ms"] is not None
            for tm, t250, tmd, code in zip(raw["t_mail_s"], raw["t_250_s"], raw["t_maildir_s"], raw["codes"]):
                if code != 250:
                    failed += 1
                    continue
                lat250.append((t250 - tm) * 1000)
                if tmd is not None:
                    latmd.append((tmd - tm) * 1000)
                elif watched:
                    undelivered += 1
        lat250.sort()
        latmd.sort()

        def spread(key):
            vals = [r[key] for r in runs if r[key] is not None]
            return {"median": median(vals), "min": min(vals, default=None), "max": max(vals, default=None)}

        return {
            "accepted_per_s": spread("accepted_per_s"),
            "delivered_per_s": spread("delivered_per_s"),
            "latency_250_ms": {"p50": percentile(lat250, 50), "p99": percentile(lat250, 99)},
            "latency_maildir_ms": {"p50": percentile(latmd, 50), "p99": percentile(latmd, 99)},
            "cpu_ms_per_msg": {t: (lambda v: v * 1000 if v is not None else None)(
                median([r["cpu_s_per_msg"][t] for r in runs])) for t in tiers},
            "peak_rss_mb": {t: max(r["peak_rss_mb"][t] for r in runs) for t in tiers},
            "peak_pss_mb": {t: max(r["peak_pss_mb"][t] for r in runs) for t in tiers},
            "failed": failed,
            "undelivered": undelivered,
        }

    # -- 1. the chains ------------------------------------------------------------------------------

    def chain_benchmark(self, systems: dict, plan: list[tuple[str, int, int]], runs: int) -> None:
        for size, sessions, n in plan:
            point = {"size": size, "size_bytes": SIZE_BYTES[size], "sessions": sessions, "messages": n,
                     "systems": {name: {"runs": []} for name in systems}}
            self.results["chain"].append(point)
            names = list(systems)
            for k in range(runs):
                for name in (names if k % 2 == 0 else names[::-1]):
                    system = systems[name]
                    maildir = system.maildir("alice")
                    argv = ["send", "--port", str(system.ports["edge"]), "--size", size,
                            "--sessions", str(sessions), "--messages", str(n), "--maildir", str(maildir),
                            "--rcpt", RCPT, "--run-id", f"{name[0]}{size}s{sessions}r{k}",
                            "--reply-timeout", str(REPLY_TIMEOUT)]
                    r = self.measured_run(name, system, TIERS, argv,
                                          lambda s=system: all(s.queue_empty(t) for t in TIERS),
                                          maildir, timeout=600)
                    r["order"] = k
                    point["systems"][name]["runs"].append(r)
                    log(f"  {SIZE_LABEL[size]:>5} x{sessions:<3} run {k + 1}/{runs} {name:9}: "
                        f"accepted {fmt(r['accepted_per_s'])}/s delivered {fmt(r['delivered_per_s'])}/s "
                        f"({r['delivered']}/{n}) 250 p50 {fmt(r['latency_250_ms']['p50'])} ms; others "
                        f"{r['others_cpus']:.2f} CPUs, load {r['loadavg_1m_before']:.2f}, "
                        f"calibration {r['calibration_ms']:.0f} ms")
            for name in systems:
                point["systems"][name]["summary"] = self.summarize(point["systems"][name]["runs"], TIERS)
            if "smarthost" in systems and "postfix" in systems:
                sh, pf = (point["systems"][n]["summary"] for n in ("smarthost", "postfix"))
                a, b = sh["delivered_per_s"]["median"], pf["delivered_per_s"]["median"]
                # a rate over the messages that got through is no rate when some did not
                complete = not (sh["failed"] or pf["failed"] or sh["undelivered"] or pf["undelivered"])
                point["ratio_delivered"] = a / b if a and b and complete else None
            print_point(point)
            self.save()

    def warm_up(self, systems: dict) -> None:
        for name, system in systems.items():
            maildir = system.maildir("alice")
            argv = ["send", "--port", str(system.ports["edge"]), "--size", "5k", "--sessions", "5",
                    "--messages", "50", "--maildir", str(maildir), "--rcpt", RCPT, "--run-id", f"warm{name}",
                    "--no-raw"]
            r = self.load(argv, 120)
            deadline = time.monotonic() + 60
            while not all(system.queue_empty(t) for t in TIERS) and time.monotonic() < deadline:
                time.sleep(0.05)
            clear_maildir(maildir)
            if r["delivered"] != 50:
                raise RuntimeError(f"{name}: warm-up delivered {r['delivered']} of 50: {r}")

    # -- 1b. an independent generator: Postfix's smtp-source --------------------------------------

    def independent(self, systems: dict, runs: int, n: int) -> None:
        """smtp-source (shipped with Postfix, written by neither side of this comparison) at each
        chain's edge: 5 KB messages, 10 sessions, one message per connection (its default, as most
        MX traffic arrives) and many per connection (``-d``).  Delivered = the Maildir holds all n."""
        tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        if not os.path.exists(tool):
            log("  smtp-source not found (Debian's postfix package ships it): skipped")
            return
        section = self.results["independent"] = {"tool": "smtp-source", "size_bytes": SIZE_BYTES["5k"],
                                                 "sessions": 10, "messages": n, "modes": {}}
        names = list(systems)
        for mode, flags in (("connection per message", []), ("messages share connections (-d)", ["-d"])):
            entry = section["modes"][mode] = {name: {"runs": []} for name in names}
            for k in range(runs):
                for name in (names if k % 2 == 0 else names[::-1]):
                    system = systems[name]
                    r = self.smtp_source_run(tool, flags, system, n)
                    entry[name]["runs"].append(r)
                    log(f"  smtp-source {mode}, run {k + 1}/{runs} {name:9}: accepted "
                        f"{fmt(r['accepted_per_s'])}/s delivered {fmt(r['delivered_per_s'])}/s "
                        f"({r['delivered']}/{n})")
            for name in names:
                rs = entry[name]["runs"]
                entry[name]["summary"] = {
                    key: {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None
                    for key in ("accepted_per_s", "delivered_per_s")
                    for v in [[r[key] for r in rs if r[key]]]}
                entry[name]["summary"]["cpu_ms_per_msg"] = {
                    t: statistics.median(r["cpu_ms_per_msg"][t] for r in rs) for t in TIERS}
            if "smarthost" in entry and "postfix" in entry:
                a, b = (entry[x]["summary"]["delivered_per_s"] for x in ("smarthost", "postfix"))
                entry["ratio_delivered"] = a["median"] / b["median"] if a and b else None
        print_independent(section)
        self.save()

    def smtp_source_run(self, tool: str, flags: list[str], system, n: int, count=None, tiers=TIERS) -> dict:
        """smtp-source sends `n` 5 KB messages over 10 sessions to `system`'s edge; delivered =
        `count()` grew by n (default: files in the chain's Maildir, cleared before and after)."""
        maildir = None
        if count is None:
            maildir = system.maildir("alice")
            clear_maildir(maildir)
            new = maildir / "new"

            def count() -> int:
                try:
                    return len(os.listdir(new))
                except FileNotFoundError:
                    return 0
        quiesce()
        start = count()
        load_before = os.getloadavg()[0]
        window = NoiseWindow()
        before = {t: tier_cpu_seconds(system.tier_pids(t), system.master_pid(t)) for t in tiers}
        argv = [tool, *flags, "-s", "10", "-m", str(n), "-l", str(SIZE_BYTES["5k"]),
                "-f", "bench@client.test", "-t", RCPT, f"127.0.0.1:{system.ports['edge']}"]
        t0 = time.monotonic()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        t1 = time.monotonic()
        delivered = count() - start
        while delivered < n and time.monotonic() - t1 < 120:
            time.sleep(0.01)
            delivered = count() - start
        t2 = time.monotonic()
        while not all(system.queue_empty(t) for t in tiers) and time.monotonic() - t2 < 60:
            time.sleep(0.05)
        time.sleep(0.2)                          # let the masters reap exited daemons
        after = {t: tier_cpu_seconds(system.tier_pids(t), system.master_pid(t)) for t in tiers}
        if maildir is not None:
            clear_maildir(maildir)
        cpu = {t: after[t] - before[t] for t in tiers}
        return {"exit": proc.returncode, "output": proc.stdout[-2000:], "accepted_per_s": n / (t1 - t0)
                if proc.returncode == 0 else None,
                "delivered": delivered, "delivered_per_s": n / (t2 - t0) if delivered >= n else None,
                "cpu_ms_per_msg": {t: cpu[t] * 1000 / n for t in tiers},
                **window.noise(sum(cpu.values())), "loadavg_1m_before": load_before}

    # -- 2. single hop ------------------------------------------------------------------------------

    def start_sink(self, port: int, directory: Path) -> None:
        self.sink_proc = sink.spawn(port, directory)

    def sink_run(self, name: str, system, sink_port: int, sink_dir: Path, n: int, size: str, sessions: int,
                 tag: str) -> dict:
        """One measured run of `n` messages into `system`'s edge, which relays them to the sink:
        delivered = stored by the sink (and the edge's queue empty); the sink's CPU is its own."""
        stored = sink_stats(sink_port)["stored"]
        sink_cpu = lambda: tier_cpu_seconds([self.sink_proc.pid], None)
        cpu0 = sink_cpu()
        r = self.measured_run(name, system, ("edge",), send_argv(system.ports["edge"], size, sessions, n, tag),
                              lambda: system.queue_empty("edge") and sink_stats(sink_port)["stored"] >= stored + n,
                              None, timeout=300, also_measured=sink_cpu)
        stats = sink_stats(sink_port)
        t0 = r["raw"]["t0"]
        r["sink"] = {"stored": stats["stored"] - stored,
                     "last_stored_s": stats["last"] - t0 if stats["last"] else None,
                     "cpu_s": sink_cpu() - cpu0}
        last = r["sink"]["last_stored_s"]
        r["delivered"] = r["sink"]["stored"]
        r["delivered_per_s"] = r["sink"]["stored"] / last if last else None
        clear_dir(sink_dir)
        return r

    def single_hop(self, base: int, runs: int, n: int) -> None:
        sink_port, sh_port, pf_port = base + 20, base + 21, base + 22
        sink_dir = self.work / "sink"
        self.start_sink(sink_port, sink_dir)
        size, sessions = "5k", 10
        section = {"size": size, "sessions": sessions, "messages": n, "systems": {}}
        self.results["single_hop"] = section

        class SinkAlone:                  # the sink measured like a system whose one tier is "sink"

            def tier_pids(_, tier):
                return [self.sink_proc.pid]

            def master_pid(_, tier):
                return self.sink_proc.pid

        stored = sink_stats(sink_port)["stored"]
        r = self.measured_run("sink", SinkAlone(), ("sink",), send_argv(sink_port, size, sessions, n, "sink"),
                              lambda: sink_stats(sink_port)["stored"] >= stored + n, None, timeout=300)
        section["sink_alone"] = r
        clear_dir(sink_dir)
        log(f"  sink alone: accepted {fmt(r['accepted_per_s'])}/s, "
            f"CPU {fmt(r['cpu_s_per_msg']['sink'] * 1000, 3)} ms/msg")

        systems = {"smarthost": self.start(SmarthostEdgeAlone(self.work / "single-smarthost", sh_port,
                                                              sink_port))}
        if self.use_postfix:
            from bench.postfix import PostfixSingleHop
            systems["postfix"] = self.start(PostfixSingleHop(self.work / "single-postfix", pf_port,
                                                             sink_port))
        section["systems"] = {name: {"runs": []} for name in systems}
        names = list(systems)
        for k in range(runs):
            for name in (names if k % 2 == 0 else names[::-1]):
                r = self.sink_run(name, systems[name], sink_port, sink_dir, n, size, sessions, f"{name[0]}hop{k}")
                r["order"] = k
                section["systems"][name]["runs"].append(r)
                log(f"  single hop run {k + 1}/{runs} {name:9}: accepted {fmt(r['accepted_per_s'])}/s, "
                    f"250 p50 {fmt(r['latency_250_ms']['p50'])} ms, at the sink after "
                    f"{fmt(r['sink']['last_stored_s'], 2)} s")
        for name in systems:
            section["systems"][name]["summary"] = self.summarize(section["systems"][name]["runs"], ("edge",))
        for system in systems.values():
            self.stop(system)
        print_single_hop(section)
        self.save()

    # -- 3. idle connections ----------------------------------------------------------------------

    def concurrency(self, name: str, system, target: int, milestones: list[int]) -> None:
        port = system.ports["edge"]
        pids = lambda: system.tier_pids("edge")
        entry = {"port": port, "target": target, "baseline_rss_mb": rss_kb(pids()) / 1024,
                 "baseline_pss_mb": pss_kb(pids()) / 1024, "milestones": []}
        self.results["concurrency"][name] = entry
        argv = ["idle", "--port", str(port), "--target", str(target),
                "--milestones", ",".join(map(str, milestones)), "--hold", "3" if self.args.quick else "5"]
        self.load_proc = subprocess.Popen([sys.executable, "-m", "bench.load", *argv], cwd=REPO,
                                          env=repo_env(), stdout=subprocess.PIPE, text=True)
        try:
            for line in self.load_proc.stdout:
                msg = json.loads(line)
                if "milestone" in msg or "holding" in msg:
                    now = pids()
                    msg["rss_mb"] = rss_kb(now) / 1024
                    msg["pss_mb"] = pss_kb(now) / 1024
                    msg["processes"] = len(now)
                    entry["milestones"].append(msg)
                    log(f"  {name} idle connections: {msg}")
                elif "result" in msg:
                    entry["result"] = msg["result"]
                else:
                    log(f"  {name} idle connections: {msg}")
            self.load_proc.wait(timeout=30)
        finally:
            if self.load_proc.poll() is None:
                self._kill_pid(self.load_proc)
            self.load_proc = None
        if name == "smarthost":
            entry["vmhwm_mb"] = sum(proc_status_kb(p, b"VmHWM:") for p in pids()) / 1024
        r = entry.get("result", {})
        log(f"  {name}: {r.get('greeted')} greeted ({r.get('greeted_in_time')} within "
            f"{r.get('greeted_within_s')} s), {r.get('ready_and_open_after_hold')} ready and open after "
            f"{r.get('hold_s')} s, {r.get('connect_failed')} connects failed")
        self.save()

    # -- the whole run ------------------------------------------------------------------------------

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "results.json")

    def run(self) -> None:
        a = self.args
        t_start = time.monotonic()
        base = a.base_port
        runs = a.runs or (1 if a.quick else 3)
        if a.quick:
            plan = [("5k", 10, QUICK_MESSAGES)]
        else:
            points = a.points or [(size, s) for size in SIZES for s in SESSIONS]
            plan = [(size, s, max(1, int(MESSAGES[(size, s)] * a.scale))) for size, s in points]
        single_n = QUICK_MESSAGES if a.quick else int(SINGLE_HOP_MESSAGES * a.scale)
        target = QUICK_CONCURRENCY_TARGET if a.quick else CONCURRENCY_TARGET
        meta = self.results["meta"]
        meta.update({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": a.quick, "argv": sys.argv,
            "plan": {"runs": runs, "messages": {f"{s}/{n}": m for s, n, m in plan},
                     "single_hop_messages": single_n, "concurrency_target": target},
            "ports": {"smarthost": base, "postfix": base + 10, "sink": base + 20,
                      "single_smarthost": base + 21, "single_postfix": base + 22},
            "host": host_info(),
        })
        busy = [p for p in (*range(base, base + 3), *range(base + 10, base + 13), *range(base + 20, base + 23))
                if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports in use on 127.0.0.1: {busy}; choose another --base-port")
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"bench: output in {self.out}")

        systems = {}
        if self.use_postfix:
            from bench.postfix import PostfixChain, ensure_postfix, postfix_version
            ensure_postfix()
            meta["host"]["postfix"] = postfix_version()
        log("bench: starting the smarthost chain" + (" and the Postfix chain" if self.use_postfix else ""))
        systems["smarthost"] = self.start(SmarthostChain(self.work / "smarthost", base))
        if self.use_postfix:
            systems["postfix"] = self.start(PostfixChain(self.work / "postfix", base + 10))
        self.warm_up(systems)

        log(f"bench: chain, {len(plan)} point(s) x {runs} run(s) x {len(systems)} systems")
        self.chain_benchmark(systems, plan, runs)

        if not a.no_independent:
            log("bench: an independent generator, Postfix's smtp-source")
            self.independent(systems, runs, QUICK_MESSAGES if a.quick else int(INDEPENDENT_MESSAGES * a.scale))

        if not a.no_concurrency:
            log(f"bench: idle connections (up to {target})")
            milestones = [m for m in (1000, 10_000) if m <= target]
            self.concurrency("smarthost", systems["smarthost"], target, milestones)
            if self.use_postfix:
                self.concurrency("postfix", systems["postfix"], target, milestones)
        for system in list(systems.values()):
            self.stop(system)

        if not a.no_single_hop:
            log("bench: single hop through the sink")
            self.single_hop(base, runs, single_n)

        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["duration_s"] = round(time.monotonic() - t_start, 1)
        self.save()
        print_summary(self.results)
        try:
            from bench.plot import plot
            png = plot(self.results, self.out / "delivered.png")
            log(f"bench: plot {png}")
        except ImportError as e:
            log(f"bench: no plot ({e}); install matplotlib: .venv/bin/pip install matplotlib")
        log(f"bench: results {self.out / 'results.json'}; took {meta['duration_s']:.0f} s")


# -- printing ---------------------------------------------------------------------------------------

def print_independent(section: dict) -> None:
    print(f"\n==== smtp-source, 5 KB, 10 sessions, {section['messages']} messages ====")
    for mode, entry in section["modes"].items():
        print(f"  {mode}:")
        for name, e in entry.items():
            if name == "ratio_delivered":
                continue
            s = e["summary"]
            acc, dl = s["accepted_per_s"], s["delivered_per_s"]
            cpu = "/".join(f"{s['cpu_ms_per_msg'][t]:.2f}" for t in TIERS)
            print(f"    {name:9} accepted {fmt(acc and acc['median'])}/s "
                  f"({fmt(acc and acc['min'])}-{fmt(acc and acc['max'])}), delivered "
                  f"{fmt(dl and dl['median'])}/s ({fmt(dl and dl['min'])}-{fmt(dl and dl['max'])}), "
                  f"CPU ms/msg e/f/d {cpu}")
        if entry.get("ratio_delivered"):
            print(f"    smarthost/postfix delivered msg/s: {entry['ratio_delivered']:.2f}")
    sys.stdout.flush()


def fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def fmt_spread(s: dict) -> str:
    if s["median"] is None:
        return "-"
    if s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def tiers_of(summary: dict) -> list[str]:
    return list(summary["cpu_ms_per_msg"])


def print_rows(header: str, rows: dict[str, dict], maildir: bool = True) -> None:
    tiers = tiers_of(next(iter(rows.values())))
    t = "/".join(x[0] for x in tiers)
    print(header)
    cols = [("system", 10), ("accepted/s (min-max)", 20), ("delivered/s (min-max)", 21),
            ("250 ms p50/p99", 15)]
    if maildir:
        cols.append(("Maildir ms p50/p99", 18))
    cols += [(f"CPU ms/msg {t}", 20), (f"RSS MB {t}", 16), (f"PSS MB {t}", 14)]
    print("  " + " ".join(name.rjust(w) if i else name.ljust(w) for i, (name, w) in enumerate(cols)))
    for name, s in rows.items():
        cells = [name, fmt_spread(s["accepted_per_s"]), fmt_spread(s["delivered_per_s"]),
                 f"{fmt(s['latency_250_ms']['p50'], 1)}/{fmt(s['latency_250_ms']['p99'], 1)}"]
        if maildir:
            cells.append(f"{fmt(s['latency_maildir_ms']['p50'], 1)}/{fmt(s['latency_maildir_ms']['p99'], 1)}")
        cells += ["/".join(fmt(s["cpu_ms_per_msg"][x], 2) for x in tiers),
                  "/".join(fmt(s["peak_rss_mb"][x]) for x in tiers),
                  "/".join(fmt(s["peak_pss_mb"][x]) for x in tiers)]
        line = "  " + " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, cols)))
        if s["failed"]:
            line += f"   ({s['failed']} not accepted)"
        if s["undelivered"]:
            line += f"   ({s['undelivered']} accepted, not in the Maildir)"
        print(line)


def print_point(point: dict) -> None:
    runs = len(next(iter(point["systems"].values()))["runs"])
    rows = {name: v["summary"] for name, v in point["systems"].items()}
    print_rows(f"\n{SIZE_LABEL[point['size']]}, {point['sessions']} session(s), {point['messages']} messages, "
               f"{runs} run(s)", rows)
    if point.get("ratio_delivered") is not None:
        print(f"  smarthost/postfix delivered msg/s: {point['ratio_delivered']:.2f}")
    elif len(rows) > 1:
        print("  smarthost/postfix delivered msg/s: n/a (messages not accepted or not delivered)")
    sys.stdout.flush()


def print_single_hop(section: dict) -> None:
    rows = {name: v["summary"] for name, v in section["systems"].items()}
    print_rows(f"\nSingle hop -> fsyncing sink, {SIZE_LABEL[section['size']]}, {section['sessions']} sessions, "
               f"{section['messages']} messages (delivered = at the sink)", rows, maildir=False)
    for name, v in section["systems"].items():
        per_msg = [r["sink"]["cpu_s"] / r["sink"]["stored"] for r in v["runs"] if r["sink"]["stored"]]
        print(f"  {name:10} the sink's CPU meanwhile: {fmt(median(per_msg) * 1000 if per_msg else None, 3)} ms/msg")
    sa = section["sink_alone"]
    print(f"  sink alone: {fmt(sa['accepted_per_s'])} msg/s accepted, "
          f"250 p50/p99 {fmt(sa['latency_250_ms']['p50'], 1)}/{fmt(sa['latency_250_ms']['p99'], 1)} ms, "
          f"CPU {fmt(sa['cpu_s_per_msg']['sink'] * 1000, 3)} ms/msg")
    sys.stdout.flush()


def print_summary(results: dict) -> None:
    print("\n==== summary: delivered msg/s (median of runs) ====")
    systems = []
    for p in results["chain"]:
        for name in p["systems"]:
            if name not in systems:
                systems.append(name)
    print(f"  {'size':>6} {'sessions':>8} " + " ".join(f"{n:>10}" for n in systems) + "   ratio")
    for p in results["chain"]:
        vals = [p["systems"][n]["summary"]["delivered_per_s"]["median"] if n in p["systems"] else None
                for n in systems]
        print(f"  {SIZE_LABEL[p['size']]:>6} {p['sessions']:>8} " + " ".join(f"{fmt(v):>10}" for v in vals)
              + f"   {fmt(p.get('ratio_delivered'), 2)}")
    if results.get("independent"):
        print("\n==== smtp-source, 5 KB, 10 sessions: delivered msg/s (median of runs) ====")
        for mode, entry in results["independent"]["modes"].items():
            vals = [entry[n]["summary"]["delivered_per_s"] for n in systems if n in entry]
            print(f"  {mode:32} " + " ".join(f"{fmt(v and v['median']):>10}" for v in vals)
                  + f"   {fmt(entry.get('ratio_delivered'), 2)}")
    if results["concurrency"]:
        print("\n==== idle connections (greeting + EHLO, then idle) ====")
        for name, c in results["concurrency"].items():
            r = c.get("result", {})
            ms = ", ".join(f"at {m['milestone']} opened ({m['ready']} ready): RSS {m['rss_mb']:.0f} MB, "
                           f"PSS {m['pss_mb']:.0f} MB" for m in c["milestones"] if "milestone" in m)
            held = [m for m in c["milestones"] if "holding" in m]
            if held:
                ms += (", " if ms else "") + (f"holding {held[-1]['ready']}: RSS {held[-1]['rss_mb']:.0f} MB, "
                                              f"PSS {held[-1]['pss_mb']:.0f} MB in {held[-1]['processes']} processes")
            print(f"  {name:10} target {c['target']}: {r.get('greeted')} got a 220 "
                  f"({r.get('greeted_in_time')} within {r.get('greeted_within_s')} s), "
                  f"{r.get('ready_and_open_after_hold')} ready and still open after {r.get('hold_s')} s, "
                  f"{r.get('connect_failed')} connects failed; baseline RSS {c['baseline_rss_mb']:.0f} MB, "
                  f"PSS {c['baseline_pss_mb']:.0f} MB"
                  + (f"; {ms}" if ms else ""))
    sys.stdout.flush()


def host_info() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_mb"] = int(f.readline().split()[1]) // 1024
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted
        info["twisted"] = twisted.__version__
    except ImportError:
        pass
    return info


def parse_points(text: str) -> list[tuple[str, int]]:
    points = []
    for item in text.split(","):
        size, _, sessions = item.strip().partition(":")
        if size not in SIZES or not sessions.isdigit() or int(sessions) not in SESSIONS:
            raise argparse.ArgumentTypeError(
                f"bad point {item!r}: want SIZE:SESSIONS with SIZE in {', '.join(SIZES)} "
                f"and SESSIONS in {', '.join(map(str, SESSIONS))}")
        points.append((size, int(sessions)))
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 5 KB, 10 sessions, 1 run, 300 messages; idle connections up to 1,000")
    p.add_argument("--out", default=None, help="output directory (default: a new /tmp/smarthost-bench-*)")
    p.add_argument("--base-port", type=int, default=24000,
                   help="smarthost N..N+2, Postfix N+10..N+12, sink and single hops N+20..N+22 "
                        "(keep them below the ephemeral range, 32768 and up)")
    p.add_argument("--runs", type=int, default=0, help="runs per point (default 3, --quick 1)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every point's message count")
    p.add_argument("--points", type=parse_points, default=None, metavar="SIZE:SESSIONS,...",
                   help="only these points of the chain benchmark, e.g. 5k:10,50k:10 "
                        f"(sizes {', '.join(SIZES)}; sessions {', '.join(map(str, SESSIONS))})")
    p.add_argument("--no-postfix", action="store_true", help="the smarthost side only")
    p.add_argument("--no-concurrency", action="store_true", help="skip the idle-connection test")
    p.add_argument("--no-independent", action="store_true", help="skip the smtp-source comparison")
    p.add_argument("--no-single-hop", action="store_true", help="skip the single-hop comparison")
    return run_bench("bench", p.parse_args(argv), Bench, "smarthost-bench")


if __name__ == "__main__":
    sys.exit(main())
