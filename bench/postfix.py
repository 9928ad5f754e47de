"""Postfix, the baseline the benchmark measures smarthost against.

`ensure_postfix()` installs Debian's ``postfix`` package when it is missing, answering debconf with
"No configuration" so that the package neither writes /etc/postfix/main.cf nor starts the system's
default instance. `PostfixChain` runs three independent Postfix instances chained the way the
smarthost tiers are (edge -> filter -> domain -> Maildir); `PostfixSingleHop` runs one instance that
relays everything to a sink the benchmark provides.

Every instance has its own config_directory, queue_directory and data_directory under a root the
caller gives (``ROOT/<tier>/{etc,spool,data}``), is started with ``postfix -c ROOT/<tier>/etc start``
(as root; the daemons run as Debian's ``postfix`` user and ``postdrop`` group), logs to its own file
through postlogd, and listens on 127.0.0.1 only. Postfix's defaults are kept -- process limits,
concurrency limits, queue-file fsync, in_flow_delay -- except for the few settings a loopback-only
chain without DNS needs; each is written into main.cf with the reason beside it (see `_main_cf`).
The system's default instance (/etc/postfix) is never configured or started.

Trusts: it runs as root; the root directory handed to an instance belongs to the benchmark (it is
created, chowned and written). Nothing here sends mail or DNS queries beyond 127.0.0.1: the next hops
are bracketed IP literals on loopback and the domain tier refuses every other destination.

Self-check: ``python -m bench.postfix --check DIR``.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
# Where the system's default instance keeps its master.pid (Debian's queue_directory).
SYSTEM_MASTER_PID = Path("/var/spool/postfix/pid/master.pid")
DEBCONF_PRESEED = b"postfix postfix/main_mailer_type select No configuration\n"

CHAIN_TIERS = ("edge", "filter", "domain")
# Queues a message passes through on its way out; "hold" and "corrupt" are not in transit.
TRANSIT_QUEUES = ("incoming", "active", "deferred", "maildrop")
LOOPBACK = "127.0.0.1"
HOSTNAME_SUFFIX = "postfix.bench.invalid"  # .invalid: never resolvable, never looked up

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class PostfixError(RuntimeError):
    """Postfix could not be installed, configured, started or stopped; the message says why."""


def _log(message: str) -> None:
    print(f"[postfix] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


def _apt_env() -> dict[str, str]:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def _apt_has_candidate(package: str) -> bool:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, env=_apt_env()
    ).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def _system_master_pid() -> int | None:
    """The pid of the system's default instance's master, if one runs."""
    return _live_master(SYSTEM_MASTER_PID)


def ensure_postfix(*, log=_log) -> bool:
    """Install Debian's postfix package if /usr/sbin/postfix is missing; True if it installed.

    The package is preseeded with "No configuration": it writes no /etc/postfix/main.cf and does not
    start the default instance. Should the package have started it all the same, it is stopped
    again. A default instance that was already running before the call is left alone (it is not
    ours); a warning says it adds noise to the measurements.
    """
    if os.geteuid() != 0:
        raise PostfixError("the Postfix side of the benchmark must run as root")
    if POSTFIX.exists():
        if _system_master_pid() is not None:
            log("warning: the system's default Postfix instance is running; left alone, it adds noise")
        _check_accounts()
        return False
    was_running = _system_master_pid() is not None
    log("installing Debian's postfix package (debconf: No configuration)")
    subprocess.run(["debconf-set-selections"], input=DEBCONF_PRESEED, check=True)
    if not _apt_has_candidate("postfix"):
        _apt(["apt-get", "update"], log)
    install = ["apt-get", "install", "-y", "postfix"]
    try:
        _apt(install, log)
    except PostfixError:
        _apt(["apt-get", "update"], log)  # stale package lists: refresh once and retry
        _apt(install, log)
    if not POSTFIX.exists():
        raise PostfixError(f"apt-get installed postfix but {POSTFIX} is missing")
    if not was_running and (pid := _system_master_pid()) is not None:
        log(f"the package started the default instance (master {pid}); stopping it")
        if subprocess.run([str(POSTFIX), "stop"], capture_output=True).returncode != 0:
            subprocess.run(["service", "postfix", "stop"], capture_output=True)
        _wait_gone([pid], 10.0)
    _check_accounts()
    return True


def _apt(argv: list[str], log) -> None:
    log(" ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=_apt_env())
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise PostfixError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{tail}")


def _check_accounts() -> None:
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        raise PostfixError(f"the postfix package's account is missing: {exc}") from None


def postfix_version() -> str:
    """Postfix's mail_version, e.g. "3.7.11"."""
    proc = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


