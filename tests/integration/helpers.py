"""Building blocks of the integration tests: tier processes on loopback, their
configuration files, a raw SMTP client and Maildir readers.

Each tier runs exactly as an administrator runs it, ``python -m shared.cli TIER
--config FILE``, as its own process on free 127.0.0.1 ports, with its log in a
file the tests read.  A :class:`Tier` is stopped by its pid (SIGTERM, then
SIGKILL after a timeout); the fixtures in ``conftest.py`` do that in finalizers,
so a failing test never leaves a daemon behind.

Configuration overrides are tables ``{section: {key: value}}`` (a value of None
removes the key) or TOML text such as ``"[queue]\\nretry_min = 1"``; they are
merged over the defaults of :func:`default_sections`.
"""
from __future__ import annotations

import email
import email.policy
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from shared.config import dump
from tests.support import free_port, test_nameserver, wait_until  # noqa: F401  (the tests take them from here)
from shared.smtp.reply import Reply
from shared.tlsutil import self_signed  # noqa: F401  (the tests take it from here)

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DOMAIN = "example.test"
OTHER_DOMAIN = "other.test"          # hosted by the domain tier, relayed by nobody until a reload
USERS = ("alice", "bob")
HOSTNAMES = {"edge": "edge.example.test", "filter": "filter.example.test", "domain": "domain.example.test"}
TIERS = ("domain", "filter", "edge")   # start order: downstream first
QID = r"[0-9A-HJKMNP-TV-Z]{21}"         # shared.ids: 21 characters of Crockford base32

Overrides = dict[str, dict[str, Any]] | str | None


# -- small utilities ------------------------------------------------------------------

