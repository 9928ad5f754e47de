"""Filtering chains side by side: Postfix, Postfix with rspamd as a milter, smarthost.

    python -m bench.filter --out DIR [--quick] [--messages N] [--runs R] [--base-port P]

Three systems run at once on 127.0.0.1, all against one local DNS server
(tests/dnsserver.py, Twisted's authoritative server in its own process):

1. ``postfix``: the three chained Postfix instances of :class:`bench.postfix.PostfixChain`;
2. ``postfix+rspamd``: the same chain whose filter instance hands every message to Debian's
   rspamd (3.4 on bookworm) through ``smtpd_milters``: one ``rspamd_proxy`` worker in milter
   mode scanning itself (``self_scan``, no normal worker behind it) with only the sender
   authentication modules on (SPF, DKIM verification, DMARC, ARC) and ``milter_headers``
   adding Authentication-Results; its DNS is the local server (``options.dns.nameserver``);
   no module that needs Redis or the Internet is loaded (see :func:`rspamd_config`);
3. ``smarthost``: the three smarthost tiers as :mod:`bench.run` runs them, the filter tier with
   ``[dns] nameservers`` pointing at the local server (plus :data:`SMARTHOST_EXTRA`, the one
   place for further filter-tier TOML), running its default policy.

The DNS server holds ``sender.test``: SPF ``v=spf1 ip4:127.0.0.0/8 -all`` (the load comes from
127.0.0.1), an RSA 2048 DKIM key at ``bench._domainkey`` and an Ed25519 one at
``bench-ed._domainkey`` (both made for each run; the Ed25519 key is published, not used yet),
DMARC ``v=DMARC1; p=reject; adkim=r; aspf=r``, A and PTR records for 127.0.0.1.  The test
messages (From: and MAIL FROM at sender.test, to alice@example.test) are DKIM-signed with dkimpy
once per size before any run (OUT/messages/*.eml) and sent as-is by ``bench.load send
--message-file``, one message per connection over 10 sessions.

Per system and size (5 KB, 50 KB), systems alternating, R runs: delivered msg/s (counted in
the final Maildir), latency to the 250 and to the Maildir (p50/p99), CPU seconds per message of
each tier and of rspamd's processes (master and worker).  Before the runs a few messages go
through each system and one delivered message's Authentication-Results is printed; for
rspamd, the run is refused unless it says spf=pass, dkim=pass and dmarc=pass, and after each
run rspamd's log is read to count the scans that saw all three pass.  Writes OUT/filter.json
(schema below) and prints a table; everything started is stopped by pid, on Ctrl-C too.  As
root (Postfix's daemons need it).

filter.json::

    meta     {started, finished, duration_s, quick, argv, ports, host{...}, versions{postfix, rspamd},
              plan{runs, messages, sessions, per_connection, sizes}, dns{port, zones},
              smarthost_extra{filter: TOML tables}, rspamd{config, config_text, c_modules, lua_modules},
              postfix_filter_milter [[name, value, why]...]}
    samples  {system: {size: {authentication_results: [...], headers: "..."}}}
    points   [{size, size_bytes, message_bytes, messages, sessions,
               systems{system: {tiers, runs: [RUN...], summary: SUMMARY}}}]
    RUN      bench.run's RUN (bench.load send's result with cpu_s{tier}, cpu_s_per_msg{tier},
             calibration_ms, loadavg_1m_before, others_cpus, machine_busy_cpus, ...)
             plus run (0..R-1), order (position among the systems in that run) and, for
             postfix+rspamd, rspamd_log{scans, all_pass, spf_pass, dkim_pass, dmarc_pass}
    SUMMARY  bench.run's SUMMARY
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.postfix import (PostfixChain, PostfixError, _apt, _apt_has_candidate, descendants,
                           ensure_postfix, postfix_version)
from bench.load import body_lines
from bench.run import Bench, clear_maildir, fmt, fmt_spread, host_info, log
from bench.smarthost import SmarthostChain, port_free, port_open, run_bench

SIZES = ("5k", "50k")
SIZE_BYTES = {"5k": 5 * 1024, "50k": 50 * 1024}
SIZE_LABEL = {"5k": "5 KB", "50k": "50 KB"}
SESSIONS = 10
PER_CONNECTION = 1
MESSAGES = 1000
QUICK_MESSAGES = 200
WARM_UP = 20
TIERS = ("edge", "filter", "domain")
TAGS = {"postfix": "pf", "postfix+rspamd": "pr", "smarthost": "sh", "smarthost-nochecks": "sn"}  # X-Bench-Id
SYSTEMS = ("postfix", "postfix+rspamd", "smarthost")      # the default; smarthost-nochecks on request
# smarthost-nochecks: the same tiers with the filter's end-of-data checks off, so the difference of
# the filter tier's CPU per message with smarthost is what its checks cost inside the daemon.
NO_CHECKS = {"policies": {"default": {"end_of_data": []}}}
SENDER_DOMAIN = "sender.test"
HELO = f"mail.{SENDER_DOMAIN}"
MAIL_FROM = f"bench@{SENDER_DOMAIN}"
RCPT = "alice@example.test"
SELECTOR, ED_SELECTOR = "bench", "bench-ed"
SPF = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC = "v=DMARC1; p=reject; adkim=r; aspf=r"
REPLY_TIMEOUT = 30

# The smarthost filter tier's configuration beyond the bench's own (shared.demo's, as bench.run
# runs it): [dns] nameservers is filled in with the local server; add further filter-tier TOML
# tables here (merged table by table into the demo's).
SMARTHOST_EXTRA: dict[str, dict] = {}

RSPAMD = Path("/usr/bin/rspamd")
RSPAMD_USER = "_rspamd"
RSPAMD_CONFDIR = Path("/etc/rspamd")         # Debian's: only its scores and actions are included
RSPAMD_SHAREDIR = Path("/usr/share/rspamd")
# What runs in rspamd: the one C module (options.filters) and the Lua plugins given a section.
RSPAMD_C_MODULES = ("dkim",)
RSPAMD_LUA_MODULES = ("spf", "dmarc", "arc", "milter_headers")
# The full chain (--chain full, the default) adds, on both sides, with the same daemons: the
# antivirus with one clamd (the tests' signatures), greylisting in one Redis (passing: the load's
# network is known), and the same DNS lists (a client list and a URI list on the local server).
FULL_LUA_MODULES = ("antivirus", "greylist", "rbl")
CHAINS = ("full", "auth")
RBL_ZONE, URIBL_ZONE = "rbl.bench.test", "uribl.bench.test"
# URLs in every message's body: two registered domains for the URI lists to look up
BODY_URLS = (b"Read it online: https://www.sender.test/newsletter/2026-02 or at "
             b"http://news.example.org/a/1?from=bench\r\n\r\n")


# -- keys, zones, messages ----------------------------------------------------------------------

def make_keys(directory: Path) -> dict:
    """An RSA 2048 and an Ed25519 key (PEM files in `directory`) and their DKIM TXT records."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    directory.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    ed_pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    (directory / f"{SELECTOR}.pem").write_bytes(pem)
    (directory / f"{ED_SELECTOR}.pem").write_bytes(ed_pem)
    rsa_pub = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    rsa_txt = f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_pub).decode()}"
    ed_txt = f"v=DKIM1; k=ed25519; p={base64.b64encode(ed_pub).decode()}"
    return {"rsa_pem": pem, "rsa_txt": rsa_txt, "ed_txt": ed_txt}


