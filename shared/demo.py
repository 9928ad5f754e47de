"""`smarthost demo`: the whole pipeline on one machine, with embedded defaults.

Writes three tier configurations under DIR, starts each tier as its own child
process (exactly as they run on separate machines), waits until all three
listen, writes DIR/demo.json and prints how to send a test message.

The edge runs the three listener roles: mx on the base port, submission
(587's role) on base + 3 and submissions (465's, implicit TLS) on base + 4.
Its users (alice and bob of the hosted domain) get random passwords the first
time DIR is used, kept in DIR/users.json (mode 0600) and printed that once;
they are in the embedded user store DIR/users with CRAM-MD5 secrets, so every
mechanism can be tried.

The filter runs every check: the demo starts its own DNS server (base + 5: the hosted
domain's SPF, DKIM key and DMARC p=reject) and, when clamav-daemon is installed (compose/demo
installs it), its own clamd (base + 6) with the tests' signatures (EICAR and our own) and any
ClamAV database already on the machine, and, when redis-server is installed (compose/demo installs
it too), its own redis-server (base + 7) for the filter's greylist; demo.json lists them under
"services".  Greylisting is on for mail that scores 1 or more, with a delay of 10 s, printed
with a command that shows it.  Ctrl-C or SIGTERM stops every child (the tiers, the DNS
server, clamd, redis-server) with SIGTERM and waits for them.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.config import dump
from shared.tlsutil import self_signed

DOMAIN = "example.test"
USERS = ("alice", "bob")
LISTENERS = (("mx", "edge"), ("submission", "submission"), ("submissions", "submissions"))  # (role, port)


def _demo_certificate(tls_dir: Path, hostname: str) -> tuple[str, str]:
    """The demo's self-signed certificate, made once and kept across runs."""
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if not (cert_path.exists() and key_path.exists()):
        cert_path, key_path = self_signed(tls_dir, hostname)
    return str(cert_path), str(key_path)


def demo_ports(base_port: int) -> dict[str, int]:
    return {"edge": base_port, "filter": base_port + 1, "domain": base_port + 2,
            "submission": base_port + 3, "submissions": base_port + 4, "dns": base_port + 5,
            "clamd": base_port + 6, "redis": base_port + 7}


CLAMD = "/usr/sbin/clamd"
SIGNATURES = Path(__file__).resolve().parents[1] / "tests" / "clamav"   # EICAR and our own test signature
SYSTEM_DATABASE = Path("/var/lib/clamav")


REDIS_SERVER = "/usr/bin/redis-server"
GREYLIST_DELAY = 10          # seconds: short, so that the retry of the demo's greylisted message is quick
GREYLIST_SCORE = 1.0         # greylisted: messages scoring this much (SPF softfail), not a plain swaks


def redis_available() -> bool:
    return os.path.exists(REDIS_SERVER)


def redis_command(root: Path, port: int) -> list[str]:
    """The demo's redis-server: on 127.0.0.1:port, its files in DIR/redis, its log in DIR/log."""
    (root / "redis").mkdir(exist_ok=True)
    return [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root / "redis"),
            "--daemonize", "no", "--save", "60 1", "--appendonly", "no", "--protected-mode", "yes",
            "--logfile", str(root / "log" / "redis.log")]


def clamd_available() -> bool:
    return os.path.exists(CLAMD) and SIGNATURES.is_dir()


def demo_clamd(root: Path, port: int) -> Path:
    """The demo's clamd.conf (DIR/clamd): the shipped test signatures, and any ClamAV
    database already on the machine (linked, not copied), on 127.0.0.1:port."""
    db = root / "clamd" / "db"
    db.mkdir(parents=True, exist_ok=True)
    for f in SIGNATURES.iterdir():
        shutil.copy(f, db / f.name)
    if SYSTEM_DATABASE.is_dir():
        for f in SYSTEM_DATABASE.iterdir():
            if f.suffix in (".cvd", ".cld") and not (db / f.name).exists():
                os.symlink(f, db / f.name)
    lines = [f"DatabaseDirectory {db}", f"TCPSocket {port}", "TCPAddr 127.0.0.1", "Foreground yes",
             f"LogFile {root / 'log' / 'clamd.log'}", f"PidFile {root / 'run' / 'clamd.pid'}", "ScanMail yes",
             "ScanArchive yes", "StreamMaxLength 30M"]
    if os.getuid() == 0:
        lines.append("User root")            # the demo's files are root's: clamd would become clamav
    conf = root / "clamd" / "clamd.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


DKIM_SELECTOR = "demo"


