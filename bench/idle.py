"""10,000 idle sessions held by one edge: its memory on the way, and a fresh client served
meanwhile; Postfix's smtpd beside it (as root).

    python -m bench.idle [--out DIR] [--target 10000] [--milestones 1000,5000,10000]
                         [--base-port 24200] [--no-postfix] [--postfix-target 1000]
                         [--postfix-process-limit N]

The edge alone (:class:`bench.smarthost.SmarthostEdgeAlone`, its mx listener with the role's
defaults, relaying to the fsyncing sink :mod:`bench.sink`) with ``max_connections`` and
``max_connections_per_client`` at ``EDGE_MAX_CONNECTIONS`` (13,000: the edge is under stress
from 80 % of max_connections on, and under stress one client address may hold only
``stress_connections_per_client`` sessions, so 10,000 sessions from 127.0.0.1 need more than
12,500).  RLIMIT_NOFILE is raised here (soft and hard) before anything starts, so the edge (which
lifts its soft limit to the hard one) and the client inherit it (each needs a descriptor per
session; where the hard limit cannot be raised, as in a container without CAP_SYS_RESOURCE, it
must already be above the target).

``python -m bench.load idle`` (its own process) opens the sessions in stages: each reads the
greeting, sends EHLO, reads the reply and then stays idle.  At 0 (after a first message, so that
the edge's connection to the sink and its code paths are warm) and at each milestone this process
reads the edge's RSS, PSS and VmHWM from /proc and sends one 5 KB message as a fresh client
(smtplib: connect, 220, EHLO, MAIL, RCPT, DATA, 250, QUIT), timing its greeting and its 250.
After the last stage the sessions are held ``--hold`` seconds, counted again (still open and
ready), measured and probed once more ("held"), and the edge's log is searched for stress and
refusals.  Per-session memory: (RSS at N -
RSS at 0) / N, and between milestones.

Postfix: one instance relaying to the same sink (:class:`bench.postfix.PostfixSingleHop`) with its
defaults (``default_process_limit = 100``: one smtpd process per session, the 101st client
waits in the listen queue without a greeting), ``--postfix-target`` sessions; summed RSS and PSS
over the instance's processes, the same fresh client (with a 5 s timeout).
``--postfix-process-limit N`` runs it a second time with ``default_process_limit = N`` (not
Postfix's default; said so in the output).

Prints a table per system and writes OUT/idle.json.  Everything it starts is stopped by pid.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from bench import sink
from bench.load import message_body, proc_status_kb, pss_kb, rss_kb
from bench.smarthost import EDGE_MAX_CONNECTIONS, REPO, SmarthostEdgeAlone, port_free, repo_env, run_bench, stop_process

# bench.load's 5 KB message as smtplib wants it: not dot-stuffed, no final ".\r\n"
PROBE_MESSAGE = b"X-Bench-Id: probe\r\n" + message_body(5 * 1024)[:-3].replace(b"\r\n..", b"\r\n.")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def raise_nofile(need: int) -> int:
    """Lift RLIMIT_NOFILE (soft and hard) to at least `need` descriptors per process, as far as
    allowed (raising the hard limit needs CAP_SYS_RESOURCE); the soft limit reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass                                   # keep the hard limit there is
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def probe(port: int, timeout: float) -> dict:
    """One fresh client sending one 5 KB message: milliseconds to the 220 and to the 250."""
    t0 = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.example.net", timeout=timeout) as s:
            t_greet = time.monotonic()
            s.ehlo()
            s.mail("probe@example.net")
            code, _ = s.rcpt("alice@example.test")
            if code != 250:
                raise smtplib.SMTPException(f"RCPT {code}")
            code, reply = s.data(PROBE_MESSAGE)
            t_done = time.monotonic()
        return {"ok": code == 250, "greeting_ms": round((t_greet - t0) * 1000, 1),
                "message_ms": round((t_done - t0) * 1000, 1), "code": code}
    except (OSError, smtplib.SMTPException) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "after_ms": round((time.monotonic() - t0) * 1000)}


