"""Building blocks of the end-to-end tests: tier processes, their configuration
files, network namespaces, senders and Maildir readers.

Everything here starts real processes or changes real network namespaces.
Each start has a stop that the fixtures call from finalizers, by pid or by the
namespace names this module made up (never by a broad name), so a failing test
still cleans up.  Nothing here edits the daemons' code or their demo: the tiers
are run exactly as an administrator runs them, ``python -m shared.cli TIER
--config FILE``.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from shared.config import dump
from tests.support import free_port, wait_until  # noqa: F401  (the tests take them from here)
from shared.tlsutil import self_signed  # noqa: F401  (the tests take it from here)

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DOMAIN = "example.test"
USERS = ("alice", "bob")
HOSTNAMES = {"edge": "edge.example.test", "filter": "filter.example.test", "domain": "domain.example.test"}
CLIENT_HELO = "client.e2e.test"


def child_env() -> dict[str, str]:
    """Environment for every child: the repository importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- waiting and ports ------------------------------------------------------------

def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port P such that P .. P+count-1 are all free right now."""
    for _ in range(attempts):
        base = free_port(host)
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports found on {host}")


# -- TLS ----------------------------------------------------------------------------


# -- configuration files --------------------------------------------------------------

def write_toml(path: Path, tier: str, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(dump(tier, sections))
    return path


def _filter_dns(host: str) -> dict[str, Any]:
    """The filter's DNS: the tests' server on loopback; a filter in a network namespace cannot
    reach it, and runs without the end-of-data checks that need DNS (they have tests of
    their own: tests/filter, tests/integration/test_mailauth.py)."""
    if host == "127.0.0.1":
        from tests.support import test_nameserver
        return {"dns": {"nameservers": [test_nameserver()]}}
    return {"policies": {"default": {"end_of_data": []}}}


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def maildir_of(root: Path, user: str) -> Path:
    """ROOT/DOMAIN/LOCALPART/Maildir, the domain tier's mailbox layout."""
    local, _, domain = user.partition("@")
    return root / "mail" / domain / local / "Maildir"


def write_pipeline_configs(root: Path, listen: dict[str, tuple[str, int]], *,
                           tls: tuple[Path, Path] | None = None,
                           queue: dict[str, Any] | None = None) -> dict[str, Path]:
    """The three tiers' configuration files: edge -> filter -> domain.

    `listen` maps each tier to its (address, port).  The filter accepts XCLIENT
    from the edge's address only, the domain tier from the filter's only.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "log").mkdir(exist_ok=True)
    users = [f"{u}@{DOMAIN}" for u in USERS]
    edge_server: dict[str, Any] = {"hostname": HOSTNAMES["edge"], "listen": [hostport(*listen["edge"])],
                                   "shutdown_timeout": 5, "reverse_lookup": False}
    if tls:
        edge_server.update(tls_cert=str(tls[0]), tls_key=str(tls[1]))
    sections = {
        "edge": {
            "server": edge_server,
            "relay": {"relay_domains": [DOMAIN]},
            "next_hop": {"hosts": [hostport(*listen["filter"])], "tls": "none", "connect_timeout": 5,
                         "command_timeout": 30},
            "log": {"file": str(root / "log" / "edge.log")},
        },
        "filter": {
            "server": {"hostname": HOSTNAMES["filter"], "listen": [hostport(*listen["filter"])],
                       "upstream_hosts": [listen["edge"][0]], "shutdown_timeout": 5,
                       "reverse_lookup": False},
            "relay": {"relay_domains": [DOMAIN]},
            "next_hop": {"hosts": [hostport(*listen["domain"])], "tls": "none", "connect_timeout": 5,
                         "command_timeout": 30},
            "queue": {"directory": str(root / "spool" / "filter"), **(queue or {})},
            "log": {"file": str(root / "log" / "filter.log")},
            **_filter_dns(listen["filter"][0]),
        },
        "domain": {
            "server": {"hostname": HOSTNAMES["domain"], "listen": [hostport(*listen["domain"])],
                       "upstream_hosts": [listen["filter"][0]], "shutdown_timeout": 5,
                       "reverse_lookup": False},
            "mailboxes": {"domains": [DOMAIN], "maildir_root": str(root / "mail"), "users": users,
                          "aliases": {f"postmaster@{DOMAIN}": [users[0]]}},
            "log": {"file": str(root / "log" / "domain.log")},
        },
    }
    return {tier: write_toml(root / f"{tier}.toml", tier, s) for tier, s in sections.items()}


# -- processes ---------------------------------------------------------------------

def _tcp_hex(host: str, port: int) -> str:
    """The local-address column of /proc/net/tcp for an IPv4 socket."""
    packed = ipaddress.IPv4Address(host).packed
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def is_listening(pid: int, host: str, port: int) -> bool:
    """True when process `pid`'s network namespace has a TCP listener on host:port.

    Reads /proc/PID/net/tcp, which shows the namespace the process lives in, so
    it works for daemons inside other network namespaces too.
    """
    wanted = {_tcp_hex(host, port), _tcp_hex("0.0.0.0", port)}
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[1] in wanted:        # 0A: LISTEN
                    return True
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return False
    return False


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class TierProcess:
    """One tier run as `python -m shared.cli TIER --config FILE`, optionally inside a namespace.

    `ip netns exec` replaces itself with the daemon, so the pid we hold is the
    daemon's.  Output the daemon writes outside its log goes to LOG_DIR/TIER.out.
    """

    def __init__(self, tier: str, config: Path, listen: tuple[str, int], log_dir: Path,
                 netns: str | None = None) -> None:
        self.tier, self.config, self.listen, self.netns = tier, config, listen, netns
        self.log_file = log_dir / f"{tier}.log"
        self.out_file = log_dir / f"{tier}.out"
        self.proc: subprocess.Popen | None = None
        self.exit_codes: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.tier} was never started"
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "shared.cli", self.tier, "--config", str(self.config)]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self, timeout: float = 20.0) -> None:
        with open(self.out_file, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        host, port = self.listen
        deadline = time.monotonic() + timeout
        while not is_listening(self.proc.pid, host, port):
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.tier} exited with {self.proc.returncode} before listening\n"
                                     f"{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.tier} did not listen on {host}:{port} within {timeout:.0f} s\n"
                                     f"{self.describe()}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL after `timeout`.  The exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_codes.append(self.proc.returncode)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash.  Waits for the process so the pid is reaped."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.exit_codes.append(self.proc.returncode)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return (f"--- {self.tier} log ({self.log_file}) ---\n{tail(self.log_file)}\n"
                f"--- {self.tier} output ---\n{tail(self.out_file, 20)}")


class Pipeline:
    """Edge, filter and domain processes from one set of configuration files."""

    ORDER = ("domain", "filter", "edge")        # start downstream first

    def __init__(self, root: Path, listen: dict[str, tuple[str, int]], configs: dict[str, Path],
                 netns: dict[str, str] | None = None) -> None:
        self.root, self.listen, self.configs = root, listen, configs
        self.tiers = {t: TierProcess(t, configs[t], listen[t], root / "log", (netns or {}).get(t))
                      for t in self.ORDER}

    def __getitem__(self, tier: str) -> TierProcess:
        return self.tiers[tier]

    def start(self) -> None:
        for t in self.ORDER:
            self.tiers[t].start()

    def stop(self) -> dict[str, int | None]:
        """Stop edge first, then filter, then domain; their exit statuses."""
        return {t: self.tiers[t].stop() for t in reversed(self.ORDER)}

    def maildir(self, user: str) -> Path:
        return maildir_of(self.root, user)

    def describe(self) -> str:
        return "\n".join(self.tiers[t].describe() for t in self.ORDER)


# -- network namespaces ------------------------------------------------------------------

def netns_unavailable() -> str | None:
    """Why the namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns is unavailable: {r.stderr.strip()}"
    return None