def demo_dkim_key(root: Path) -> tuple[Path, str]:
    """The demo domain's DKIM signing key (made once, kept in DIR/dkim) and its TXT record text."""
    from filter.dkimsign import keygen, load_key, txt_record
    directory = root / "dkim"
    directory.mkdir(exist_ok=True)
    path = directory / f"{DOMAIN}.{DKIM_SELECTOR}.key"
    if not path.exists():
        keygen(DOMAIN, DKIM_SELECTOR, str(directory))
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    load_key(str(path))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, txt_record("rsa", public)


def demo_zone(dkim_record: str) -> str:
    """The hosted domain's zone for the demo's own DNS server (twisted.names' Python zone
    format): SPF allowing no host (the domain's mail is its users', submitted with AUTH and
    DKIM-signed), the DKIM key, DMARC p=reject; and softfail.DOMAIN, whose SPF says ~all
    and DMARC p=none: its mail scores enough to be greylisted.  Names outside it get NXDOMAIN,
    so the filter's checks answer at once on a machine without Internet."""
    chunks = ", ".join(repr(dkim_record[i:i + 250].encode()) for i in range(0, len(dkim_record), 250))
    return f"""zone = [
    SOA({DOMAIN!r}, mname='ns.{DOMAIN}', rname='hostmaster.{DOMAIN}', serial=1, refresh=3600, retry=600,
        expire=86400, minimum=60, ttl=60),
    NS({DOMAIN!r}, 'ns.{DOMAIN}', ttl=300),
    A('ns.{DOMAIN}', '127.0.0.1', ttl=300),
    TXT({DOMAIN!r}, b'v=spf1 -all', ttl=300),
    TXT('_dmarc.{DOMAIN}', b'v=DMARC1; p=reject; adkim=r; aspf=r', ttl=300),
    TXT('softfail.{DOMAIN}', b'v=spf1 ~all', ttl=300),
    TXT('_dmarc.softfail.{DOMAIN}', b'v=DMARC1; p=none', ttl=300),
    TXT('{DKIM_SELECTOR}._domainkey.{DOMAIN}', {chunks}, ttl=300),
]
"""


def sections(root: Path, base_port: int, cert: str, key: str, nameserver: str | None = None,
             dkim_key: Path | None = None, clamd: bool = False, redis: bool = False) -> dict[str, dict[str, dict]]:
    """The three tiers' settings for a one-machine pipeline on 127.0.0.1 (edge mx on
    base_port, filter on base_port + 1, domain on base_port + 2, the edge's submission
    and submissions on base_port + 3 and + 4); loopback clients get no reverse DNS
    lookup."""
    ports = demo_ports(base_port)
    users = [f"{u}@{DOMAIN}" for u in USERS]

    def log(tier: str) -> dict:
        return {"file": str(root / "log" / f"{tier}.log")}

    def pid(tier: str) -> str:          # `smarthost reload --config DIR/TIER.toml` finds the tier by it
        return str(root / "run" / f"{tier}.pid")
    return {
        "edge": {
            "server": {"hostname": "edge.example.test", "tls_cert": cert, "tls_key": key,
                       "shutdown_timeout": 10, "reverse_lookup": False, "pid_file": pid("edge")},
            "listeners": {role: {"endpoint": f"tcp:port={ports[port]}:interface=127.0.0.1", "role": role}
                          for role, port in LISTENERS},
            "auth": {"users_file": str(root / "users")},
            "relay": {"relay_domains": [DOMAIN]},
            "next_hop": {"hosts": [f"127.0.0.1:{ports['filter']}"], "tls": "none"},
            "log": log("edge"),
        },
        "filter": {
            "server": {"hostname": "filter.example.test", "listen": [f"127.0.0.1:{ports['filter']}"],
                       "upstream_hosts": ["127.0.0.1"], "shutdown_timeout": 10, "pid_file": pid("filter")},
            "relay": {"relay_domains": [DOMAIN]},
            "next_hop": {"hosts": [f"127.0.0.1:{ports['domain']}"], "tls": "none"},
            "queue": {"directory": str(root / "spool" / "filter"), "retry_min": 60, "retry_max": 600},
            "dns": {"nameservers": [nameserver or f"127.0.0.1:{ports['dns']}"]},
            "dkim_sign": {"keys": [f"{DOMAIN} {DKIM_SELECTOR} {dkim_key}"] if dkim_key else []},
            "antivirus": {"servers": [f"127.0.0.1:{ports['clamd']}"] if clamd else []},
            "greylist": {"enabled": True, "min_score": GREYLIST_SCORE, "delay": GREYLIST_DELAY},
            "redis": {"servers": [f"127.0.0.1:{ports['redis']}"] if redis else []},
            "log": log("filter"),
        },
        "domain": {
            "server": {"hostname": "domain.example.test", "listen": [f"127.0.0.1:{ports['domain']}"],
                       "upstream_hosts": ["127.0.0.1"], "shutdown_timeout": 10, "pid_file": pid("domain")},
            "mailboxes": {"domains": [DOMAIN], "maildir_root": str(root / "mail"), "users": users,
                          "aliases": {f"postmaster@{DOMAIN}": [users[0]]}},
            "log": log("domain"),
        },
    }


