"""The smarthost side of the benchmark: the three tiers, or the edge alone, as processes.

`SmarthostChain` runs edge -> filter -> domain on 127.0.0.1 exactly as the demo
does (filter and domain configurations from :func:`shared.demo.write_configs`),
each tier its own ``python -m shared.cli TIER --config FILE`` process, logging
at level info to ROOT/log/TIER.log.  The edge's configuration is written here:
the same as the demo's but with connection limits high enough for the
benchmark's idle-connection test (every benchmark client is 127.0.0.1, so the
per-client limit must be lifted too).

`SmarthostEdgeAlone` runs only an edge whose next hop is the benchmark sink
(:mod:`bench.sink`), for the single-hop comparison.

Both expose the interface `bench.run` uses for either system: ``start()``,
``stop()``, ``ports``, ``tier_pids(tier)``, ``master_pid(tier)``,
``queue_empty(tier)``, ``log_path(tier)``; the chain also ``maildir(user)``.
Processes are stopped by pid only: SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.demo import DOMAIN, USERS, write_configs

REPO = Path(__file__).resolve().parent.parent
# Enough for the 10,000 idle connections of the concurrency test (all from 127.0.0.1).
EDGE_MAX_CONNECTIONS = 11000
SPOOL_STATES = ("incoming", "active", "deferred")


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
                max_connections: int = EDGE_MAX_CONNECTIONS) -> str:
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
'''


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

    def start(self, timeout: float = 30.0) -> "_Tiers":
        busy = [f"{t}:{p}" for t, p in self.ports.items() if not port_free(p)]
        if busy:
            raise RuntimeError(f"port already in use on 127.0.0.1: {', '.join(busy)}")
        self._write_configs()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            for tier in self.order:                 # downstream first
                out = open(self.root / "log" / f"{tier}.stderr", "ab")
                self.procs[tier] = subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", tier, "--config", str(self.configs[tier])],
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


class SmarthostChain(_Tiers):
    """edge (base_port) -> filter (base_port+1) -> domain (base_port+2), delivering into Maildir."""

    order = ("domain", "filter", "edge")

    def __init__(self, root, base_port: int, domain: str = DOMAIN, users=USERS) -> None:
        super().__init__(root)
        if domain != DOMAIN or tuple(users) != tuple(USERS):
            raise ValueError(f"shared.demo configures {DOMAIN} with users {USERS}")
        self.domain = domain
        self.users = tuple(users)
        self.ports = {"edge": base_port, "filter": base_port + 1, "domain": base_port + 2}

    def _write_configs(self) -> None:
        self.configs = write_configs(self.root, self.ports["edge"])
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

    def __init__(self, root, port: int, sink_port: int, domain: str = DOMAIN) -> None:
        super().__init__(root)
        self.domain = domain
        self.sink_port = sink_port
        self.ports = {"edge": port}

    def _write_configs(self) -> None:
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        path = self.root / "edge.toml"
        path.write_text(edge_config(self.root, self.ports["edge"], f"127.0.0.1:{self.sink_port}", self.domain))
        self.configs = {"edge": path}