# --------------------------------------------------------------------------------------------
# Processes, through /proc
# --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, 1 the ppid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def _all_ppids() -> dict[int, int]:
    ppids: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                ppids[int(entry.name)] = int(fields[1])
    return ppids


def descendants(pid: int) -> list[int]:
    """`pid` (if alive) followed by every live process whose parent chain leads to it."""
    ppids = _all_ppids()
    if pid not in ppids:
        return []
    children: dict[int, list[int]] = {}
    for child, parent in ppids.items():
        children.setdefault(parent, []).append(child)
    found, todo = [pid], [pid]
    while todo:
        for child in sorted(children.get(todo.pop(), ())):
            found.append(child)
            todo.append(child)
    return found


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _live_master(pid_file: Path) -> int | None:
    """The pid in a Postfix master.pid file if that process is alive and is a master."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "master" and _alive(pid) else None


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; return those still alive at the deadline."""
    left = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in left if _alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def cpu_seconds(pids: Iterable[int], *, reaped_of: int | None = None) -> float:
    """User + system CPU seconds of live `pids`; with `reaped_of`, plus its reaped children's.

    Postfix's master reaps its daemons (an smtpd exits after max_use clients or max_idle), so
    a tier's CPU time is its live processes' plus the master's cutime + cstime.
    """
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == reaped_of:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / _CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of the resident set sizes of live `pids`.

    Shared pages (libraries, copy-on-write) count once per process, which overstates a tier made
    of many processes; `pss_bytes` divides them among their sharers.
    """
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[21]) * _PAGE_SIZE  # rss, in pages
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    """Sum of the proportional set sizes of live `pids` (/proc/PID/smaps_rollup)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


# --------------------------------------------------------------------------------------------
# One instance
# --------------------------------------------------------------------------------------------

# master.cf services every instance has. No chroot (column 5 = n) so absolute paths work; process
# limits "-" mean default_process_limit (100), as in Postfix's own master.cf.
_MASTER_SERVICES = """\
# service  type        private unpriv  chroot  wakeup  maxproc command + args
pickup     unix        n       -       n       60      1       pickup
cleanup    unix        n       -       n       -       0       cleanup
qmgr       unix        n       -       n       300     1       qmgr
rewrite    unix        -       -       n       -       -       trivial-rewrite
bounce     unix        -       -       n       -       0       bounce
defer      unix        -       -       n       -       0       bounce
trace      unix        -       -       n       -       0       bounce
verify     unix        -       -       n       -       1       verify
flush      unix        n       -       n       1000?   0       flush
proxymap   unix        -       -       n       -       -       proxymap
proxywrite unix        -       -       n       -       1       proxymap
smtp       unix        -       -       n       -       -       smtp
relay      unix        -       -       n       -       -       smtp
error      unix        -       -       n       -       -       error
retry      unix        -       -       n       -       -       error
discard    unix        -       -       n       -       -       discard
anvil      unix        -       -       n       -       1       anvil
scache     unix        -       -       n       -       1       scache
postlog    unix-dgram  n       -       n       -       1       postlogd
"""
_MASTER_VIRTUAL = "virtual    unix        -       n       n       -       -       virtual\n"
# TLS session ticket keys and the (unused here) session cache, as in Debian's master.cf.
_MASTER_TLSMGR = "tlsmgr     unix        -       -       n       1000?   1       tlsmgr\n"


