"""The smarthost side of the benchmark: the three tiers, or the edge alone, as processes.

`SmarthostChain` runs edge -> filter -> domain on 127.0.0.1 exactly as the demo
does (filter and domain configurations from :func:`shared.demo.write_configs`),
each tier its own ``python -m shared.cli TIER --config FILE`` process, logging
at level info to ROOT/log/TIER.log.  The edge's configuration is written here:
the same as the demo's but with connection limits high enough for the
benchmark's idle-connection test (every benchmark client is 127.0.0.1, so the
per-client limit must be lifted too).

`SmarthostEdgeAlone` runs only an edge whose next hop is the benchmark sink
(:mod:`bench.sink`), for the single-hop comparison, the idle sessions
(:mod:`bench.idle`) and the firewall's cost (:mod:`bench.firewall`), optionally
with ``[firewall] rules``.  `SmarthostSubmissions` runs an edge with only a
submissions listener (port 465's role: implicit TLS, AUTH) for :mod:`bench.auth`.

Both expose the interface `bench.run` uses for either system: ``start()``,
``stop()``, ``ports``, ``tier_pids(tier)``, ``master_pid(tier)``,
``queue_empty(tier)``, ``log_path(tier)``; the chain also ``maildir(user)``.
Processes are stopped by pid only: SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.config import dump
from shared.demo import DOMAIN, USERS, sections, write_configs

REPO = Path(__file__).resolve().parent.parent
# Enough for the 10,000 idle connections of the concurrency test (all from 127.0.0.1) and a few
# more clients, below the stress threshold: the edge is under stress from 80 % of max_connections
# on (shared.transport.server.SessionTable), and then lets one client hold at most
# stress_connections_per_client sessions and gives idle ones 10 s: 10,000 sessions need more
# than 12,500 (with 11,000 or 12,000, stress starts at 8,800 or 9,600 and refuses the rest).
EDGE_MAX_CONNECTIONS = 13000
SPOOL_STATES = ("incoming", "active", "deferred")


def repo_env() -> dict:
    """The environment for a child that must import this worktree's code (PYTHONPATH first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to `proc` (by its pid), SIGKILL after `grace` seconds; waits for it."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class Stop(Exception):
    """SIGTERM: unwind like Ctrl-C so that everything started gets stopped."""