class NetnsLab:
    """Hosts in namespaces of their own, wired to one bridge in a namespace of its own.

    Names are PREFIX-HOST (PREFIX carries our pid, so parallel runs never
    share one) plus PREFIX-lan for the bridge.  Host i gets SUBNET.(i+1)/24 on
    its eth0; nothing is connected to the host's own namespace, so the traffic
    never leaves the namespaces made here.
    """

    def __init__(self, prefix: str, hosts: Iterable[str], subnet: str = "10.203.7") -> None:
        self.prefix = prefix
        self.hosts = list(hosts)
        self.ns = {h: f"{prefix}-{h}" for h in self.hosts}
        self.addr = {h: f"{subnet}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.lan = f"{prefix}-lan"
        self.created: list[str] = []

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")

    def up(self) -> None:
        try:
            for name in (self.lan, *self.ns.values()):
                self._ip("netns", "add", name)
                self.created.append(name)
            self._ip("-n", self.lan, "link", "set", "lo", "up")
            self._ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.lan, "link", "set", "br0", "up")
            for host, ns in self.ns.items():
                port = f"p-{host}"[:15]
                self._ip("-n", self.lan, "link", "add", port, "type", "veth",
                         "peer", "name", "eth0", "netns", ns)
                self._ip("-n", self.lan, "link", "set", port, "master", "br0")
                self._ip("-n", self.lan, "link", "set", port, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
        except Exception:
            self.down()
            raise

    def down(self) -> list[str]:
        """Delete every namespace this lab created; the errors, if any."""
        errors = []
        for name in reversed(self.created):
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"ip netns del {name}: {r.stderr.strip()}")
        self.created.clear()
        return errors

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def run(self, host: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(host, argv), cwd=REPO, env=child_env(), capture_output=True,
                              timeout=timeout, **kw)


# -- senders ---------------------------------------------------------------------------