def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def smarthost(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the `smarthost` command (``python -m shared.cli ARGS``) and capture its output."""
    return subprocess.run([PYTHON, "-m", "shared.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# -- configuration ---------------------------------------------------------------------

def render_toml(tier: str, sections: dict[str, dict[str, Any]]) -> str:
    return dump(tier, sections)


def merge(base: dict[str, dict[str, Any]], overrides: Overrides) -> dict[str, dict[str, Any]]:
    """`base` with `overrides` applied per key; None removes a key."""
    if isinstance(overrides, str):
        overrides = tomllib.loads(overrides)
    out = {section: dict(keys) for section, keys in base.items()}
    for section, keys in (overrides or {}).items():
        target = out.setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return out


def default_sections(tier: str, root: Path, ports: dict[str, int],
                     tls: tuple[Path, Path] | None) -> dict[str, dict[str, Any]]:
    """A tier's test configuration: loopback, plaintext between tiers, short timeouts.

    The filter trusts XCLIENT from 127.0.0.1 (the edge), the domain tier from
    127.0.0.1 (the filter).  No tier looks up reverse names here: without
    `dns.nameservers` that would ask the machine's own resolver, and tests
    send nothing beyond loopback (test_reverse_dns.py points at its own server).  The
    filter's content checks (SPF, DKIM, DMARC) ask the tests' DNS server
    (:func:`tests.support.test_nameserver`).  The filter's retries are slow (60 s), so a deferred
    message stays deferred unless a test flushes it or overrides the queue.
    """
    log = {"file": str(root / "log" / f"{tier}.log")}
    nh = {"tls": "none", "connect_timeout": 3, "command_timeout": 20}
    if tier == "edge":
        server = {"hostname": HOSTNAMES["edge"], "listen": [f"127.0.0.1:{ports['edge']}"],
                  "shutdown_timeout": 10, "command_timeout": 30, "reverse_lookup": False}
        if tls:
            server.update(tls_cert=str(tls[0]), tls_key=str(tls[1]))
        return {"server": server, "relay": {"relay_domains": [DOMAIN]},
                "next_hop": {"hosts": [f"127.0.0.1:{ports['filter']}"], **nh}, "log": log}
    if tier == "filter":
        return {"server": {"hostname": HOSTNAMES["filter"], "listen": [f"127.0.0.1:{ports['filter']}"],
                           "upstream_hosts": ["127.0.0.1"], "shutdown_timeout": 10, "reverse_lookup": False},
                "dns": {"nameservers": [test_nameserver()]},
                "relay": {"relay_domains": [DOMAIN]},
                "next_hop": {"hosts": [f"127.0.0.1:{ports['domain']}"], **nh},
                "queue": {"directory": str(root / "spool" / "filter"), "retry_min": 60, "retry_max": 600},
                "log": log}
    users = [f"{u}@{DOMAIN}" for u in USERS] + [f"carol@{OTHER_DOMAIN}"]
    return {"server": {"hostname": HOSTNAMES["domain"], "listen": [f"127.0.0.1:{ports['domain']}"],
                       "upstream_hosts": ["127.0.0.1"], "shutdown_timeout": 10, "reverse_lookup": False},
            "mailboxes": {"domains": [DOMAIN, OTHER_DOMAIN], "maildir_root": str(root / "mail"),
                          "users": users, "aliases": {f"postmaster@{DOMAIN}": [users[0]]}},
            "log": log}


# -- a tier as a process ------------------------------------------------------------------

class Tier:
    """One tier's configuration file and process."""

    def __init__(self, name: str, root: Path, port: int, sections: dict[str, dict[str, Any]]) -> None:
        self.name = name
        self.root = root
        self.port = port
        self.sections = sections
        self.config_path = root / f"{name}.toml"
        self.log_path = root / "log" / f"{name}.log"
        self.output_path = root / "log" / f"{name}.out"    # the process's stdout and stderr
        self.proc: subprocess.Popen | None = None
        self._log_mark = 0
        self.write_config()

    # configuration
    def write_config(self, overrides: Overrides = None) -> Path:
        """Write the configuration (the current one with `overrides` applied)."""
        self.sections = merge(self.sections, overrides)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_toml(self.name, self.sections))
        return self.config_path

    # process
    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True, timeout: float = 15) -> "Tier":
        assert not self.running, f"{self.name} is already running"
        self._log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "shared.cli", self.name, "--config", str(self.config_path)],
                                         cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = 15) -> None:
        """Until this start's log says the tier started and its port accepts connections."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} while starting:\n"
                                     f"{self.output_text()}\n{self.log_tail()}")
            return f"{self.name} started:" in self.log_text(since_start=True)
        wait_until(ready, timeout, f"{self.name} to start")
        wait_until(lambda: port_accepts(self.port), timeout, f"{self.name} to accept on port {self.port}")

    def signal(self, sig: int) -> None:
        assert self.running, f"{self.name} is not running"
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; the exit code (negative: killed by a signal)."""
        if self.proc is None:
            raise AssertionError(f"{self.name} was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> int:
        """SIGKILL (a crash); the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=15)

    def restart(self, timeout: float = 15) -> int:
        """Stop (SIGTERM) and start again; the stopped process's exit code."""
        code = self.stop(timeout)
        self.start(timeout=timeout)
        return code

    # output
    def log_text(self, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[self._log_mark:]
        return data.decode("utf-8", "replace")

    def log_lines(self, containing: str = "") -> list[str]:
        return [ln for ln in self.log_text().splitlines() if containing in ln]

    def wait_log(self, pattern: str, timeout: float = 10, since: int = 0) -> re.Match:
        """The first match of regex `pattern` in the log (from byte offset `since`)."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log_text()[since:]), timeout,
                          f"{self.name} log to match {pattern!r}")

    def log_size(self) -> int:
        return len(self.log_text())

    def output_text(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(tail)

    # queue administration (filter)
    def queue(self, *args: str) -> subprocess.CompletedProcess:
        return smarthost("queue", *args, "--config", str(self.config_path))


class Pipeline:
    """Edge -> filter -> domain on 127.0.0.1, each tier its own process."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None, *, edge: Overrides = None,
                 filter: Overrides = None, domain: Overrides = None) -> None:
        self.root = root
        self.ports = {t: free_port() for t in TIERS}
        overrides = {"edge": edge, "filter": filter, "domain": domain}
        self.tiers = {t: Tier(t, root, self.ports[t], merge(default_sections(t, root, self.ports, tls), overrides[t]))
                      for t in TIERS}

    @property
    def edge(self) -> Tier:
        return self.tiers["edge"]

    @property
    def filter(self) -> Tier:
        return self.tiers["filter"]

    @property
    def domain(self) -> Tier:
        return self.tiers["domain"]

    def add_edge(self, key: str, overrides: Overrides = None) -> Tier:
        """Another edge node in front of the same filter, ``tiers[key]``: the first edge's
        settings with its own port, directory and log, and `overrides`.  Not started;
        stopped with the pipeline by the fixtures."""
        root, port = self.root / key, free_port()
        own = {"server": {"listen": [f"127.0.0.1:{port}"]}, "log": {"file": str(root / "log" / "edge.log")}}
        self.tiers[key] = Tier("edge", root, port, merge(merge(self.edge.sections, own), overrides))
        return self.tiers[key]

    def start(self, tiers: Iterable[str] = TIERS) -> "Pipeline":
        for t in TIERS:
            if t in tiers:
                self.tiers[t].start()
        return self

    def stop(self) -> dict[str, int]:
        return {t: self.tiers[t].stop() for t in reversed(TIERS) if self.tiers[t].proc is not None}

    def maildir(self, user: str) -> Path:
        local, _, domain = user.partition("@")
        return self.root / "mail" / domain / local / "Maildir"

    def messages(self, user: str) -> list[Path]:
        """Files in the user's Maildir new/, oldest first."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))

    def wait_messages(self, user: str, count: int, timeout: float = 10) -> list[Path]:
        def enough():
            found = self.messages(user)
            return found if len(found) >= count else None
        return wait_until(enough, timeout, f"{count} message(s) in {user}'s Maildir")

    def describe(self) -> str:
        return "\n".join(t.log_tail() for t in self.tiers.values() if t.proc is not None)


# -- a raw SMTP client -------------------------------------------------------------------

class SMTPError(AssertionError):
    pass


def client_tls(certificate: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A TLS client context that takes any server certificate, presenting `certificate`
    (cert, key) when the server asks for one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        ctx.load_cert_chain(*certificate)
    return ctx


class Client:
    """A line-level SMTP client on a plain socket: nothing is hidden or reordered.

    ``implicit_tls``: TLS from the first byte (port 465), asking for `server_name` by
    SNI and presenting `certificate` (see :func:`client_tls`), as :meth:`starttls` does."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20,
                 source: str | None = None, *, implicit_tls: bool = False, server_name: str | None = None,
                 certificate: tuple[Path, Path] | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if implicit_tls:
            self.sock = client_tls(certificate).wrap_socket(self.sock, server_hostname=server_name)
        self.buf = b""
        self.timeout = timeout
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SMTPError(f"connection closed by the server (pending: {self.buf!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        """The next (possibly multiline) reply."""
        lines = [self._line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self._line())
        return Reply.parse_lines(lines)

    def cmd(self, line: str) -> Reply:
        self.send(line + "\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.example.net") -> Reply:
        r = self.cmd(f"EHLO {name}")
        if r.code != 250:
            raise SMTPError(f"EHLO refused: {r}")
        return r

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever the server sends within `wait` seconds without being asked."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        return self.buf

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(self.timeout)

    def starttls(self, server_name: str | None = None, certificate: tuple[Path, Path] | None = None) -> None:
        """Wrap the socket in TLS (after a 220 to STARTTLS), asking for `server_name` by SNI
        and presenting `certificate` if asked; any plaintext already read is an error."""
        if self.buf:
            raise SMTPError(f"plaintext after the 220 to STARTTLS: {self.buf!r}")
        self.sock = client_tls(certificate).wrap_socket(self.sock, server_hostname=server_name)

    def server_certificate(self) -> bytes:
        """The DER certificate the server presented in this connection's TLS handshake."""
        return self.sock.getpeercert(binary_form=True)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def message(subject: str = "integration", *, sender: str = "sender@example.net",
            to: str = f"alice@{DOMAIN}", extra_headers: Iterable[str] = (), body: str = "hello\r\n") -> bytes:
    """A small RFC 5322 message with CRLF line ends (not dot-stuffed)."""
    headers = [*extra_headers, f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}",
               f"Message-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@example.net>"]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def transaction(port: int, sender: str, recipients: list[str], data: bytes, *,
                helo: str = "client.example.net") -> list[Reply]:
    """One whole transaction, command by command; the replies up to the first refusal
    of MAIL or DATA (RCPT refusals are collected and DATA still tried if one RCPT passed)."""
    replies = []
    with Client(port) as c:
        c.ehlo(helo)
        r = c.cmd(f"MAIL FROM:<{sender}>")
        replies.append(r)
        if r.code != 250:
            return replies
        for rcpt in recipients:
            replies.append(c.cmd(f"RCPT TO:<{rcpt}>"))
        if not any(r.code == 250 for r in replies[1:]):
            return replies
        r = c.cmd("DATA")
        replies.append(r)
        if r.code != 354:
            return replies
        c.send(dot_stuff(data) + b".\r\n")
        replies.append(c.reply())
        c.cmd("QUIT")
    return replies


def dot_stuff(data: bytes) -> bytes:
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def queued_id(reply: Reply) -> str:
    """The queue id in a "250 ... queued as QID" reply."""
    m = re.search(rf"queued as ({QID})", reply.text)
    if reply.code != 250 or not m:
        raise SMTPError(f"not a 'queued as' reply: {reply}")
    return m.group(1)


def parse_mail(path: Path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)


def received_by(path: Path, tier: str) -> str:
    """The (unfolded) value of the Received header field the tier added to a delivered message."""
    for field in parse_mail(path).get_all("Received"):
        text = " ".join(field.split())
        if f" by {HOSTNAMES[tier]} " in text:
            return text
    raise AssertionError(f"no Received header by the {tier} tier in {path}")


# -- an outside component stopped under load ----------------------------------------------

@dataclass
class Sent:
    """One message of :func:`send_under_load`: its Message-ID and the client's last reply
    (None: the connection failed), and whether it was sent after the outage began."""
    mid: str
    reply: Reply | None
    after_outage: bool

    @property
    def code(self) -> int | None:
        return self.reply.code if self.reply is not None else None


def send_under_load(port: int, count: int, make: Callable[[int], tuple[str, list[str], bytes]], *,
                    sessions: int = 6, outage: Callable[[], Any] | None = None, at: float = 0.4) -> list[Sent]:
    """`count` messages through the tier at `port`, one per connection, `sessions` at once;
    ``make(i)`` gives message i's (sender, recipients, data), whose Message-ID field names it.
    Once `at` of them are answered, ``outage()`` runs (a real component stopped), while the
    other sessions go on sending.  Every message's outcome, in order."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "fired": outage is None, "outage": outage is None}
    results: list[Sent | None] = [None] * count

    def worker():
        while True:
            with lock:
                i = state["next"]
                if i >= count:
                    return
                state["next"] += 1
                after = state["outage"]
            sender, recipients, data = make(i)
            mid = message_id(data)
            try:
                final = transaction(port, sender, recipients, data)[-1]
            except (OSError, SMTPError):
                final = None
            with lock:
                results[i] = Sent(mid, final, after)
                state["done"] += 1
                trigger = not state["fired"] and state["done"] >= count * at
                if trigger:
                    state["fired"] = True
            if trigger:
                outage()
                with lock:
                    state["outage"] = True      # messages begun from now on meet the outage whole

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results), "sessions did not finish"
    return results


def message_id(data: bytes) -> str:
    m = re.search(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", data, re.IGNORECASE | re.MULTILINE)
    assert m, "the message has no Message-ID"
    return m.group(1).decode()


def assert_nothing_lost(p: "Pipeline", user: str, sent: list[Sent], timeout: float = 30) -> None:
    """Every message the client got 250 for is in `user`'s mailbox exactly once; every other
    one is not there at all (a refused message must not arrive either)."""
    accepted = {s.mid for s in sent if s.code == 250}

    def delivered() -> dict[str, int] | None:
        counts: dict[str, int] = {}
        for path in p.messages(user):
            raw = path.read_bytes()
            m = re.search(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", raw, re.IGNORECASE | re.MULTILINE)
            if m:
                counts[m.group(1).decode()] = counts.get(m.group(1).decode(), 0) + 1
        return counts if accepted <= set(counts) else None
    counts = wait_until(delivered, timeout, f"the {len(accepted)} accepted messages in {user}'s Maildir")
    time.sleep(0.3)
    counts = delivered() or counts
    assert {m for m, n in counts.items() if n > 1} == set(), "delivered twice"
    refused = {s.mid for s in sent if s.code != 250}
    assert not refused & set(counts), f"refused messages delivered: {sorted(refused & set(counts))}"