def run_then_stop(name: str, run, stop) -> int:
    """`run()`, then `stop()` whatever happens (Ctrl-C and SIGTERM too: 130; stopping is not
    interrupted again); 0 when `run()` returned."""
    def on_term(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        run()
    except (KeyboardInterrupt, Stop):
        print(f"{name}: interrupted; stopping everything it started", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop()
    return 0


def run_bench(name: str, args, make, prefix: str, root: str = "") -> int:
    """A benchmark's main: ``args.out`` defaults to a new /tmp/PREFIX-DATE-*; `make(args)`
    builds the benchmark, whose ``run()`` runs, then ``stop_all()`` and ``save()``.  With
    `root` (why), it refuses to run as anyone but root (exit 2)."""
    if root and os.geteuid() != 0:
        print(f"{name}: run as root ({root})", file=sys.stderr)
        return 2
    if args.out is None:
        import tempfile
        args.out = tempfile.mkdtemp(prefix=time.strftime(f"{prefix}-%Y%m%d-%H%M%S-"), dir="/tmp")
    bench = make(args)
    return run_then_stop(name, bench.run, lambda: (bench.stop_all(), bench.save()))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind host:port now (as the servers do, with SO_REUSEADDR):
    false too when a client connection uses it as its ephemeral port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def edge_config(root: Path, port: int, next_hop: str, domain: str = DOMAIN,
                max_connections: int = EDGE_MAX_CONNECTIONS, firewall: tuple[str, ...] = ()) -> str:
    rules = f"[firewall]\nrules = [{', '.join(json.dumps(r) for r in firewall)}]\n" if firewall else ""
    return f'''tier = "edge"
[server]
hostname = "edge.example.test"
listen = ["127.0.0.1:{port}"]
shutdown_timeout = 5
reverse_lookup = false
max_connections = {max_connections}
max_connections_per_client = {max_connections}
[relay]
relay_domains = ["{domain}"]
[next_hop]
hosts = ["{next_hop}"]
tls = "none"
[log]
level = "info"
file = "{root / 'log' / 'edge.log'}"
{rules}'''


class _Tiers:
    """Tier processes started from config files, stopped by pid."""

    order: tuple[str, ...] = ()

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.configs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def _write_configs(self) -> None:
        raise NotImplementedError

    def launcher(self, tier: str) -> list[str]:
        """What runs a tier, after the interpreter: ``-m shared.cli`` (then TIER --config FILE)."""
        return ["-m", "shared.cli"]

    def start(self, timeout: float = 30.0) -> "_Tiers":
        busy = [f"{t}:{p}" for t, p in self.ports.items() if not port_free(p)]
        if busy:
            raise RuntimeError(f"port already in use on 127.0.0.1: {', '.join(busy)}")
        self._write_configs()
        env = repo_env()
        try:
            for tier in self.order:                 # downstream first
                out = open(self.root / "log" / f"{tier}.stderr", "ab")
                self.procs[tier] = subprocess.Popen(
                    [sys.executable, *self.launcher(tier), tier, "--config", str(self.configs[tier])],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True)         # Ctrl-C reaches us only; we stop them by pid
                out.close()
            deadline = time.monotonic() + timeout
            while not all(port_open(p) for p in self.ports.values()):
                dead = [t for t, p in self.procs.items() if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    why = f"{', '.join(dead)} exited" if dead else "not listening in time"
                    raise RuntimeError(f"smarthost: {why}; see {self.root / 'log'}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def tier_pids(self, tier: str) -> list[int]:
        p = self.procs.get(tier)
        return [p.pid] if p is not None and p.poll() is None else []

    def master_pid(self, tier: str) -> int | None:
        """The tier's one process (smarthost has no master/children split)."""
        pids = self.tier_pids(tier)
        return pids[0] if pids else None

    def log_path(self, tier: str) -> Path:
        return self.root / "log" / f"{tier}.log"

    def queue_empty(self, tier: str) -> bool:
        return True                                  # only the filter keeps a queue


def merge_sections(base: dict, extra: dict) -> dict:
    """`base` (a tier's TOML tables) with `extra` merged in: tables merge key by key, any
    other value of `extra` replaces the base's."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = value
    return out


class SmarthostChain(_Tiers):
    """edge (base_port) -> filter (base_port+1) -> domain (base_port+2), delivering into Maildir.

    `extra` maps "filter" or "domain" to TOML tables merged into that tier's demo
    configuration (e.g. ``{"filter": {"dns": {"nameservers": ["127.0.0.1:5353"]}}}``)."""

    order = ("domain", "filter", "edge")

    def __init__(self, root, base_port: int, domain: str = DOMAIN, users=USERS,
                 extra: dict[str, dict] | None = None) -> None:
        super().__init__(root)
        self.extra = dict(extra or {})
        if set(self.extra) - {"filter", "domain"}:
            raise ValueError(f"extra settings for {sorted(self.extra)}: only filter and domain take them")
        if domain != DOMAIN or tuple(users) != tuple(USERS):
            raise ValueError(f"shared.demo configures {DOMAIN} with users {USERS}")
        self.domain = domain
        self.users = tuple(users)
        self.ports = {"edge": base_port, "filter": base_port + 1, "domain": base_port + 2}

    def _write_configs(self) -> None:
        self.configs = write_configs(self.root, self.ports["edge"])
        if self.extra:
            tls = self.root / "tls"         # write_configs made the demo's certificate there
            demo = sections(self.root, self.ports["edge"], str(tls / "cert.pem"), str(tls / "key.pem"))
            for tier, tables in self.extra.items():
                self.configs[tier].write_text(dump(tier, merge_sections(demo[tier], tables)))
        self.configs["edge"].write_text(edge_config(self.root, self.ports["edge"],
                                                    f"127.0.0.1:{self.ports['filter']}", self.domain))

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / self.domain / user / "Maildir"

    def queue_empty(self, tier: str) -> bool:
        if tier != "filter":
            return True
        spool = self.root / "spool" / "filter"
        for state in SPOOL_STATES:
            try:
                with os.scandir(spool / state) as it:
                    if any(True for _ in it):
                        return False
            except FileNotFoundError:
                pass
        return True


class SmarthostEdgeAlone(_Tiers):
    """One edge on `port` relaying to the sink on `sink_port` (no queue: 250 = the sink's 250)."""

    order = ("edge",)

    def __init__(self, root, port: int, sink_port: int, domain: str = DOMAIN,
                 firewall: tuple[str, ...] = (), gc_stats: bool = False, gc_freeze: bool = False,
                 prebuild: str = "") -> None:
        super().__init__(root)
        self.domain = domain
        self.sink_port = sink_port
        self.firewall = tuple(firewall)
        self.gc_stats, self.gc_freeze, self.prebuild = gc_stats or gc_freeze or bool(prebuild), gc_freeze, prebuild
        self.ports = {"edge": port}

    @property
    def gc_file(self) -> Path:
        """Where bench.gcstats writes the edge's collector figures (with gc_stats)."""
        return self.root / "gc.json"

    def launcher(self, tier: str) -> list[str]:
        if not self.gc_stats:
            return super().launcher(tier)
        return ["-m", "bench.gcstats", str(self.gc_file), *(["--freeze"] if self.gc_freeze else []),
                *(["--prebuild", self.prebuild] if self.prebuild else []), "--"]

    def gc_now(self) -> dict:
        """The edge's collector figures so far (bench.gcstats: collections and seconds per
        generation, tracked objects)."""
        mtime = self.gc_file.stat().st_mtime_ns if self.gc_file.exists() else 0
        os.kill(self.procs["edge"].pid, signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.gc_file.exists() and self.gc_file.stat().st_mtime_ns != mtime:
                return json.loads(self.gc_file.read_text())
            time.sleep(0.01)
        raise RuntimeError(f"the edge wrote no {self.gc_file}")

    def freeze(self) -> None:
        """gc.freeze() in the edge now (with gc_freeze)."""
        os.kill(self.procs["edge"].pid, signal.SIGUSR1)

    def _write_configs(self) -> None:
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        path = self.root / "edge.toml"
        path.write_text(edge_config(self.root, self.ports["edge"], f"127.0.0.1:{self.sink_port}", self.domain,
                                    firewall=self.firewall))
        self.configs = {"edge": path}


class SmarthostSubmissions(_Tiers):
    """An edge with one listener, role submissions (implicit TLS with `cert`/`key`, AUTH
    required), on `port`; `auth` is its [auth] section (the file backend's users_file, or
    backend = "dovecot").  Its next hop is `next_hop_port`, where nothing need listen: the
    edge connects there only at a client's first MAIL."""

    order = ("edge",)

    def __init__(self, root, port: int, cert: str, key: str, auth: dict, next_hop_port: int) -> None:
        super().__init__(root)
        self.cert, self.key, self.auth = cert, key, dict(auth)
        self.next_hop_port = next_hop_port
        self.ports = {"edge": port}

    def config_text(self) -> str:
        return dump("edge", {
            "server": {"hostname": "edge.example.test", "tls_cert": self.cert, "tls_key": self.key,
                       "reverse_lookup": False, "shutdown_timeout": 5},
            "listeners": {"submissions": {"endpoint": f"tcp:port={self.ports['edge']}:interface=127.0.0.1",
                                          "role": "submissions"}},
            "auth": self.auth,
            "relay": {"relay_domains": [DOMAIN]},
            "next_hop": {"hosts": [f"127.0.0.1:{self.next_hop_port}"], "tls": "none"},
            "log": {"level": "info", "file": str(self.root / "log" / "edge.log")},
        })

    def _write_configs(self) -> None:
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        path = self.root / "edge.toml"
        path.write_text(self.config_text())
        self.configs = {"edge": path}