def swaks(host: str, port: int, sender: str, recipient: str, data_file: Path, *, tls: bool = False,
          ca_file: Path | None = None, prefix: list[str] | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess:
    """Send `data_file` with swaks; with `tls`, STARTTLS is required (and verified against `ca_file`).

    swaks dot-stuffs and appends CRLF "." itself, so the file must not end with
    CRLF: the message that arrives is the file's bytes plus CRLF.
    """
    argv = ["swaks", "--server", host, "--port", str(port), "--ehlo", CLIENT_HELO,
            "--from", sender, "--to", recipient, "--data", f"@{data_file}", "--timeout", "30"]
    if tls:
        argv.append("--tls")
        if ca_file:
            argv += ["--tls-verify", "--tls-ca-path", str(ca_file)]
    return subprocess.run([*(prefix or []), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=child_env())


_SWAKS_REPLY = re.compile(r"^(<-|<~|<\*\*|<~\*)\s+(\S.*)$")


def swaks_replies(output: str) -> list[tuple[bool, str]]:
    """The server's reply lines swaks printed, in order: (inside TLS?, line)."""
    matches = (_SWAKS_REPLY.match(line) for line in output.splitlines())
    return [(m.group(1).startswith("<~"), m.group(2)) for m in matches if m]


# -- messages and mailboxes ---------------------------------------------------------------

def compose(tag: str, sender: str, recipient: str, subject: str = "e2e") -> bytes:
    """A message with the lines that stress transparency: leading dots, a lone dot,
    a 998-octet line, trailing white space.  Identified by Message-ID <TAG@e2e.test>."""
    lines = [
        f"From: <{sender}>",
        f"To: <{recipient}>",
        f"Subject: {subject} {tag}",
        f"Message-ID: <{tag}@e2e.test>",
        "X-E2E-Folded: first part",
        "\tsecond part",
        "",
        f"Hello from the {tag} test.",
        ".",
        ".leading dot",
        "..two leading dots",
        "trailing spaces   ",
        "x" * 998,
        "",
        "last line",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def message_id(raw: bytes) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", head)
    return m.group(1).decode("ascii", "replace") if m else None


# What the pipeline writes above the message: trace fields and the filter's results.
_TRACE = re.compile(rb"(?:return-path|received|authentication-results|received-spf|x-spam-score|x-spam-status"
                    rb"|x-spam-flag|dkim-signature)"
                    rb"[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", re.IGNORECASE)


def split_trace(raw: bytes) -> tuple[list[bytes], bytes]:
    """The trace fields (Return-Path, Received) at the top of a delivered message, and the rest."""
    fields, pos = [], 0
    while m := _TRACE.match(raw, pos):
        fields.append(m.group(0))
        pos = m.end()
    return fields, raw[pos:]


def maildir_files(maildir: Path) -> list[Path]:
    out = []
    for sub in ("new", "cur"):
        try:
            out.extend(p for p in (maildir / sub).iterdir() if p.is_file())
        except FileNotFoundError:
            pass
    return sorted(out)


def find_by_message_id(maildir: Path, mid: str) -> list[bytes]:
    found = []
    for p in maildir_files(maildir):
        raw = p.read_bytes()
        if message_id(raw) == mid:
            found.append(raw)
    return found


def wait_for_message(maildir: Path, mid: str, timeout: float = 20.0) -> bytes:
    """The one delivered copy of Message-ID `mid` (fails on none, and on more than one)."""
    copies = wait_until(lambda: find_by_message_id(maildir, mid), timeout, f"{mid} in {maildir}")
    time.sleep(0.2)                     # a duplicate would arrive right behind it
    copies = find_by_message_id(maildir, mid)
    assert len(copies) == 1, f"{mid} delivered {len(copies)} times to {maildir}"
    return copies[0]


def unfold(field: bytes) -> str:
    return re.sub(r"\r\n[ \t]+", " ", field.decode("utf-8", "replace")).strip()


def check_delivered(raw: bytes, sent: bytes, sender: str) -> list[str]:
    """Assert `raw` is `sent` plus the pipeline's trace fields; those fields, unfolded.

    The contract: the domain tier's Return-Path first, then one Received per
    tier, newest first: domain, filter, edge; the filter's results
    (Authentication-Results, Received-SPF, X-Spam-*) between the domain's and the
    filter's Received, where the filter wrote them (returned apart: ``results``).
    """
    trace, rest = split_trace(raw)
    assert rest == sent, ("delivered message differs from what was sent (trace fields removed)\n"
                          f"sent:      {sent[:300]!r}\ndelivered: {rest[:300]!r}")
    everything = [unfold(f) for f in trace]
    fields = [f for f in everything if f.split(":", 1)[0].lower() in ("return-path", "received")]
    results = everything[2:everything.index(fields[2])] if len(fields) > 2 else []
    assert all(not f.lower().startswith(("return-path", "received:")) for f in results), everything
    assert not any(f.lower().startswith("dkim-signature") for f in everything), "unauthenticated mail signed"
    assert len(fields) == 4, f"expected Return-Path and three Received fields, got {fields}"
    assert fields[0] == f"Return-Path: <{sender}>", fields[0]
    for field, tier in zip(fields[1:], ("domain", "filter", "edge")):
        assert field.startswith("Received:") and f" by {HOSTNAMES[tier]} " in field, \
            f"expected the {tier} tier's Received field, got {field!r}"
    return fields


def received_by(fields: list[str], tier: str) -> str:
    return next(f for f in fields if f.startswith("Received:") and f" by {HOSTNAMES[tier]} " in f)