def _master_cf(port: int, *, virtual: bool, smtpd_options: Sequence[str] = (), tls: bool = False) -> str:
    """master.cf: smtpd on 127.0.0.1:port (with ``-o name=value`` overrides, as Debian's
    submission/submissions entries carry them), the usual services, virtual(8) and tlsmgr(8)
    when asked."""
    smtpd = f"{LOOPBACK}:{port} inet n - n - - smtpd\n" + "".join(f"  -o {o}\n" for o in smtpd_options)
    return (
        "# Written by bench/postfix.py for one benchmark instance.\n"
        + smtpd
        + _MASTER_SERVICES
        + (_MASTER_VIRTUAL if virtual else "")
        + (_MASTER_TLSMGR if tls else "")
    )


def _main_cf(settings: Sequence[tuple[str, str, str]]) -> str:
    lines = ["# Written by bench/postfix.py for one benchmark instance.",
             "# Everything not set here is Postfix's default."]
    for name, value, why in settings:
        lines.append(f"# {why}")
        lines.append(f"{name} = {value}".rstrip())
    return "\n".join(lines) + "\n"


class _Instance:
    """One Postfix instance under ROOT/<tier>: etc/, spool/, data/ and <tier>.log."""

    def __init__(self, tier: str, root: Path, port: int) -> None:
        self.tier = tier
        self.root = root
        self.dir = root / tier
        self.port = port
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.log = self.dir / f"{tier}.log"
        self.pid_file = self.spool / "pid" / "master.pid"
        self.hostname = f"{tier}.{HOSTNAME_SUFFIX}"
        self._env_marker = f"MAIL_CONFIG={self.etc}".encode()
        self._known_pids: set[int] = set()

    def common_settings(self) -> list[tuple[str, str, str]]:
        return [
            ("compatibility_level", "3.6",
             "current defaults (Debian's main.cf says 3.6 too), no compatibility warnings"),
            ("queue_directory", str(self.spool), "this instance's own queue"),
            ("data_directory", str(self.data), "this instance's own data (caches, locks)"),
            ("mail_owner", MAIL_OWNER, "the account Debian's package runs Postfix as"),
            ("setgid_group", SETGID_GROUP, "the group Debian's package uses"),
            ("myhostname", self.hostname,
             "distinct per instance: the SMTP client refuses a next hop that greets with its own name"),
            ("mydestination", "", "no local(8) domain: nothing is delivered or aliased locally"),
            ("alias_maps", "", "no aliasing"),
            ("alias_database", "", "no aliasing"),
            ("inet_interfaces", LOOPBACK, "loopback only"),
            ("inet_protocols", "ipv4", "loopback only"),
            ("mynetworks", "127.0.0.0/8", "the benchmark's clients and the previous tier"),
            ("smtp_dns_support_level", "disabled", "no DNS: next hops are IP literals"),
            ("smtp_host_lookup", "native", "no DNS"),
            ("smtpd_peername_lookup", "no",
             "no reverse lookup of the (loopback) client: no DNS"),
            ("maillog_file", str(self.log), "log to a file through postlogd, no syslog needed"),
            ("maillog_file_prefixes", str(self.root), "maillog_file must lie under this"),
            ("syslog_name", f"postfix-{self.tier}", "tells the instances apart in the logs"),
        ]

    def write_config(self, settings: Sequence[tuple[str, str, str]], master_cf: str,
                     tables: dict[str, str]) -> None:
        owner = pwd.getpwnam(MAIL_OWNER)
        for path in (self.dir, self.etc, self.spool):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, 0, 0)
            path.chmod(0o755)
        self.data.mkdir(exist_ok=True)
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        self.data.chmod(0o700)
        for name, text in tables.items():
            _write(self.etc / name, text)
        _write(self.etc / "main.cf", _main_cf(settings))
        _write(self.etc / "master.cf", master_cf)

    def master_pid(self) -> int | None:
        return _live_master(self.pid_file)

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return descendants(pid) if pid is not None else []

    def marked_pids(self) -> list[int]:
        """Live processes started for this instance: its master's tree, and any process (say an
        orphaned daemon) whose environment names this instance's config directory."""
        found = set(self.pids())
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and _environ_has(int(entry.name), self._env_marker):
                found.add(int(entry.name))
        found.discard(os.getpid())
        return sorted(pid for pid in found if _alive(pid))

    def queue_empty(self) -> bool:
        for queue in TRANSIT_QUEUES:
            for _dirpath, _dirnames, filenames in os.walk(self.spool / queue):
                if filenames:
                    return False
        return True

    def postfix(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(POSTFIX), "-c", str(self.etc), command],
            capture_output=True, text=True, timeout=timeout,
        )

    def start(self) -> None:
        if self.master_pid() is not None:  # left over from an earlier run of this root
            self.stop()
        proc = self.postfix("start")
        pid = self.master_pid()
        if proc.returncode != 0 or pid is None:
            raise PostfixError(
                f"postfix -c {self.etc} start failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}{self.log_tail()}"
            )
        self._known_pids.add(pid)

    def stop(self, timeout: float = 15.0) -> None:
        """`postfix stop`, then SIGTERM and SIGKILL by pid to whatever of the instance is left."""
        before = set(self.marked_pids()) | self._known_pids
        if self.master_pid() is not None:
            self.postfix("stop", timeout=timeout + 5)
        left = _wait_gone(before, timeout)
        left = sorted(set(left) | set(self.marked_pids()))
        if left:
            _kill(left, signal.SIGTERM)
            left = _wait_gone(left, 5.0)
        if left:
            _kill(left, signal.SIGKILL)
            left = _wait_gone(left, 5.0)
        if left:
            raise PostfixError(f"{self.tier}: processes {left} survived SIGKILL")
        self._known_pids.clear()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:]) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chown(tmp, 0, 0)
    tmp.chmod(0o644)
    tmp.replace(path)