def txt_strings(text: str) -> list[str]:
    """A TXT value as character-strings of at most 255 bytes (a 2048-bit key needs two)."""
    return [text[i:i + 255] for i in range(0, len(text), 255)]


def zones(keys: dict) -> dict:
    return {
        SENDER_DOMAIN: [
            ("@", "A", "127.0.0.1"),
            ("@", "TXT", SPF),
            ("mail", "A", "127.0.0.1"),
            ("mail", "TXT", SPF),                       # the load's HELO name, for HELO checks
            (f"{SELECTOR}._domainkey", "TXT", txt_strings(keys["rsa_txt"])),
            (f"{ED_SELECTOR}._domainkey", "TXT", txt_strings(keys["ed_txt"])),
            ("_dmarc", "TXT", DMARC),
        ],
        "0.0.127.in-addr.arpa": [("1", "PTR", HELO)],
        # the lists list their test entries only (127.0.0.2, listed.test): the load is not listed
        RBL_ZONE: [("2.0.0.127", "A", "127.0.0.2")],
        URIBL_ZONE: [("listed.test", "A", "127.0.0.2")],
    }


def signed_message(size: int, pem: bytes) -> bytes:
    """A message of about `size` bytes from sender.test, DKIM-signed (rsa-sha256, relaxed/relaxed,
    d=sender.test, s=bench).  It has no Message-ID: bench.load adds a unique one per message, which
    the signature then does not cover (it covers From, To, Subject, Date, MIME headers, body)."""
    import dkim

    head = (f"From: Bench Sender <{MAIL_FROM}>\r\n"
            f"To: Alice <{RCPT}>\r\n"
            "Subject: filter benchmark message\r\n"
            "Date: Mon, 2 Feb 2026 10:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n").encode()
    # about 500 bytes of DKIM-Signature and 120 of X-Bench-Id + Message-ID come on top
    message = head + b"\r\n" + BODY_URLS + body_lines(size, len(head) + 620 + len(BODY_URLS))
    sig = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), pem,
                    canonicalize=(b"relaxed", b"relaxed"))
    return sig + message