def demo_users(root: Path) -> tuple[dict[str, str], bool]:
    """The demo's users and passwords: made (random) the first time `root` is used and
    kept in root/users.json; (users, whether they were made now)."""
    kept = root / "users.json"
    try:
        users = json.loads(kept.read_text())
        if sorted(users) == sorted(f"{u}@{DOMAIN}" for u in USERS) and (root / "users").exists():
            return users, False
    except (OSError, ValueError):
        pass
    users = {f"{u}@{DOMAIN}": secrets.token_urlsafe(12) for u in USERS}
    from shared.auth.store import editing, make_user
    with editing(str(root / "users")) as store:
        store.clear()
        for name, password in users.items():
            store[name.lower()] = make_user(name, password, cram_md5=True)
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(users, f, indent=2)
    return users, True


def write_configs(root: Path, base_port: int, nameserver: str | None = None,
                  clamd: bool = False, redis: bool = False) -> dict[str, Path]:
    """The three tiers' configuration files, written with the project's TOML writer (any
    path, quotes and backslashes included, comes out as valid TOML), and the demo's zone."""
    root.mkdir(parents=True, exist_ok=True)
    cert, key = _demo_certificate(root / "tls", "edge.example.test")
    (root / "log").mkdir(exist_ok=True)
    (root / "run").mkdir(exist_ok=True)
    dkim_key, record = demo_dkim_key(root)
    (root / "dns").mkdir(exist_ok=True)
    (root / "dns" / "zone.py").write_text(demo_zone(record))
    paths = {}
    if clamd:
        demo_clamd(root, demo_ports(base_port)["clamd"])
    for tier, values in sections(root, base_port, cert, key, nameserver, dkim_key, clamd, redis).items():
        p = root / f"{tier}.toml"
        p.write_text(dump(tier, values))
        paths[tier] = p
    return paths


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_demo(directory: str, base_port: int, nameserver: str | None = None) -> int:
    root = Path(directory).resolve()
    ports = demo_ports(base_port)
    if nameserver:
        ports.pop("dns")
    clamd = clamd_available()
    if not clamd:
        ports.pop("clamd")
        print(f"smarthost demo: no antivirus: {CLAMD} (clamav-daemon) or the test signatures ({SIGNATURES}) "
              f"are missing", file=sys.stderr)
    redis = redis_available()
    if not redis:
        ports.pop("redis")
        print(f"smarthost demo: no {REDIS_SERVER} (redis-server): the filter keeps its greylist in its own "
              f"process", file=sys.stderr)
    busy = [f"{t} {p}" for t, p in ports.items() if _port_open(p)]
    if busy:
        print(f"smarthost demo: port in use on 127.0.0.1 ({', '.join(busy)}); choose another --base-port",
              file=sys.stderr)
        return 1
    configs = write_configs(root, base_port, nameserver, clamd, redis)
    users, new_users = demo_users(root)
    from shared.config import load
    children: dict[str, subprocess.Popen] = {}
    stopping: list[int] = []
    # Installed before any child exists, so an early Ctrl-C still stops them all.
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    for tier in ("domain", "filter", "edge"):        # fail early, with the file and key, if invalid
        load(tier, configs[tier])
    if not nameserver:                               # the demo's own DNS server: the hosted domain's zone
        children["dns"] = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-file", str(root / "log" / "dns.log"), "dns",
             "--interface", "127.0.0.1", "--port", str(ports["dns"]), "--pyzone", str(root / "dns" / "zone.py")],
            cwd=root / "dns", stdin=subprocess.DEVNULL)
    if clamd:                                        # the demo's own clamd: the shipped test signatures
        children["clamd"] = subprocess.Popen([CLAMD, "-c", str(root / "clamd" / "clamd.conf")],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)   # logs in DIR/log
    if redis:                                        # the demo's own redis-server: the filter's greylist
        children["redis"] = subprocess.Popen(redis_command(root, ports["redis"]), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL)
    for tier in ("domain", "filter", "edge"):        # start downstream first
        children[tier] = subprocess.Popen([sys.executable, "-m", "shared.cli", tier, "--config", str(configs[tier])])

    def stop_all(*_):
        for p in children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in children.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    deadline = time.monotonic() + (90 if clamd else 20)    # clamd reads a full database in a minute
    while not all(_port_open(p) for p in ports.values()):
        dead = [t for t, p in children.items() if p.poll() is not None]
        if dead or stopping or time.monotonic() > deadline:
            stop_all()
            if stopping and not dead:
                return 0
            why = f"{', '.join(dead)} exited" if dead else "tiers did not start listening in time"
            print(f"smarthost demo: {why}; see {root / 'log'}", file=sys.stderr)
            return 1
        time.sleep(0.1)

    mailboxes = {f"{u}@{DOMAIN}": str(root / "mail" / DOMAIN / u / "Maildir") for u in USERS}
    info = {
        "tiers": {t: {"smtp": f"127.0.0.1:{ports[t]}", "pid": children[t].pid, "config": str(configs[t])}
                  for t in ("edge", "filter", "domain")},
        "domain": DOMAIN,
        "mailboxes": mailboxes,
        "users": users,
    }
    info["tiers"]["edge"]["listeners"] = {role: f"127.0.0.1:{ports[port]}" for role, port in LISTENERS}
    from filter.service import TIER as FILTER
    from shared.checks.registry import active_checks
    info["tiers"]["filter"]["checks"] = active_checks(load("filter", configs["filter"]), FILTER)
    info["dns"] = nameserver or f"127.0.0.1:{ports['dns']}"
    info["services"] = {}
    if not nameserver:
        info["services"]["dns"] = f"127.0.0.1:{ports['dns']}"
    if clamd:
        info["services"]["clamd"] = f"127.0.0.1:{ports['clamd']}"
    if redis:
        info["services"]["redis"] = f"127.0.0.1:{ports['redis']}"
    info["greylist"] = {"delay": GREYLIST_DELAY, "min_score": GREYLIST_SCORE}
    (root / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    if new_users:
        passwords = ", ".join(f"{u} {p}" for u, p in users.items())
        print(f"demo users (printed this once; kept in {root / 'users.json'}): {passwords}", flush=True)
    alice = f"alice@{DOMAIN}"
    antivirus = (f"clamd at 127.0.0.1:{ports['clamd']} scans every message (test signatures: EICAR, "
                 f"{SIGNATURES}); an EICAR attachment gets 554 5.7.1:\n"
                 f"  swaks --server 127.0.0.1:{ports['edge']} --to bob@{DOMAIN} --attach eicar.com\n"
                 if clamd else "")
    print(f"""smarthost demo running: edge 127.0.0.1:{ports['edge']} -> filter :{ports['filter']} -> domain :{ports['domain']}
edge listeners: mx :{ports['edge']}, submission :{ports['submission']} (STARTTLS + AUTH), submissions :{ports['submissions']} (TLS + AUTH)
hosted domain {DOMAIN}, users {', '.join(mailboxes)}; logs in {root / 'log'}; details in {root / 'demo.json'}

Send a test message:
  swaks --server 127.0.0.1:{ports['edge']} --from you@example.net --to alice@{DOMAIN}
or
  python3 -c "import smtplib; s=smtplib.SMTP('127.0.0.1', {ports['edge']}); s.starttls(); \\
s.sendmail('you@example.net', ['alice@{DOMAIN}'], 'Subject: hi\\r\\n\\r\\nhello\\r\\n'); s.quit()"
Submit as alice (her password is in {root / 'users.json'}):
  swaks --server 127.0.0.1:{ports['submission']} --tls --auth PLAIN --auth-user {alice} --auth-password PASSWORD \\
    --from {alice} --to bob@{DOMAIN}
Then look in {mailboxes[alice]}/new/ (the filter's Authentication-Results and X-Spam-Status fields
are on top; mail submitted as alice is DKIM-signed for {DOMAIN}, selector {DKIM_SELECTOR})
The filter checks SPF, DKIM, DMARC and ARC with DNS at {info['dns']}: {DOMAIN} publishes p=reject, so
  swaks --server 127.0.0.1:{ports['edge']} --from forger@{DOMAIN} --to bob@{DOMAIN}   gets 550 5.7.1
Greylisting is on for mail that scores {GREYLIST_SCORE:g} or more (kept in {'redis at 127.0.0.1:' + str(ports['redis']) if redis else 'the filter'}),
with a delay of {GREYLIST_DELAY} seconds. softfail.{DOMAIN} publishes SPF ~all, so
  swaks --server 127.0.0.1:{ports['edge']} --from you@softfail.{DOMAIN} --to bob@{DOMAIN}
gets 451 4.7.1 "Greylisted: please try again in {GREYLIST_DELAY} seconds"; the same command after that is delivered.
{antivirus}After editing a tier's file: python3 -m shared.cli reload --config {configs['edge']}
Press Ctrl-C to stop.""", flush=True)

    try:
        while not stopping:
            dead = [t for t, p in children.items() if p.poll() is not None]
            if dead:
                print(f"smarthost demo: {', '.join(dead)} exited; stopping; see {root / 'log'}", file=sys.stderr)
                stop_all()
                return 1
            time.sleep(0.2)
    finally:
        stop_all()
    print("smarthost demo stopped", flush=True)
    return 0