def _check_root(root: Path) -> None:
    """Make `root` and check that Postfix's unprivileged daemons can reach paths below it."""
    if os.geteuid() != 0:
        raise PostfixError("Postfix instances must be started as root")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for parent in root.parents:
        if not parent.stat().st_mode & 0o001:
            raise PostfixError(
                f"{parent} is not searchable by others, so Postfix's daemons (user {MAIL_OWNER}) "
                f"cannot reach {root}; choose a root below world-searchable directories"
            )


def _wait_banner(port: int, deadline: float, *, tls: bool = False) -> None:
    """Wait until 127.0.0.1:port answers with a 220 greeting (inside TLS: wrapper mode), then QUIT."""
    last: Exception | str = "no answer"
    context = None
    if tls:
        import ssl
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2.0) as plain, \
                    (context.wrap_socket(plain) if context else plain) as sock:
                reply = sock.recv(512)
                if reply.startswith(b"220 ") or reply.startswith(b"220-"):
                    sock.sendall(b"QUIT\r\n")
                    return
                last = repr(reply[:80])
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise PostfixError(f"127.0.0.1:{port} gave no 220 greeting: {last}")


class _Instances:
    """What PostfixChain and PostfixSingleHop share: a set of instances started and stopped together."""

    def __init__(self, root: Path, instances: list[_Instance]) -> None:
        self.root = root
        self._instances = {inst.tier: inst for inst in instances}

    @property
    def ports(self) -> dict[str, int]:
        return {tier: inst.port for tier, inst in self._instances.items()}

    def _get(self, tier: str) -> _Instance:
        try:
            return self._instances[tier]
        except KeyError:
            raise KeyError(f"no tier {tier!r}; tiers are {list(self._instances)}") from None

    def _configure(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Write the configurations, start every instance, wait until every port answers 220.

        On failure everything already started is stopped again and PostfixError is raised.
        """
        self._configure()
        deadline = time.monotonic() + timeout
        try:
            for inst in reversed(self._instances.values()):  # downstream first
                inst.start()
            for inst in self._instances.values():
                self._wait_ready(inst, deadline)
        except BaseException:
            try:
                self.stop()
            except PostfixError as exc:
                _log(f"while cleaning up a failed start: {exc}")
            raise

    def _wait_ready(self, inst: _Instance, deadline: float) -> None:
        _wait_banner(inst.port, deadline)

    def stop(self) -> None:
        """Stop every instance; afterwards none of their processes is alive (else PostfixError)."""
        errors = []
        for inst in self._instances.values():  # upstream first
            try:
                inst.stop()
            except (PostfixError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        if errors:
            raise PostfixError("; ".join(errors))

    def master_pid(self, tier: str) -> int | None:
        """The tier's master pid (from ROOT/<tier>/spool/pid/master.pid), None if not running."""
        return self._get(tier).master_pid()

    def tier_pids(self, tier: str) -> list[int]:
        """The tier's master pid followed by all its current descendants; [] if not running."""
        return self._get(tier).pids()

    def leftover_pids(self) -> dict[str, list[int]]:
        """Per tier, every live process of the instance (master tree or MAIL_CONFIG marker)."""
        return {tier: inst.marked_pids() for tier, inst in self._instances.items()}

    def queue_empty(self, tier: str) -> bool:
        """No file under the tier's incoming/, active/, deferred/ or maildrop/."""
        return self._get(tier).queue_empty()

    def log_path(self, tier: str) -> Path:
        return self._get(tier).log

    def tier_cpu_seconds(self, tier: str) -> float:
        """CPU seconds used by the tier so far: live processes plus the daemons the master reaped."""
        pids = self.tier_pids(tier)
        return cpu_seconds(pids, reaped_of=pids[0] if pids else None)

    def tier_rss_bytes(self, tier: str) -> int:
        """Sum of the RSS of the tier's processes (shared pages counted in each)."""
        return rss_bytes(self.tier_pids(tier))

    def tier_pss_bytes(self, tier: str) -> int:
        """Sum of the PSS of the tier's processes (shared pages divided among their sharers)."""
        return pss_bytes(self.tier_pids(tier))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class PostfixChain(_Instances):
    """Three Postfix instances chained like smarthost: edge -> filter -> domain -> Maildir.

    edge listens on 127.0.0.1:base_port and relays everything to [127.0.0.1]:base_port+1 (filter),
    which relays everything to [127.0.0.1]:base_port+2 (domain); domain delivers `users` of `domain`
    with virtual(8) into ROOT/mail/<domain>/<user>/Maildir/ and refuses every other destination.
    `settings` maps a tier to further (name, value, why) lines for its main.cf, for a
    measurement that departs from a default and says so (bench/filter.py: a milter on the
    filter tier).
    """

    def __init__(self, root: Path, base_port: int, *, domain: str = "example.test",
                 users: Sequence[str] = ("alice", "bob"),
                 settings: dict[str, Sequence[tuple[str, str, str]]] | None = None) -> None:
        if not 1024 <= base_port <= 65535 - 2:
            raise ValueError(f"base_port {base_port} leaves no room for three ports")
        root = Path(root).resolve()
        super().__init__(root, [
            _Instance(tier, root, base_port + n) for n, tier in enumerate(CHAIN_TIERS)
        ])
        self.domain = domain
        self.users = tuple(users)
        self.mail_base = root / "mail"
        self.settings = {tier: list(lines) for tier, lines in (settings or {}).items()}
        unknown = set(self.settings) - set(CHAIN_TIERS)
        if unknown:
            raise ValueError(f"no tier {sorted(unknown)}; tiers are {CHAIN_TIERS}")

    def maildir(self, user: str) -> Path:
        """ROOT/mail/<domain>/<user>/Maildir; delivered messages appear in its new/."""
        if user not in self.users:
            raise KeyError(f"{user!r} is not a mailbox of this chain ({self.users})")
        return self.mail_base / self.domain / user / "Maildir"

    def _configure(self) -> None:
        _check_root(self.root)
        owner = pwd.getpwnam(MAIL_OWNER)
        uid, gid = owner.pw_uid, owner.pw_gid
        # Mailboxes exist before the first delivery so the benchmark can watch new/ from the start.
        boxes = [(self.mail_base, 0o755), (self.mail_base / self.domain, 0o755)]
        for user in self.users:
            maildir = self.maildir(user)
            boxes += [(path, 0o700) for path in (maildir.parent, maildir, maildir / "new",
                                                 maildir / "cur", maildir / "tmp")]
        for path, mode in boxes:
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            path.chmod(mode)

        edge, filt, dom = (self._instances[t] for t in CHAIN_TIERS)
        for inst, next_inst in ((edge, filt), (filt, dom)):
            inst.write_config(
                inst.common_settings() + [
                    ("relay_domains", self.domain, "accepted from anyone, like smarthost's relay_domains"),
                    ("relayhost", f"[{LOOPBACK}]:{next_inst.port}",
                     f"everything goes to the {next_inst.tier} instance (an IP literal: no lookup)"),
                ] + self.settings.get(inst.tier, []),
                _master_cf(inst.port, virtual=False), {},
            )
        mailboxes = "".join(
            f"{user}@{self.domain} {self.domain}/{user}/Maildir/\n" for user in self.users
        )
        settings = dom.common_settings() + [
            ("relay_domains", "", "the domain tier relays nothing"),
            ("default_transport", "error:5.7.1 this benchmark instance delivers only to its domain",
             "nothing ever leaves the domain tier"),
            ("relay_transport", "error:5.7.1 this benchmark instance delivers only to its domain",
             "nothing ever leaves the domain tier"),
            ("virtual_mailbox_domains", self.domain, "the hosted domain"),
            ("virtual_mailbox_base", str(self.mail_base), "mailboxes live under ROOT/mail"),
            ("virtual_mailbox_maps", f"texthash:{dom.etc / 'vmailbox'}",
             "user@domain -> domain/user/Maildir/ (trailing slash: Maildir)"),
            ("virtual_uid_maps", f"static:{uid}", f"deliver as {MAIL_OWNER}"),
            ("virtual_gid_maps", f"static:{gid}", f"deliver as {MAIL_OWNER}"),
        ] + self.settings.get("domain", [])
        if uid < 100:  # virtual(8) refuses uids below virtual_minimum_uid (default 100)
            settings.append(("virtual_minimum_uid", str(uid), f"{MAIL_OWNER}'s uid is {uid}"))
        dom.write_config(settings, _master_cf(dom.port, virtual=True), {"vmailbox": mailboxes})


class PostfixSingleHop(_Instances):
    """One Postfix instance: smtpd on 127.0.0.1:port accepts for `domain` (and, as for any Postfix
    instance, for anything from mynetworks) and relays everything to the sink at
    [127.0.0.1]:sink_port. Its only tier is "edge". `settings` are further (name, value, why)
    lines for main.cf, for a measurement that departs from a default (and says so)."""

    def __init__(self, root: Path, port: int, sink_port: int, *,
                 domain: str = "example.test", settings: Sequence[tuple[str, str, str]] = ()) -> None:
        root = Path(root).resolve()
        super().__init__(root, [_Instance("edge", root, port)])
        self.sink_port = sink_port
        self.domain = domain
        self.settings = list(settings)

    def _configure(self) -> None:
        _check_root(self.root)
        inst = self._instances["edge"]
        inst.write_config(
            inst.common_settings() + [
                ("relay_domains", self.domain, "accepted from anyone"),
                ("relayhost", f"[{LOOPBACK}]:{self.sink_port}",
                 "everything goes to the benchmark's sink (an IP literal: no lookup)"),
            ] + self.settings,
            _master_cf(inst.port, virtual=False), {},
        )


class PostfixSubmissions(_Instances):
    """One Postfix instance as a port-465 submission service: smtpd on 127.0.0.1:port in wrapper
    mode (implicit TLS, `cert`/`key`), SASL AUTH through Dovecot's auth service at
    ``smtpd_sasl_path`` (``inet:HOST:PORT`` or a socket path), relaying only for authenticated
    clients, as Debian's commented ``submissions`` entry in master.cf.  Its only tier is "edge";
    it delivers nothing anywhere (no relayhost is reachable: the benchmark sends no mail here)."""

    def __init__(self, root: Path, port: int, cert: str, key: str, sasl_path: str) -> None:
        root = Path(root).resolve()
        super().__init__(root, [_Instance("edge", root, port)])
        self.cert, self.key, self.sasl_path = cert, key, sasl_path

    def _configure(self) -> None:
        _check_root(self.root)
        inst = self._instances["edge"]
        inst.write_config(
            inst.common_settings() + [
                ("relay_domains", "", "relays only for authenticated clients"),
                ("default_transport", "error:5.7.1 this benchmark instance delivers nothing",
                 "nothing leaves this instance"),
                ("smtpd_tls_cert_file", self.cert, "the same certificate as smarthost's edge"),
                ("smtpd_tls_key_file", self.key, "its key"),
                ("smtpd_sasl_type", "dovecot", "AUTH is Dovecot's auth service's"),
                ("smtpd_sasl_path", self.sasl_path, "where Dovecot's auth service listens"),
            ],
            _master_cf(inst.port, virtual=False, tls=True, smtpd_options=(
                "syslog_name=postfix/submissions", "smtpd_tls_wrappermode=yes",
                "smtpd_sasl_auth_enable=yes", "smtpd_tls_security_level=encrypt",
                "smtpd_relay_restrictions=permit_sasl_authenticated,reject")),
            {},
        )

    def _wait_ready(self, inst: _Instance, deadline: float) -> None:
        _wait_banner(inst.port, deadline, tls=True)


# --------------------------------------------------------------------------------------------
# Self-check: python -m bench.postfix --check DIR
# --------------------------------------------------------------------------------------------


def free_port_block(count: int, *, attempts: int = 200) -> int:
    """A base port such that base .. base+count-1 are all free on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((LOOPBACK, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise PostfixError(f"found no {count} consecutive free ports on 127.0.0.1")


class CountingSink:
    """A tiny SMTP sink on 127.0.0.1: 250 to everything, 354 to DATA; counts messages received.

    A thread per connection; each reply follows its command (no PIPELINING advertised).
    """

    def __init__(self, port: int = 0) -> None:
        sink = self
        self.count = 0
        self.bytes = 0
        self._lock = threading.Lock()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 sink.bench.invalid ESMTP\r\n")
                while line := self.rfile.readline(4096):
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        self.wfile.write(b"354 go ahead\r\n")
                        size = 0
                        while (chunk := self.rfile.readline(1 << 16)) not in (b".\r\n", b""):
                            size += len(chunk)
                        if not chunk:
                            return
                        with sink._lock:
                            sink.count += 1
                            sink.bytes += size
                        self.wfile.write(b"250 2.0.0 accepted\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 bye\r\n")
                        return
                    elif verb in (b"EHLO", b"HELO"):
                        self.wfile.write(b"250 sink.bench.invalid\r\n")
                    else:
                        self.wfile.write(b"250 2.0.0 ok\r\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((LOOPBACK, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingSink:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(port: int, count: int, recipient: str, size: int = 2048) -> float:
    """Send `count` messages over one SMTP session; seconds until the last 250."""
    import smtplib

    body = ("x" * 76 + "\r\n") * max(1, size // 78)
    started = time.monotonic()
    with smtplib.SMTP(LOOPBACK, port, local_hostname="client.bench.invalid", timeout=60) as smtp:
        for n in range(count):
            msg = (f"From: <sender@client.test>\r\nTo: <{recipient}>\r\n"
                   f"Subject: postfix self-check {n}\r\nMessage-ID: <check-{n}@client.test>\r\n"
                   f"\r\n{body}")
            refused = smtp.sendmail("sender@client.test", [recipient], msg)
            if refused:
                raise PostfixError(f"recipient refused: {refused}")
    return time.monotonic() - started


def _wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise PostfixError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def _check_stopped(instances: _Instances, pids: dict[str, list[int]]) -> None:
    alive = {tier: [p for p in tier_pids if _alive(p)] for tier, tier_pids in pids.items()}
    leftover = instances.leftover_pids()
    bad = {t: sorted(set(alive[t]) | set(leftover.get(t, []))) for t in alive}
    bad = {t: p for t, p in bad.items() if p}
    if bad:
        raise PostfixError(f"Postfix processes still alive after stop: {bad}")


def check(directory: Path, messages: int = 20) -> None:
    """Install if needed, run a chain and a single hop, deliver `messages` through each, stop."""
    installed = ensure_postfix()
    print(f"postfix {postfix_version()} ({'installed now' if installed else 'already installed'})")
    directory = Path(directory)

    base = free_port_block(3)
    chain = PostfixChain(directory / "chain", base)
    print(f"chain: root {chain.root}, ports {chain.ports}")
    t0 = time.monotonic()
    chain.start()
    print(f"chain: started in {time.monotonic() - t0:.2f} s; masters "
          + ", ".join(f"{t}={chain.master_pid(t)}" for t in CHAIN_TIERS))
    pids: dict[str, list[int]] = {}
    try:
        new = chain.maildir("alice") / "new"
        before = len(os.listdir(new))
        t0 = time.monotonic()
        accepted = _send(chain.ports["edge"], messages, f"alice@{chain.domain}")
        _wait_for(lambda: len(os.listdir(new)) - before >= messages, 120, f"{messages} Maildir files")
        delivered = time.monotonic() - t0
        print(f"chain: {messages} messages accepted by edge in {accepted:.3f} s, "
              f"all {messages} in {new} after {delivered:.3f} s")
        _wait_for(lambda: all(chain.queue_empty(t) for t in CHAIN_TIERS), 30, "empty queues")
        for tier in CHAIN_TIERS:
            pids[tier] = chain.tier_pids(tier)
            print(f"chain: {tier:6} pids {pids[tier]} cpu {chain.tier_cpu_seconds(tier):.2f} s "
                  f"rss {chain.tier_rss_bytes(tier) / 2**20:.1f} MiB "
                  f"pss {chain.tier_pss_bytes(tier) / 2**20:.1f} MiB queue_empty={chain.queue_empty(tier)}")
        relays = _relay_lines(chain)
        for tier, line in relays.items():
            print(f"chain: {tier:6} log: {line}")
    finally:
        for tier in CHAIN_TIERS:
            pids.setdefault(tier, chain.tier_pids(tier))
        chain.stop()
    _check_stopped(chain, pids)
    print("chain: stopped; no process of the chain remains "
          f"(checked {sum(len(p) for p in pids.values())} pids and MAIL_CONFIG markers)")

    port = free_port_block(1)
    with CountingSink() as sink:
        hop = PostfixSingleHop(directory / "single", port, sink.port)
        print(f"single hop: port {port} -> sink 127.0.0.1:{sink.port}")
        hop.start()
        try:
            t0 = time.monotonic()
            accepted = _send(port, messages, "bob@example.test")
            _wait_for(lambda: sink.count >= messages, 60, f"{messages} messages at the sink")
            print(f"single hop: {messages} accepted in {accepted:.3f} s, "
                  f"all {sink.count} at the sink after {time.monotonic() - t0:.3f} s")
            _wait_for(lambda: hop.queue_empty("edge"), 30, "empty queue")
            print(f"single hop: pids {hop.tier_pids('edge')}")
        finally:
            pids = {"edge": hop.tier_pids("edge")}
            hop.stop()
        _check_stopped(hop, pids)
        print("single hop: stopped; no process remains")
    if _system_master_pid() is None:
        print("system default instance: not running")
    else:
        print("system default instance: running (it was running before; left alone)")
    print("postfix self-check: OK")


def _relay_lines(chain: PostfixChain) -> dict[str, str]:
    """The first delivery line of each tier's log (shows relay= and status=)."""
    found = {}
    for tier in CHAIN_TIERS:
        try:
            text = chain.log_path(tier).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if " relay=" in line and "status=" in line:
                found[tier] = line.split(": ", 1)[-1][:160]
                break
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.postfix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", metavar="DIR", type=Path, required=True,
                        help="run the self-check with instances under DIR")
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        check(args.check, args.messages)
    except PostfixError as exc:
        print(f"postfix self-check: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
