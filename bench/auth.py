"""AUTH rate on the submissions role (port 465): smarthost's edge against Postfix's smtpd with
Dovecot SASL, side by side in one run, on 127.0.0.1 (as root: Postfix and Dovecot need it).

    python -m bench.auth [--out DIR] [--clients 10] [--auths 400] [--runs 3] [--base-port 24100]
                         [--users 10] [--no-postfix] [--no-sha512]

Every authentication is one connection: TCP connect, the TLS handshake (implicit TLS, no session
resumption), the 220 greeting, EHLO, ``AUTH PLAIN`` with the initial response, 235, QUIT, 221,
the server's close.  ``--clients`` of them run at once (its own process: ``python -m bench.auth
client ...``, asyncio), ``--auths`` per run; the systems alternate, ``--runs`` runs each.

Systems (all on one machine; one Dovecot serves the last two, from one passwd-file):

- ``smarthost/file``: the edge with a submissions listener and its embedded user store
  (``[auth] users_file``, users added with ``smarthost user add --password-stdin``; argon2id
  m=19456 KiB, t=2, p=1 as ``shared.auth.store`` makes them; ``auth.hash_threads`` at its
  default);
- ``smarthost/dovecot``: the same edge with ``[auth] backend = "dovecot"`` at Dovecot's auth
  service over TCP;
- ``postfix/dovecot``: Debian's Postfix, one instance, smtpd in wrapper mode with
  ``smtpd_sasl_type = dovecot``, ``smtpd_sasl_path = inet:`` the same Dovecot listener
  (:class:`bench.postfix.PostfixSubmissions`).

Dovecot (tests/dovecot.py's auth-only configuration, with ``debug=False``: Dovecot's default
logging; ``auth_cache_size`` at its default 0, so every AUTH verifies a hash) holds the same
users twice: ``uN@example.test`` with ``{ARGON2ID}`` and the very hashes of smarthost's user
file (identical parameters: the same work on both sides), and ``sN@example.test`` with
SHA512-CRYPT (``doveadm pw``'s default, 5,000 rounds) for a second pass without the file
backend: what the TLS, SMTP and SASL plumbing costs per AUTH when the hash is cheap.  The
certificate (a self-signed P-256 one from :mod:`shared.tlsutil`) is the same for both servers.

Per run: auth/s (completed AUTHs / time from the first connect to the last close), latency
from connect to the 235 and of the AUTH command alone (p50/p99 over all runs), CPU per AUTH of
each server part from /proc (the edge; Postfix's processes with its master's reaped children;
Dovecot's processes with its master's reaped children), the client's own CPU per AUTH, and the
CPU everything else on the machine used meanwhile (/proc/stat minus the measured processes) and
the load average: the noise each figure was taken under.  Before the runs: the cost of one
verification of the argon2id hash alone, in smarthost's library (argon2-cffi) and in Dovecot's
(``doveadm pw -t``, its CPU less that of verifying a {PLAIN} one).

Prints a table per scheme and writes OUT/auth.json.  Everything it starts is stopped by pid
(Dovecot by its process group) when it ends, on Ctrl-C too.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import secrets
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.load import NoiseWindow, percentile, tier_cpu_seconds
from bench.smarthost import REPO, SmarthostSubmissions, port_free, repo_env, run_bench

DOMAIN = "example.test"
ARGON2_PARAMS = "argon2id m=19456 KiB, t=2, p=1 (shared.auth.store)"
SHA512_PARAMS = "SHA512-CRYPT, 5,000 rounds (doveadm pw's default)"
OK_CODE, LOST = 235, -1


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the client (its own process) -----------------------------------------------------------------

async def _reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def _one(host: str, port: int, context: ssl.SSLContext, user: str, password: str,
               tls_seen: dict) -> tuple:
    """One connection: (t_connect, t_auth_sent, t_235, t_closed, code, error)."""
    t0 = time.monotonic()
    t_auth = t_ok = None
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            if not tls_seen:
                obj = writer.get_extra_info("ssl_object")
                tls_seen.update(version=obj.version(), cipher=obj.cipher()[0])
            code, _ = await _reply(reader)
            if code != 220:
                return t0, None, None, time.monotonic(), code, "greeting"
            writer.write(b"EHLO bench.example.net\r\n")
            code, lines = await _reply(reader)
            if code != 250 or not any(b"AUTH" in l and b"PLAIN" in l for l in lines):
                return t0, None, None, time.monotonic(), code, "EHLO offers no AUTH PLAIN"
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            t_auth = time.monotonic()
            writer.write(b"AUTH PLAIN " + token + b"\r\n")
            code, lines = await _reply(reader)
            t_ok = time.monotonic()
            writer.write(b"QUIT\r\n")
            if code == OK_CODE:
                await _reply(reader)                       # 221
                await asyncio.wait_for(reader.read(), 10)  # the server closes
            return t0, t_auth, t_ok, time.monotonic(), code, None if code == OK_CODE else lines[-1].decode()
        finally:
            writer.close()
    except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as e:
        return t0, t_auth, t_ok, time.monotonic(), LOST, f"{type(e).__name__}: {e}"


async def _client(host: str, port: int, clients: int, auths: int, users: list[str], password: str) -> dict:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE          # a self-signed benchmark certificate
    results: list[tuple] = []
    tls_seen: dict = {}
    counter = iter(range(auths))

    async def worker() -> None:
        for i in counter:
            results.append(await _one(host, port, context, users[i % len(users)], password, tls_seen))
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"results": results, "tls": tls_seen}


def run_client(host: str, port: int, clients: int, auths: int, users: list[str], password: str) -> dict:
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_client(host, port, clients, auths, users, password))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    results = out["results"]
    ok = [r for r in results if r[4] == OK_CODE]
    t_first = min(r[0] for r in results)
    t_last = max(r[3] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        codes[str(r[4])] = codes.get(str(r[4]), 0) + 1
    return {
        "clients": clients, "auths": auths, "ok": len(ok), "codes": codes,
        "errors": sorted({r[5] for r in results if r[5]})[:10], "tls": out["tls"],
        "seconds": t_last - t_first,
        "auth_per_s": len(ok) / (t_last - t_first) if ok else None,
        "to_235_ms": [round((r[2] - r[0]) * 1000, 3) for r in ok],
        "auth_ms": [round((r[2] - r[1]) * 1000, 3) for r in ok],
        "client_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }


# -- the systems -----------------------------------------------------------------------------------

class Part:
    """A measured process group: `pids()` and the pid whose reaped children count too."""

    def __init__(self, pids, master) -> None:
        self.pids, self.master = pids, master

    def cpu(self) -> float:
        return tier_cpu_seconds(self.pids(), self.master())


def dovecot_part(server) -> Part:
    from bench.postfix import descendants
    return Part(lambda: descendants(server.pid) if server.pid else [], lambda: server.pid)


def edge_part(system) -> Part:
    return Part(lambda: system.tier_pids("edge"), lambda: system.master_pid("edge"))


def add_users(config: Path, names: list[str], password: str) -> None:
    """`smarthost user add NAME --password-stdin --config FILE` for each name."""
    for name in names:
        subprocess.run([sys.executable, "-m", "shared.cli", "user", "add", name, "--password-stdin",
                        "--config", str(config)], input=password + "\n", text=True, check=True,
                       cwd=REPO, env=repo_env(), stdout=subprocess.DEVNULL)


def verify_costs(users_file: Path, name: str, password: str, dovecot_config: Path) -> dict:
    """Milliseconds one verification of `name`'s argon2id hash takes here: argon2-cffi's
    (median of 20 on this thread) and Dovecot's libsodium (``doveadm pw -t``, 10 processes'
    CPU less 10 verifying a {PLAIN} hash)."""
    from shared.auth.store import HASHER, UserStore
    hashed = UserStore(str(users_file)).refresh()[name.lower()].hash
    times = []
    for _ in range(20):
        t = time.perf_counter()
        HASHER.verify(hashed, password)
        times.append(time.perf_counter() - t)

    def doveadm_cpu(stored: str) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(10):
            subprocess.run(["doveadm", "-c", str(dovecot_config), "pw", "-t", stored, "-p", password],
                           check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / 10
    dovecot = doveadm_cpu("{ARGON2ID}" + hashed) - doveadm_cpu("{PLAIN}" + password)
    return {"hash": hashed.rsplit("$", 2)[0] + "$...", "argon2_cffi_ms": statistics.median(times) * 1000,
            "argon2_cffi_min_ms": min(times) * 1000, "dovecot_libsodium_cpu_ms": dovecot * 1000}


# -- the benchmark ------------------------------------------------------------------------------

class AuthBench:
    def __init__(self, args) -> None:
        self.a = args
        self.out = Path(args.out).resolve()
        self.started: list = []
        self.dovecot = None
        self.client: subprocess.Popen | None = None
        self.results: dict = {"meta": {}, "verify": None, "schemes": {}}

    def stop_all(self) -> None:
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait()
        while self.started:
            try:
                self.started.pop().stop()
            except Exception as e:            # keep stopping the others
                log(f"error while stopping: {e}")
        if self.dovecot is not None:
            self.dovecot.cleanup()
            self.dovecot = None

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "auth.json").write_text(json.dumps(self.results, indent=1))

    def start(self, system):
        self.started.append(system)
        system.start()
        return system

    def client_run(self, port: int, users: list[str], password: str, auths: int) -> dict:
        argv = [sys.executable, "-m", "bench.auth", "client", "--port", str(port), "--clients",
                str(self.a.clients), "--auths", str(auths), "--users", ",".join(users)]
        self.client = subprocess.Popen(argv, cwd=REPO, env=repo_env(), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        try:
            out, _ = self.client.communicate(password + "\n", timeout=900)
        finally:
            proc, self.client = self.client, None
        if proc.returncode != 0:
            raise RuntimeError(f"bench.auth client exited {proc.returncode}")
        return json.loads(out)

    def measured(self, name: str, port: int, parts: dict[str, Part], users: list[str], password: str,
                 auths: int) -> dict:
        load_before = os.getloadavg()[0]
        window = NoiseWindow()
        before = {p: part.cpu() for p, part in parts.items()}
        r = self.client_run(port, users, password, auths)
        time.sleep(0.2)                              # let the masters reap exited daemons
        after = {p: part.cpu() for p, part in parts.items()}
        cpu = {p: after[p] - before[p] for p in parts}
        ok = r["ok"] or None
        r.update({
            "system": name,
            "cpu_s": cpu,
            "cpu_ms_per_auth": {p: (v * 1000 / ok if ok else None) for p, v in cpu.items()},
            "cpus": {p: v / r["seconds"] for p, v in cpu.items()},      # how busy each part was
            "client_cpu_ms_per_auth": r["client_cpu_s"] * 1000 / ok if ok else None,
            **window.noise(sum(cpu.values())),
            "loadavg_1m_before": load_before,
        })
        return r

    def scheme(self, label: str, params: str, systems: dict, users: list[str], password: str,
               auths: int | None = None) -> None:
        auths = auths or self.a.auths
        entry = self.results["schemes"][label] = {"params": params, "users": len(users), "auths": auths,
                                                  "systems": {}}
        names = list(systems)
        for name in names:                           # warm-up: Postfix's smtpd and Dovecot's workers start
            port, parts = systems[name]
            r = self.client_run(port, users, password, max(20, self.a.clients * 2))
            if r["ok"] != r["auths"]:
                raise RuntimeError(f"{name}: warm-up: {r['ok']} of {r['auths']} authenticated: "
                                   f"{r['codes']} {r['errors']}")
            entry["systems"][name] = {"runs": []}
        for k in range(self.a.runs):
            for name in (names if k % 2 == 0 else names[::-1]):
                port, parts = systems[name]
                r = self.measured(name, port, parts, users, password, auths)
                r["order"] = k
                entry["systems"][name]["runs"].append(r)
                cpu = " + ".join(f"{p} {v:.1f}" for p, v in r["cpu_ms_per_auth"].items() if v is not None)
                busy = ", ".join(f"{p} {v:.2f}" for p, v in r["cpus"].items())
                log(f"  {label} run {k + 1}/{self.a.runs} {name:17}: {fmt(r['auth_per_s'], 1)} auth/s, "
                    f"{r['ok']}/{r['auths']} ok, CPU ms/auth {cpu}, client {fmt(r['client_cpu_ms_per_auth'], 1)}; "
                    f"CPUs busy {busy}; others {r['others_cpus']:.2f} CPUs, load {r['loadavg_1m_before']:.2f}, "
                    f"calibration {r['calibration_ms']:.0f} ms")
                self.save()
        for name in names:
            entry["systems"][name]["summary"] = summarize(entry["systems"][name]["runs"])
        print_scheme(label, entry, self.a)
        self.save()

    def run(self) -> None:
        a = self.a
        from bench.postfix import PostfixSubmissions, ensure_postfix, postfix_version
        from shared.tlsutil import self_signed
        from tests.dovecot import start_dovecot
        t_start = time.monotonic()
        base = a.base_port
        ports = {"smarthost/file": base, "smarthost/dovecot": base + 1, "postfix/dovecot": base + 2,
                 "dovecot": base + 3, "unused next hop": base + 4}
        busy = [p for p in ports.values() if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports in use on 127.0.0.1: {busy}; choose another --base-port")
        self.out.mkdir(parents=True, exist_ok=True)
        self.out.chmod(0o755)
        work = self.out / "work"
        meta = self.results["meta"]
        meta.update({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "ports": ports,
                     "clients": a.clients, "auths_per_run": a.auths, "runs": a.runs, "host": host_info()})
        if not a.no_postfix:
            ensure_postfix()
            meta["host"]["postfix"] = postfix_version()
        cert, key = (str(p) for p in self_signed(work / "tls", "edge.example.test"))
        password = secrets.token_urlsafe(12)
        argon_users = [f"u{i}@{DOMAIN}" for i in range(a.users)]
        sha_users = [f"s{i}@{DOMAIN}" for i in range(a.users)]

        file_edge = SmarthostSubmissions(work / "smarthost-file", ports["smarthost/file"], cert, key,
                                         {"users_file": str(work / "smarthost-file" / "users")},
                                         ports["unused next hop"])
        file_edge.root.mkdir(parents=True, exist_ok=True)
        file_edge._write_configs()
        log(f"bench.auth: {a.users} users in smarthost's store (smarthost user add), argon2id")
        add_users(file_edge.configs["edge"], argon_users, password)
        from shared.auth.store import UserStore
        stored = UserStore(str(work / "smarthost-file" / "users")).refresh()
        hashed = {u: "{ARGON2ID}" + stored[u.lower()].hash for u in argon_users}
        log("bench.auth: starting Dovecot's auth service (the same argon2id hashes; SHA512-CRYPT users)")
        self.dovecot = start_dovecot(self.out / "dovecot", {} if a.no_sha512 else
                                     {u: ("SHA512-CRYPT", password) for u in sha_users},
                                     mechanisms="plain login", port=ports["dovecot"], debug=False,
                                     hashed=hashed)
        meta["host"]["dovecot"] = subprocess.run(["dovecot", "--version"], capture_output=True,
                                                 text=True).stdout.strip()
        self.results["verify"] = verify_costs(work / "smarthost-file" / "users", argon_users[0], password,
                                              self.dovecot.config)
        v = self.results["verify"]
        log(f"bench.auth: one argon2id verification: argon2-cffi {v['argon2_cffi_ms']:.1f} ms "
            f"(min {v['argon2_cffi_min_ms']:.1f}), Dovecot's libsodium {v['dovecot_libsodium_cpu_ms']:.1f} ms CPU")
        dove = dovecot_part(self.dovecot)
        self.start(file_edge)
        dovecot_edge = self.start(SmarthostSubmissions(
            work / "smarthost-dovecot", ports["smarthost/dovecot"], cert, key,
            {"backend": "dovecot", "dovecot": self.dovecot.tcp_address}, ports["unused next hop"]))
        systems = {"smarthost/file": (ports["smarthost/file"], {"edge": edge_part(file_edge)}),
                   "smarthost/dovecot": (ports["smarthost/dovecot"], {"edge": edge_part(dovecot_edge),
                                                                      "dovecot": dove})}
        if not a.no_postfix:
            postfix = self.start(PostfixSubmissions(work / "postfix", ports["postfix/dovecot"], cert, key,
                                                    f"inet:{self.dovecot.tcp_address}"))
            systems["postfix/dovecot"] = (ports["postfix/dovecot"], {"smtpd": edge_part(postfix),
                                                                     "dovecot": dove})
        log(f"bench.auth: argon2id, {a.clients} clients, {a.auths} AUTHs per run, {a.runs} runs per system")
        self.scheme("argon2id", ARGON2_PARAMS, systems, argon_users, password)
        if not a.no_sha512:
            del systems["smarthost/file"]
            log("bench.auth: SHA512-CRYPT in Dovecot (the file backend holds argon2id only)")
            self.scheme("sha512-crypt", SHA512_PARAMS, systems, sha_users, password, a.cheap_auths)
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["duration_s"] = round(time.monotonic() - t_start, 1)
        self.save()
        log(f"bench.auth: results {self.out / 'auth.json'}; took {meta['duration_s']:.0f} s")


def summarize(runs: list[dict]) -> dict:
    to235 = sorted(x for r in runs for x in r["to_235_ms"])
    auth = sorted(x for r in runs for x in r["auth_ms"])
    rates = [r["auth_per_s"] for r in runs if r["auth_per_s"]]
    parts = runs[0]["cpu_ms_per_auth"]
    return {
        "auth_per_s": {"median": statistics.median(rates) if rates else None,
                       "min": min(rates, default=None), "max": max(rates, default=None)},
        "to_235_ms": {"p50": percentile(to235, 50), "p99": percentile(to235, 99)},
        "auth_ms": {"p50": percentile(auth, 50), "p99": percentile(auth, 99)},
        "cpu_ms_per_auth": {p: statistics.median(r["cpu_ms_per_auth"][p] for r in runs) for p in parts},
        "cpus": {p: statistics.median(r["cpus"][p] for r in runs) for p in parts},
        "calibration_ms": {"min": min(r["calibration_ms"] for r in runs),
                           "max": max(r["calibration_ms"] for r in runs)},
        "client_cpu_ms_per_auth": statistics.median(r["client_cpu_ms_per_auth"] for r in runs),
        "others_cpus": {"median": statistics.median(r["others_cpus"] for r in runs),
                        "max": max(r["others_cpus"] for r in runs)},
        "loadavg_1m": {"min": min(r["loadavg_1m_before"] for r in runs),
                       "max": max(r["loadavg_1m_before"] for r in runs)},
        "failed": sum(r["auths"] - r["ok"] for r in runs),
        "tls": runs[0]["tls"],
    }


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_scheme(label: str, entry: dict, a) -> None:
    print(f"\n==== AUTH PLAIN over implicit TLS, one connection each: {label} ({entry['params']}); "
          f"{a.clients} clients, {entry['auths']} AUTHs x {a.runs} runs ====")
    print(f"  {'system':18} {'auth/s (min-max)':>18} {'to 235 ms p50/p99':>18} {'AUTH ms p50/p99':>16} "
          f"{'server CPU ms/auth':>30} {'client ms':>9} {'others CPUs':>11} {'load':>9} {'calib ms':>8}")
    for name, e in entry["systems"].items():
        s = e["summary"]
        rate = s["auth_per_s"]
        cpu = s["cpu_ms_per_auth"]
        parts = " + ".join(f"{p} {v:.1f}" for p, v in cpu.items())
        total = f"{sum(cpu.values()):.1f} ({parts})" if len(cpu) > 1 else parts
        print(f"  {name:18} {fmt(rate['median'], 1):>7} ({fmt(rate['min'], 1)}-{fmt(rate['max'], 1)}) "
              f"{fmt(s['to_235_ms']['p50'], 1):>8}/{fmt(s['to_235_ms']['p99'], 1):<8} "
              f"{fmt(s['auth_ms']['p50'], 1):>7}/{fmt(s['auth_ms']['p99'], 1):<8} {total:>30} "
              f"{s['client_cpu_ms_per_auth']:>9.1f} {s['others_cpus']['median']:>6.2f}/{s['others_cpus']['max']:.2f} "
              f"{s['loadavg_1m']['min']:>4.2f}-{s['loadavg_1m']['max']:.2f} "
              f"{s['calibration_ms']['min']:>3.0f}-{s['calibration_ms']['max']:.0f}"
              + (f"   ({s['failed']} failed)" if s["failed"] else ""))
    print("  CPUs busy (median): " + "; ".join(
        f"{n} " + ", ".join(f"{p} {v:.2f}" for p, v in e["summary"]["cpus"].items())
        for n, e in entry["systems"].items()))
    print("  TLS as negotiated: " + ", ".join(
        f"{n} {e['summary']['tls'].get('version')} {e['summary']['tls'].get('cipher')}"
        for n, e in entry["systems"].items()))
    sys.stdout.flush()


def host_info() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "openssl_python": ssl.OPENSSL_VERSION}
    try:
        from importlib.metadata import version
        info["twisted"] = version("twisted")
        info["argon2_cffi"] = version("argon2-cffi")
    except ImportError:
        pass
    try:
        from OpenSSL import SSL
        info["openssl_edge"] = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    c = sub.add_parser("client", help="the load: AUTHs over implicit TLS (password on stdin)")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--clients", type=int, default=10)
    c.add_argument("--auths", type=int, default=400)
    c.add_argument("--users", required=True, help="comma-separated user names, taken in turn")
    p.add_argument("--out", default=None, help="output directory (default: a new /tmp/smarthost-auth-*)")
    p.add_argument("--clients", type=int, default=10, help="connections at once")
    p.add_argument("--auths", type=int, default=400, help="AUTHs per run (argon2id)")
    p.add_argument("--cheap-auths", type=int, default=2000, help="AUTHs per run (SHA512-CRYPT)")
    p.add_argument("--runs", type=int, default=3, help="runs per system and scheme")
    p.add_argument("--users", type=int, default=10, help="users per scheme")
    p.add_argument("--base-port", type=int, default=24100, help="uses N..N+4 on 127.0.0.1")
    p.add_argument("--no-postfix", action="store_true", help="the smarthost side only")
    p.add_argument("--no-sha512", action="store_true", help="skip the SHA512-CRYPT pass")
    a = p.parse_args(argv)
    if a.mode == "client":
        password = sys.stdin.readline().rstrip("\n")
        r = run_client(a.host, a.port, a.clients, a.auths, a.users.split(","), password)
        sys.stdout.write(json.dumps(r) + "\n")
        return 0
    return run_bench("bench.auth", a, AuthBench, "smarthost-auth", root="Postfix and Dovecot need it")


if __name__ == "__main__":
    sys.exit(main())