def kernel_figures() -> dict:
    """Machine-wide (both ends of every connection): TCP sockets in use and their buffer pages,
    and the kernel's slab, where socket structures live."""
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                tcp = dict(zip(fields[::2], map(int, fields[1::2])))
                out["tcp_inuse"], out["tcp_mem_pages"] = tcp.get("inuse"), tcp.get("mem")
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                out["slab_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def memory(pids: list[int], with_hwm: bool) -> dict:
    m = {"rss_mb": round(rss_kb(pids) / 1024, 1), "pss_mb": round(pss_kb(pids) / 1024, 1), "processes": len(pids)}
    if with_hwm:
        m["vmhwm_mb"] = round(sum(proc_status_kb(p, b"VmHWM:") for p in pids) / 1024, 1)
    return m


class IdleBench:
    def __init__(self, args) -> None:
        self.a = args
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.started: list = []
        self.procs: list[subprocess.Popen] = []
        self.results: dict = {"meta": {}, "systems": {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "idle.json").write_text(json.dumps(self.results, indent=1))

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        while self.started:
            try:
                self.started.pop().stop()
            except Exception as e:
                log(f"error while stopping: {e}")

    def held(self, name: str, system, port: int, target: int, milestones: list[int], probe_timeout: float,
             note: str = "") -> None:
        pids = lambda: system.tier_pids("edge")
        hwm = name == "smarthost"
        entry = self.results["systems"][name] = {"port": port, "target": target, "note": note, "points": []}
        first = probe(port, 30)                      # warms the edge's connection to the sink
        point = {"sessions": 0, "ready": 0, "probe": probe(port, probe_timeout), "first_probe": first,
                 **memory(pids(), hwm), **kernel_figures(), "loadavg_1m": os.getloadavg()[0]}
        entry["points"].append(point)
        log(f"  {name} at 0: {point}")
        argv = [sys.executable, "-m", "bench.load", "idle", "--port", str(port), "--target", str(target),
                "--milestones", ",".join(map(str, milestones)), "--hold", str(self.a.hold),
                "--pause", str(probe_timeout + 3), "--open-time", "300"]
        proc = subprocess.Popen(argv, cwd=REPO, env=repo_env(), stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        try:
            for line in proc.stdout:
                msg = json.loads(line)
                if "milestone" in msg:
                    point = {"sessions": msg["milestone"], "ready": msg["ready"], "open": msg["open"],
                             "attempted": msg["attempted"], "opening_s": msg["seconds"], **memory(pids(), hwm),
                             **kernel_figures(), "loadavg_1m": os.getloadavg()[0]}
                    point["probe"] = probe(port, probe_timeout)
                    entry["points"].append(point)
                    log(f"  {name} at {msg['milestone']}: {point}")
                elif "holding" in msg:
                    entry["holding"] = {**msg, **memory(pids(), hwm)}
                elif "held" in msg:
                    point = {"sessions": "held", "ready": msg["ready"], "open": msg["open"], **memory(pids(), hwm),
                             **kernel_figures(), "loadavg_1m": os.getloadavg()[0], "probe": probe(port, probe_timeout)}
                    entry["points"].append(point)
                    log(f"  {name} after holding {msg['held']} s: {point}")
                elif "result" in msg:
                    entry["result"] = msg["result"]
                else:
                    log(f"  {name}: {msg}")
            proc.wait(timeout=60)
        finally:
            stop_process(proc)
            self.procs.remove(proc)
        for kind in ("rss", "pss"):
            base = entry["points"][0][f"{kind}_mb"]
            for point in entry["points"][1:]:
                n = point["ready"]
                point[f"{kind}_kb_per_session"] = round((point[f"{kind}_mb"] - base) * 1024 / n, 1) if n else None
            for prev, point in zip(entry["points"][1:], entry["points"][2:]):
                n = point["ready"] - prev["ready"]
                point[f"{kind}_kb_per_session_step"] = (round((point[f"{kind}_mb"] - prev[f"{kind}_mb"]) * 1024 / n, 1)
                                                        if n else None)
        if hwm:
            text = system.log_path("edge").read_text(errors="replace")
            entry["log"] = {"under_stress": text.count("under stress"),
                            "too_many_connections": text.count("too many connections")}
        self.save()

    def run(self) -> None:
        from bench.run import host_info
        a = self.a
        base = a.base_port
        ports = {"smarthost": base, "postfix": base + 1, "sink": base + 2}
        busy = [p for p in ports.values() if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports in use on 127.0.0.1: {busy}; choose another --base-port")
        nofile = raise_nofile(max(a.target, a.postfix_target) + 1000)   # each side: a descriptor a session
        if nofile < a.target + 200:
            raise RuntimeError(f"RLIMIT_NOFILE is {nofile}, too few for {a.target} sessions (each side)")
        milestones = [int(m) for m in a.milestones.split(",") if int(m) <= a.target]
        self.results["meta"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
                                "ports": ports, "nofile": nofile, "max_connections": EDGE_MAX_CONNECTIONS,
                                "host": host_info()}
        self.out.mkdir(parents=True, exist_ok=True)
        self.out.chmod(0o755)
        self.procs.append(sink.spawn(ports["sink"], self.work / "sink"))
        log(f"bench.idle: RLIMIT_NOFILE {nofile}; smarthost edge, max_connections {EDGE_MAX_CONNECTIONS}, "
            f"target {a.target}")
        edge = SmarthostEdgeAlone(self.work / "smarthost", ports["smarthost"], ports["sink"])
        self.started.append(edge)
        edge.start()
        self.held("smarthost", edge, ports["smarthost"], a.target, milestones, a.probe_timeout)
        self.started.remove(edge)
        edge.stop()
        if not a.no_postfix:
            from bench.postfix import PostfixSingleHop, ensure_postfix, postfix_version
            ensure_postfix()
            self.results["meta"]["host"]["postfix"] = postfix_version()
            runs = [("postfix", [], "Postfix's defaults (default_process_limit = 100)")]
            if a.postfix_process_limit:
                n = a.postfix_process_limit
                runs.append((f"postfix-limit-{n}",
                             [("default_process_limit", str(n), "not Postfix's default: the benchmark raises it")],
                             f"default_process_limit = {n} (NOT Postfix's default)"))
            for name, settings, note in runs:
                log(f"bench.idle: {name}: {note}, target {a.postfix_target}")
                pf = PostfixSingleHop(self.work / name, ports["postfix"], ports["sink"], settings=settings)
                self.started.append(pf)
                pf.start()
                marks = sorted({m for m in (100, 1000, 5000) if m < a.postfix_target} | {a.postfix_target})
                self.held(name, pf, ports["postfix"], a.postfix_target, marks, 5.0, note)
                self.started.remove(pf)
                pf.stop()
        self.results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        print_results(self.results)


def print_results(results: dict) -> None:
    for name, e in results["systems"].items():
        r = e.get("result", {})
        print(f"\n==== {name}: idle sessions (greeting + EHLO, then idle), target {e['target']}"
              + (f"; {e['note']}" if e["note"] else "") + " ====")
        print(f"  {'sessions':>8} {'ready':>6} {'RSS MB':>7} {'PSS MB':>7} {'procs':>5} {'KB/session RSS (step)':>22} "
              f"{'PSS (step)':>16} {'fresh client 220/250 ms':>24} {'load':>5}")
        for p in e["points"]:
            pr = p["probe"]
            fresh = (f"{pr['greeting_ms']:.0f}/{pr['message_ms']:.0f}" if pr.get("ok")
                     else f"not served ({pr.get('error', pr.get('code'))})"[:40])
            per = {k: f"{p.get(k + '_kb_per_session') or '-'} ({p.get(k + '_kb_per_session_step') or '-'})"
                   for k in ("rss", "pss")}
            print(f"  {p['sessions']:>8} {p['ready']:>6} {p['rss_mb']:>7.0f} {p['pss_mb']:>7.0f} {p['processes']:>5} "
                  f"{per['rss']:>22} {per['pss']:>16} {fresh:>24} {p['loadavg_1m']:>5.2f}")
        print(f"  after holding {r.get('hold_s')} s: {r.get('ready_and_open_after_hold')} ready and open of "
              f"{r.get('attempted')} attempted, {r.get('connect_failed')} connects failed, "
              f"{r.get('lost_after_ready')} closed by the server; refused {r.get('refused')}"
              + (f"; log: {e['log']}" if "log" in e else "")
              + (f"; VmHWM {e['holding']['vmhwm_mb']:.0f} MB" if "vmhwm_mb" in e.get("holding", {}) else ""))
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a new /tmp/smarthost-idle-*)")
    p.add_argument("--target", type=int, default=10_000, help="idle sessions at the smarthost edge")
    p.add_argument("--milestones", default="1000,5000,10000")
    p.add_argument("--hold", type=float, default=10.0, help="seconds the sessions are held at the end")
    p.add_argument("--probe-timeout", type=float, default=10.0, help="seconds the fresh client waits (smarthost)")
    p.add_argument("--base-port", type=int, default=24200, help="smarthost N, Postfix N+1, sink N+2")
    p.add_argument("--no-postfix", action="store_true")
    p.add_argument("--postfix-target", type=int, default=1000, help="idle sessions at Postfix's smtpd")
    p.add_argument("--postfix-process-limit", type=int, default=0,
                   help="also run Postfix with default_process_limit = N (not its default)")
    return run_bench("bench.idle", p.parse_args(argv), IdleBench, "smarthost-idle",
                     root="Postfix needs it; so does raising RLIMIT_NOFILE")


if __name__ == "__main__":
    sys.exit(main())