# -- rspamd ----------------------------------------------------------------------------------------

def ensure_rspamd() -> bool:
    """Install Debian's rspamd package if /usr/bin/rspamd is missing; True if it installed.  Should
    the package have started the system's rspamd service, it is stopped again."""
    if RSPAMD.exists():
        return False
    running_before = _system_rspamd_running()
    log("[rspamd] installing Debian's rspamd package")
    if not _apt_has_candidate("rspamd"):
        _apt(["apt-get", "update"], log)
    _apt(["apt-get", "install", "-y", "rspamd"], log)
    if not RSPAMD.exists():
        raise PostfixError(f"apt-get installed rspamd but {RSPAMD} is missing")
    if not running_before and _system_rspamd_running():
        log("[rspamd] the package started the system's rspamd service; stopping it")
        subprocess.run(["service", "rspamd", "stop"], capture_output=True)
    return True


def _system_rspamd_running() -> bool:
    try:
        pid = int(Path("/run/rspamd/rspamd.pid").read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("rspamd")
    except (OSError, ValueError):
        return False


def rspamd_version() -> str:
    out = subprocess.run([str(RSPAMD), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", out)
    return m.group(1) if m else (out.strip() or "unknown")


def _rspamd_worker(kind: str, port: int) -> str:
    """The one worker of :func:`rspamd_config`: ``milter``, the proxy speaking the milter
    protocol and scanning itself (what Postfix's smtpd_milters talks to); ``normal``, the
    scanning worker's HTTP protocol (``POST /checkv2``, what smarthost's rspamd check sends)."""
    if kind == "normal":
        return f'''worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
}}'''
    if kind != "milter":
        raise ValueError(f"rspamd worker {kind!r}: milter or normal")
    return f'''worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;              # speaks the milter protocol to Postfix's smtpd
    timeout = 120s;
    count = 1;                 # Debian's worker-proxy.inc: one process
    upstream "local" {{
        default = yes;
        self_scan = yes;       # scan in this worker: no normal worker behind the proxy
    }}
    max_retries = 5;
    discard_on_reject = false;
    quarantine_on_reject = false;
    reject_message = "Spam message rejected";
}}'''


def full_chain_modules(clamd: str, redis: str) -> str:
    """rspamd's sections for the full chain: its antivirus with the same clamd (the whole
    message to clamd, as smarthost sends it, not its MIME parts one by one), its greylisting in
    the same Redis (local clients too), and the same two DNS lists."""
    return f'''
redis {{
    servers = "{redis}";
}}
antivirus {{
    clamav {{
        type = "clamav";
        servers = "{clamd}";
        symbol = "CLAM_VIRUS";
        action = "reject";
        scan_mime_parts = false;     # the message whole, as smarthost's antivirus sends it
        max_size = 26214400;
        timeout = 30s;
        retransmits = 1;
        log_clean = true;
        no_cache = true;             # no verdict cache by content digest in Redis: the benchmark's
                                     # messages share one body, real mail does not; smarthost keeps none
    }}
}}
greylist {{
    check_local = true;          # the load comes from 127.0.0.1
    check_authed = true;
}}
rbl {{
    rbls {{
        bench_rbl {{
            symbol = "BENCH_RBL";
            rbl = "{RBL_ZONE}";
            checks = ["from"];
            ignore_defaults = true;
            exclude_local = false;
            exclude_private_ips = false;
            disable_monitoring = true;
        }}
        bench_uribl {{
            symbol = "BENCH_URIBL";
            rbl = "{URIBL_ZONE}";
            checks = ["urls"];
            ignore_defaults = true;
            exclude_local = false;
            disable_monitoring = true;
        }}
    }}
}}
'''


def smarthost_full_chain(clamd: str, redis: str) -> dict[str, dict]:
    """The smarthost filter tier's tables for the full chain: the same clamd, greylisting at RCPT
    in the same Redis (the load's network auto-allowed beforehand, see :func:`allow_network`),
    the same DNS lists."""
    return {"antivirus": {"servers": [clamd]},
            "redis": {"servers": [redis]},
            "greylist": {"enabled": True, "min_score": 0},
            "dnslists": {"zones": [f"{RBL_ZONE}=127.0.0.[2..11]*3 BENCH_RBL"]},
            "urilists": {"zones": [f"{URIBL_ZONE}*4 BENCH_URIBL"]}}


def allow_network(redis_client) -> None:
    """Greylisting set to pass on the smarthost side: the load's network (127.0.0.0/24) counted
    as passed often enough, as a network that delivers every day is."""
    redis_client.set("smarthost:grey:a:127.0.0.0/24", 1_000_000)


def rspamd_config(root: Path, port: int, dns_port: int, worker: str = "milter", modules: str = "",
                  url_tld: Path = RSPAMD_SHAREDIR / "effective_tld_names.dat") -> str:
    """Our own top-level rspamd.conf (not Debian's rspamd.conf, which loads every module and its
    rules): Debian's options for what is not set here, its metric, actions and symbol groups
    (scores only), one worker (see :func:`_rspamd_worker`) on 127.0.0.1:PORT, and sections for
    the modules that are to run."""
    return f'''# Written by bench/filter.py: rspamd with one {worker} worker.
options {{
    pidfile = "{root}/run/rspamd.pid";
    # As Debian's options.inc, with every file rspamd writes under {root}.
    one_shot = false;
    check_all_filters = false;
    dns_max_requests = 64;
    max_lua_urls = 1024;
    max_urls = 10240;
    max_recipients = 1024;
    url_tld = "{url_tld}";
    allow_raw_input = true;
    words_decay = 600;
    task_timeout = 8s;
    soft_reject_on_timeout = false;
    local_addrs = [192.168.0.0/16, 10.0.0.0/8, 172.16.0.0/12, fd00::/8, 169.254.0.0/16, fe80::/10];
    cache_file = "{root}/db/symbols.cache";
    dynamic_conf = "{root}/db/rspamd_dynamic";
    history_file = "{root}/db/rspamd.history";
    stats_file = "{root}/db/stats.ucl";
    hs_cache_dir = "{root}/db/";
    control_socket = "{root}/run/rspamd.sock mode=0600";
    tempdir = "{root}/tmp";
    # Only the DKIM C module (Debian: chartable, dkim, regexp, fuzzy_check).
    filters = "{','.join(RSPAMD_C_MODULES)}";
    # Every client here is 127.0.0.1, which rspamd otherwise exempts from SPF, DKIM and DMARC.
    check_local = true;
    check_authed = true;
    dns {{
        nameserver = ["127.0.0.1:{dns_port}"];   # the benchmark's DNS server, nothing else
        timeout = 1s;
        retransmits = 2;
        sockets = 16;
    }}
}}

logging {{
    type = "file";
    filename = "{root}/log/rspamd.log";
    .include "$CONFDIR/logging.inc"          # Debian's: level info, a line per scan
}}

.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"

{_rspamd_worker(worker, port)}

modules {{
    path = "{RSPAMD_SHAREDIR}/plugins";
}}

# The sender-authentication modules (Debian's settings), against the local DNS server.
spf {{
    spf_cache_size = 2k;
    spf_cache_expire = 1d;
    check_local = true;
    check_authed = true;
}}
dkim {{
    dkim_cache_size = 2k;
    dkim_cache_expire = 1d;
    time_jitter = 6h;
    trusted_only = false;
    skip_multi = false;
    check_local = true;
    check_authed = true;
}}
dmarc {{
    check_local = true;
    check_authed = true;
}}
arc {{
    # verification only: no key is configured, so nothing is signed
    sign_inbound = false;
    sign_local = false;
    use_redis = false;
}}
milter_headers {{
    use = ["authentication-results"];
    skip_local = false;          # 127.0.0.1 would otherwise get no header
    skip_authenticated = false;
}}
{modules}'''


class Rspamd:
    """rspamd in the foreground (``rspamd -f``) as root dropping to _rspamd, its own process
    session, with the configuration of :func:`rspamd_config` under ROOT; stopped by pid."""

    def __init__(self, root: Path, port: int, dns_port: int, worker: str = "milter", modules: str = "",
                 url_tld: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.url_tld = url_tld
        self.port = port
        self.dns_port = dns_port
        self.worker = worker
        self.modules = modules
        self.conf = self.root / "rspamd.conf"
        self.log = self.root / "log" / "rspamd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} in use on 127.0.0.1 (rspamd's {self.worker} worker)")
        user = pwd.getpwnam(RSPAMD_USER)
        for sub in ("", "run", "log", "db", "tmp", "local"):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        tld = {"url_tld": self.url_tld} if self.url_tld is not None else {}
        self.conf.write_text(rspamd_config(self.root, self.port, self.dns_port, self.worker, self.modules, **tld))
        argv = [str(RSPAMD), "-f", "-c", str(self.conf), "-u", RSPAMD_USER, "-g", RSPAMD_USER,
                f"--var=CONFDIR={RSPAMD_CONFDIR}", f"--var=LOCAL_CONFDIR={self.root / 'local'}",
                f"--var=DBDIR={self.root / 'db'}", f"--var=RUNDIR={self.root / 'run'}",
                f"--var=LOGDIR={self.root / 'log'}"]
        out = open(self.root / "log" / "rspamd.stderr", "ab")
        self.proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited {self.proc.returncode}" if self.proc.poll() is not None else "not listening in time"
                self.stop()
                raise RuntimeError(f"rspamd {why}; see {self.root / 'log'}:\n{self.log_tail()}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        pids = self.pids()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in [p for p in pids if Path(f"/proc/{p}").exists()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def scans_since(self, offset: int) -> dict:
        """What the scans logged after byte `offset` of rspamd's log found (one task line each)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return {}
        counts = {"scans": 0, "all_pass": 0, "spf_pass": 0, "dkim_pass": 0, "dmarc_pass": 0, "av_clean": 0}
        for line in text.splitlines():
            if "message or mime_part is clean" in line:       # its antivirus asked clamd (full chain)
                counts["av_clean"] += 1
            if "(default: " not in line:
                continue
            counts["scans"] += 1
            spf, dkim_ok, dmarc = "R_SPF_ALLOW" in line, "R_DKIM_ALLOW" in line, "DMARC_POLICY_ALLOW" in line
            counts["spf_pass"] += spf
            counts["dkim_pass"] += dkim_ok
            counts["dmarc_pass"] += dmarc
            counts["all_pass"] += spf and dkim_ok and dmarc
        return counts


class PostfixWithRspamd:
    """A PostfixChain whose filter instance has rspamd's proxy as its milter; the interface
    bench.run's measured_run uses, with rspamd's processes as a fourth tier "rspamd"."""

    def __init__(self, root: Path, base_port: int, milter_port: int, dns_port: int, modules: str = "") -> None:
        root = Path(root).resolve()
        milter = [
            ("smtpd_milters", f"inet:127.0.0.1:{milter_port}",
             "every message received is handed to rspamd's proxy worker (milter mode)"),
            ("milter_default_action", "tempfail",
             "Postfix's default, said out loud: if rspamd fails, the filter tier answers 4xx "
             "and the message waits in the edge's queue (shows as undelivered)"),
        ]
        self.chain = PostfixChain(root / "postfix", base_port, settings={"filter": milter})
        self.rspamd = Rspamd(root / "rspamd", milter_port, dns_port, modules=modules)
        self.ports = self.chain.ports
        self.domain = self.chain.domain

    def start(self) -> None:
        self.rspamd.start()
        try:
            self.chain.start()
        except BaseException:
            self.rspamd.stop()
            raise

    def stop(self) -> None:
        try:
            self.chain.stop()
        finally:
            self.rspamd.stop()

    def tier_pids(self, tier: str) -> list[int]:
        return self.rspamd.pids() if tier == "rspamd" else self.chain.tier_pids(tier)

    def master_pid(self, tier: str) -> int | None:
        if tier == "rspamd":
            return self.rspamd.proc.pid if self.rspamd.proc is not None else None
        return self.chain.master_pid(tier)

    def queue_empty(self, tier: str) -> bool:
        return True if tier == "rspamd" else self.chain.queue_empty(tier)

    def maildir(self, user: str) -> Path:
        return self.chain.maildir(user)

    def log_path(self, tier: str) -> Path:
        return self.rspamd.log if tier == "rspamd" else self.chain.log_path(tier)


# -- the benchmark ---------------------------------------------------------------------------------

def auth_results(message: bytes) -> list[str]:
    """The Authentication-Results headers of a message (unfolded)."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode(errors="replace")
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\n")
            if line.lower().startswith("authentication-results:")]


def passes(results: list[str]) -> bool:
    return any(all(re.search(rf"\b{m}=pass\b", r) for m in ("spf", "dkim", "dmarc")) for r in results)


class FilterBench(Bench):
    def __init__(self, args) -> None:
        args.no_postfix = False
        super().__init__(args)
        self.results = {"meta": {}, "samples": {}, "points": []}
        self.dns = None
        self.clamd = self.redis = None            # the full chain's, shared by both sides
        self.tiers: dict[str, tuple[str, ...]] = {}
        self.messages: dict[str, Path] = {}

    def stop_all(self) -> None:
        super().stop_all()
        for name in ("dns", "clamd", "redis"):
            daemon = getattr(self, name)
            if daemon is not None:
                daemon.stop()
                setattr(self, name, None)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "filter.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "filter.json")

    def send_argv(self, system, size: str, n: int, run_id: str, raw: bool = True) -> list[str]:
        return ["send", "--port", str(system.ports["edge"]), "--message-file", str(self.messages[size]),
                "--sessions", str(SESSIONS), "--per-connection", str(PER_CONNECTION),
                "--messages", str(n), "--maildir", str(system.maildir("alice")),
                "--mail-from", MAIL_FROM, "--rcpt", RCPT, "--helo", HELO, "--run-id", run_id,
                "--reply-timeout", str(REPLY_TIMEOUT), *([] if raw else ["--no-raw"])]

    def warm_up(self, systems: dict) -> None:
        """A few messages of each size through each system; keep one delivered message's headers."""
        for name, system in systems.items():
            tiers = self.tiers[name]
            for size in SIZES:
                maildir = system.maildir("alice")
                clear_maildir(maildir)
                r = self.load(self.send_argv(system, size, WARM_UP, f"warm{TAGS[name]}{size}", raw=False), 120)
                deadline = time.monotonic() + 60
                while not all(system.queue_empty(t) for t in tiers) and time.monotonic() < deadline:
                    time.sleep(0.05)
                files = sorted((maildir / "cur").iterdir()) + sorted((maildir / "new").iterdir())
                if r["delivered"] != WARM_UP or not files:
                    raise RuntimeError(f"{name}: warm-up delivered {r['delivered']} of {WARM_UP} "
                                       f"({size}): {r}")
                data = files[0].read_bytes()
                ar = auth_results(data)
                self.results["samples"].setdefault(name, {})[size] = {
                    "authentication_results": ar,
                    "headers": data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode(errors="replace")}
                clear_maildir(maildir)
                if self.args.chain == "full" and name == "smarthost":
                    text = system.log_path("filter").read_text(errors="replace")
                    missing = [w for w in ("antivirus=clean", "greylist=allowed", "dnslists=none", "urilists=none")
                               if w not in text]
                    if missing:
                        raise RuntimeError(f"smarthost: the full chain's checks did not run ({', '.join(missing)} "
                                           f"not in {system.log_path('filter')})")
                if name == "postfix+rspamd" and self.args.chain == "full" and \
                        not system.rspamd.scans_since(0).get("av_clean"):
                    raise RuntimeError(f"postfix+rspamd: its antivirus never asked clamd; see {system.rspamd.log}")
                if name == "postfix+rspamd" and not passes(ar):
                    raise RuntimeError(f"postfix+rspamd: the delivered message's Authentication-Results "
                                       f"do not say spf=pass dkim=pass dmarc=pass: {ar or 'none'}; see "
                                       f"{system.rspamd.log}")

    def run(self) -> None:
        a = self.args
        t_start = time.monotonic()
        base = a.base_port
        runs = a.runs or (1 if a.quick else 3)
        n = a.messages or (QUICK_MESSAGES if a.quick else MESSAGES)
        ports = {"smarthost": base, "postfix": base + 10, "postfix+rspamd": base + 20,
                 "rspamd_milter": base + 25, "smarthost-nochecks": base + 30}
        wanted = [s.strip() for s in a.systems.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in TAGS]
        if unknown or not wanted:
            raise RuntimeError(f"--systems: unknown {unknown} (known: {', '.join(TAGS)})")
        busy = [p for p in (*range(base, base + 3), *range(base + 10, base + 13), *range(base + 20, base + 23),
                            base + 25, *range(base + 30, base + 33)) if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports in use on 127.0.0.1: {busy}; choose another --base-port")
        meta = self.results["meta"]
        meta.update({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": a.quick, "argv": sys.argv,
                     "ports": ports, "host": host_info(),
                     "plan": {"runs": runs, "messages": n, "sessions": SESSIONS,
                              "per_connection": PER_CONNECTION, "sizes": list(SIZES)}})
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"filter: output in {self.out}")

        ensure_postfix()
        ensure_rspamd()
        meta["versions"] = {"postfix": postfix_version(), "rspamd": rspamd_version()}

        keys = make_keys(self.work / "keys")
        for size in SIZES:
            path = self.out / "messages" / f"{size}.eml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(signed_message(SIZE_BYTES[size], keys["rsa_pem"]))
            path.chmod(0o644)
            self.messages[size] = path
        from tests.dnsserver import start_dns_server
        zone_data = zones(keys)
        self.dns = start_dns_server(self.work / "dns", zone_data)
        dns_addr = f"127.0.0.1:{self.dns.port}"
        meta["dns"] = {"port": self.dns.port, "zones": zone_data}
        log(f"filter: DNS server on {dns_addr} (pid {self.dns.pid})")

        extra = json.loads(json.dumps(SMARTHOST_EXTRA))     # a copy
        extra.setdefault("dns", {})["nameservers"] = [dns_addr]
        modules = ""
        meta["chain"] = a.chain
        if a.chain == "full":
            from tests.clamd import start_clamd
            from tests.redisserver import start_redis_server
            (self.work / "clamd").mkdir(parents=True, exist_ok=True)
            self.clamd = start_clamd(self.work / "clamd")
            self.redis = start_redis_server(self.work / "redis")
            allow_network(self.redis.client())
            extra.update(smarthost_full_chain(self.clamd.address, self.redis.address))
            modules = full_chain_modules(self.clamd.address, self.redis.address)
            meta["services"] = {"clamd": self.clamd.address, "redis": self.redis.address}
            log(f"filter: clamd on {self.clamd.address}, redis on {self.redis.address}")
        meta["smarthost_extra"] = {"filter": extra}
        meta["rspamd"] = {"config": str(self.work / "postfix+rspamd" / "rspamd" / "rspamd.conf"),
                          "c_modules": list(RSPAMD_C_MODULES),
                          "lua_modules": list(RSPAMD_LUA_MODULES) + (list(FULL_LUA_MODULES) if modules else [])}

        systems = {}
        log(f"filter: starting {', '.join(wanted)}")
        if "postfix" in wanted:
            systems["postfix"] = self.start(PostfixChain(self.work / "postfix", ports["postfix"]))
        if "postfix+rspamd" in wanted:
            systems["postfix+rspamd"] = self.start(PostfixWithRspamd(
                self.work / "postfix+rspamd", ports["postfix+rspamd"], ports["rspamd_milter"], self.dns.port,
                modules=modules))
        if "smarthost" in wanted:
            systems["smarthost"] = self.start(SmarthostChain(self.work / "smarthost", ports["smarthost"],
                                                             extra={"filter": extra}))
        if "smarthost-nochecks" in wanted:
            systems["smarthost-nochecks"] = self.start(SmarthostChain(
                self.work / "smarthost-nochecks", ports["smarthost-nochecks"], extra={"filter": {**extra, **NO_CHECKS}}))
        self.tiers = {"postfix": TIERS, "postfix+rspamd": TIERS + ("rspamd",), "smarthost": TIERS,
                      "smarthost-nochecks": TIERS}
        if "postfix+rspamd" in systems:
            meta["rspamd"]["config_text"] = systems["postfix+rspamd"].rspamd.conf.read_text()
            meta["postfix_filter_milter"] = systems["postfix+rspamd"].chain.settings["filter"]
        self.warm_up(systems)
        print_samples(self.results["samples"])
        self.save()

        names = list(systems)
        for size in SIZES:
            point = {"size": size, "size_bytes": SIZE_BYTES[size],
                     "message_bytes": self.messages[size].stat().st_size, "messages": n,
                     "sessions": SESSIONS, "per_connection": PER_CONNECTION,
                     "systems": {name: {"tiers": list(self.tiers[name]), "runs": []} for name in names}}
            self.results["points"].append(point)
            for k in range(runs):
                order = names[k % len(names):] + names[:k % len(names)]      # rotate who goes first
                for name in order:
                    system = systems[name]
                    tiers = self.tiers[name]
                    offset = system.rspamd.log_size() if name == "postfix+rspamd" else 0
                    r = self.measured_run(name, system, tiers,
                                          self.send_argv(system, size, n, f"{TAGS[name]}{size}r{k}"),
                                          lambda s=system, t=tiers: all(s.queue_empty(x) for x in t),
                                          system.maildir("alice"), timeout=600)
                    r["run"], r["order"] = k, order.index(name)
                    if name == "postfix+rspamd":
                        r["rspamd_log"] = system.rspamd.scans_since(offset)
                    point["systems"][name]["runs"].append(r)
                    extra_log = ""
                    if "rspamd_log" in r:
                        c = r["rspamd_log"]
                        extra_log = (f"; rspamd: {c.get('all_pass')}/{c.get('scans')} scans spf+dkim+dmarc pass"
                                     + (f", {c.get('av_clean')} clamd scans" if a.chain == "full" else ""))
                    log(f"  {SIZE_LABEL[size]:>5} run {k + 1}/{runs} {name:14}: delivered "
                        f"{fmt(r['delivered_per_s'])}/s ({r['delivered']}/{n}), 250 p50 "
                        f"{fmt(r['latency_250_ms']['p50'], 1)} ms; others {r['others_cpus']:.2f} CPUs, "
                        f"load {r['loadavg_1m_before']:.2f}, calibration {r['calibration_ms']:.0f} ms"
                        + extra_log)
                    self.save()
            for name in names:
                entry = point["systems"][name]
                entry["summary"] = self.summarize(entry["runs"], self.tiers[name])
            print_point(point)
            self.save()
        for system in list(systems.values()):
            self.stop(system)
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["duration_s"] = round(time.monotonic() - t_start, 1)
        self.save()
        print_summary(self.results)
        log(f"filter: results {self.out / 'filter.json'}; took {meta['duration_s']:.0f} s")


# -- printing --------------------------------------------------------------------------------------

def print_samples(samples: dict) -> None:
    print("\n==== Authentication-Results of a delivered message (warm-up) ====")
    for name, by_size in samples.items():
        for size, s in by_size.items():
            ar = s["authentication_results"]
            print(f"  {name:14} {SIZE_LABEL[size]:>5}: " + (" | ".join(ar) if ar else "(none)"))
    sys.stdout.flush()


def print_point(point: dict) -> None:
    runs = len(next(iter(point["systems"].values()))["runs"])
    print(f"\n{SIZE_LABEL[point['size']]} ({point['message_bytes']} bytes signed), {point['sessions']} sessions, "
          f"one message per connection, {point['messages']} messages, {runs} run(s)")
    cols = [("system", 14), ("delivered/s (min-max)", 21), ("250 ms p50/p99", 15), ("Maildir ms p50/p99", 18),
            ("CPU ms/msg edge/filter/domain", 30), ("rspamd", 7), ("filter+rspamd", 13)]
    print("  " + " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cols)))
    for name, e in point["systems"].items():
        s = e["summary"]
        cpu = s["cpu_ms_per_msg"]
        both = (cpu["filter"] + cpu["rspamd"]) if cpu.get("rspamd") is not None and cpu["filter"] is not None \
            else cpu["filter"]
        cells = [name, fmt_spread(s["delivered_per_s"]),
                 f"{fmt(s['latency_250_ms']['p50'], 1)}/{fmt(s['latency_250_ms']['p99'], 1)}",
                 f"{fmt(s['latency_maildir_ms']['p50'], 1)}/{fmt(s['latency_maildir_ms']['p99'], 1)}",
                 "/".join(fmt(cpu[t], 2) for t in TIERS), fmt(cpu.get("rspamd"), 2), fmt(both, 2)]
        line = "  " + " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, cols)))
        if s["failed"]:
            line += f"   ({s['failed']} not accepted)"
        if s["undelivered"]:
            line += f"   ({s['undelivered']} accepted, not in the Maildir)"
        print(line)
        for r in e["runs"]:
            if "rspamd_log" in r:
                c = r["rspamd_log"]
                print(f"  {'':14} rspamd's log, run {r['run_id']}: {c.get('scans')} scans, spf/dkim/dmarc pass "
                      f"{c.get('spf_pass')}/{c.get('dkim_pass')}/{c.get('dmarc_pass')}, all three {c.get('all_pass')}")
    sys.stdout.flush()


def print_summary(results: dict) -> None:
    print("\n==== summary: delivered msg/s (median of runs); CPU ms per message of the filtering ====")
    for p in results["points"]:
        for name, e in p["systems"].items():
            s = e["summary"]
            cpu = s["cpu_ms_per_msg"]
            what = (f"filter tier {fmt(cpu['filter'], 2)} + rspamd {fmt(cpu['rspamd'], 2)}" if "rspamd" in cpu
                    else f"filter tier {fmt(cpu['filter'], 2)}")
            print(f"  {SIZE_LABEL[p['size']]:>5} {name:14} {fmt(s['delivered_per_s']['median']):>6} msg/s   {what}")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.filter", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a new /tmp/smarthost-filter-*)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_MESSAGES} messages per run, 1 run per size")
    p.add_argument("--messages", type=int, default=0,
                   help=f"messages per run (default {MESSAGES}, --quick {QUICK_MESSAGES})")
    p.add_argument("--runs", type=int, default=0, help="runs per size and system (default 3, --quick 1)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"which, comma-separated (default {','.join(SYSTEMS)}; also smarthost-nochecks: the "
                        f"filter's end-of-data checks off, to see what they cost)")
    p.add_argument("--chain", choices=CHAINS, default="full",
                   help="full (the default): sender authentication, antivirus (one clamd), greylisting (one "
                        "Redis, passing) and DNS lists on both sides; auth: sender authentication only (the "
                        "first comparison's chain)")
    p.add_argument("--base-port", type=int, default=24200,
                   help="smarthost N..N+2, Postfix N+10..N+12, Postfix with rspamd N+20..N+22, "
                        "rspamd's milter N+25 (bench.run's default is 24000)")
    return run_bench("filter", p.parse_args(argv), FilterBench, "smarthost-filter",
                     root="Postfix's daemons need it")


if __name__ == "__main__":
    sys.exit(main())
