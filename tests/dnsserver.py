"""A real DNS server for tests: Twisted's authoritative server in its own process.

``start_dns_server(directory, zones)`` writes one zone file per zone into a new
directory under `directory`, runs ``python -m twisted dns`` on a free port of
127.0.0.1 (UDP and TCP, the same number), waits until it answers a real query,
and returns a DNSServer; ``.stop()`` ends it by its pid.  The ``dns_server``
fixture is a factory that stops every server it started when the test ends:

    from tests.dnsserver import dns_server  # noqa: F401  (makes the fixture visible)

    def test_x(dns_server):
        server = dns_server({"test": [("mx", "A", "127.0.0.25")]})
        resolver = ReverseResolver(reactor=r, nameservers=server.nameservers)

Zones are data: ``{zone name: records}``.  Records are tuples
``(owner, type, value)`` or ``(owner, type, value, ttl)``:

- owner: "@" for the apex; a name ending in "." or in the zone name is
  absolute; anything else is relative to the zone ("10" in
  "0.0.127.in-addr.arpa");
- type and value: "A"/"AAAA" address; "PTR"/"CNAME"/"NS" name;
  "MX" (preference, name) or "10 name"; "TXT" a string or a list of strings;
- ttl defaults to 300.

Each zone gets an SOA (negative TTL 60) and an NS record unless it has its own NS.
Instead of records, a zone may be given as BIND zone-file text (``$ORIGIN`` and
``$TTL`` are the only directives Twisted's server reads).

- "SERVFAIL" (value ignored, may be None): every query of that name fails
  inside the server, which answers SERVFAIL (a broken list, or its resolver
  unable to reach it).

The server answers only for its zones: names outside them get NXDOMAIN; it does
not recurse.

The clients of such a server want a real reactor that a test can spin:
``RealReactor`` (the ``real`` fixture) is a private SelectReactor instance, never
installed and never run; ``wait(d)`` iterates it until `d` fires, within a
deadline, and ``close()`` releases its sockets and timers.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pytest

from tests.support import RealReactor, real  # noqa: F401  (the tests take them from here too)

DEFAULT_TTL = 300
NEGATIVE_TTL = 60

_NAME_TYPES = {"PTR", "CNAME", "NS"}

# In the zone file (executed by the server): a record whose every use raises, so that a
# query of its name fails inside the server's resolver chain, which then answers SERVFAIL.
_UNANSWERABLE = '''class Unanswerable:
    TYPE = None

    @property
    def ttl(self):
        raise RuntimeError("this name answers SERVFAIL, on purpose")

'''


def free_port_udp_tcp(host: str = "127.0.0.1") -> int:
    """A port number free for both UDP and TCP on `host` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for UDP and TCP on {host}")


def _absolute(owner: str, zone: str) -> str:
    zone = zone.rstrip(".").lower()
    owner = owner.strip()
    if owner == "@":
        return zone
    if owner.endswith("."):
        return owner.rstrip(".")
    low = owner.lower()
    if low == zone or low.endswith("." + zone):
        return owner
    return f"{owner}.{zone}"


def _record_source(zone: str, record: Sequence) -> str:
    if len(record) not in (3, 4):
        raise ValueError(f"record must be (owner, type, value[, ttl]): {record!r}")
    owner, rtype, value = record[0], record[1].upper(), record[2]
    ttl = int(record[3]) if len(record) == 4 else DEFAULT_TTL
    name = _absolute(owner, zone)
    if rtype in ("A", "AAAA"):
        return f"{rtype}({name!r}, {str(value)!r}, ttl={ttl})"
    if rtype in _NAME_TYPES:
        return f"{rtype}({name!r}, {_absolute(str(value), zone)!r}, ttl={ttl})"
    if rtype == "MX":
        pref, exchange = value if isinstance(value, (tuple, list)) else str(value).split(None, 1)
        return f"MX({name!r}, {int(pref)}, {_absolute(str(exchange), zone)!r}, ttl={ttl})"
    if rtype == "SERVFAIL":
        return f"({name.lower().encode()!r}, Unanswerable())"
    if rtype == "TXT":
        strings = [value] if isinstance(value, (str, bytes)) else list(value)
        data = ", ".join(repr(s.encode() if isinstance(s, str) else bytes(s)) for s in strings)
        return f"TXT({name!r}, {data}, ttl={ttl})"
    raise ValueError(f"unsupported record type {rtype!r} in zone {zone!r}")


def zone_source(zone: str, records: Iterable[Sequence]) -> str:
    """The Python-syntax zone file (twisted.names PySourceAuthority) for `records`."""
    zone = zone.rstrip(".")
    records = list(records)
    lines = [_UNANSWERABLE] if any(r[1].upper() == "SERVFAIL" for r in records) else []
    lines += ["zone = [",
             f"    SOA({zone!r}, mname={'ns.' + zone!r}, rname={'hostmaster.' + zone!r},"
             f" serial=1, refresh=3600, retry=600, expire=86400, minimum={NEGATIVE_TTL},"
             f" ttl={NEGATIVE_TTL}),"]
    if not any(r[1].upper() == "NS" and _absolute(r[0], zone).lower() == zone.lower() for r in records):
        lines.append(f"    NS({zone!r}, {'ns.' + zone!r}, ttl={DEFAULT_TTL}),")
    lines += [f"    {_record_source(zone, r)}," for r in records]
    lines.append("]")
    return "\n".join(lines) + "\n"


def _probe(host: str, port: int, zone: str, timeout: float = 0.2) -> bool:
    """True if the server at host:port answers a SOA query for `zone` with NOERROR."""
    from twisted.names import dns

    query = dns.Message(id=0x5A5A, recDes=0)
    query.queries = [dns.Query(zone.rstrip(".").encode("ascii"), dns.SOA, dns.IN)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query.toStr(), (host, port))
            data, _ = s.recvfrom(4096)
        except OSError:
            return False
    reply = dns.Message()
    try:
        reply.fromStr(data)
    except Exception:
        return False
    return bool(reply.answer) and reply.id == query.id and reply.rCode == dns.OK


@dataclass
class DNSServer:
    host: str
    port: int
    directory: Path
    log: Path
    proc: subprocess.Popen

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """What ReverseResolver(nameservers=...) and twisted.names.client.Resolver(servers=...) take."""
        return [(self.host, self.port)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """End the server by its pid (SIGTERM, then SIGKILL); returns its exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "DNSServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_dns_server(directory: Path, zones: dict[str, Iterable[Sequence] | str], *,
                     host: str = "127.0.0.1", port: int | None = None,
                     timeout: float = 10.0) -> DNSServer:
    """Start a real DNS server serving `zones`; return once it answers. See the module docstring."""
    if not zones:
        raise ValueError("at least one zone is needed")
    Path(directory).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dns-", dir=directory))
    args: list[str] = []
    for i, (zone, records) in enumerate(zones.items()):
        zone = zone.rstrip(".")
        if isinstance(records, str):
            path = workdir / zone                 # BindAuthority takes the origin from the file name
            path.write_text(records)
            args += ["--bindzone", str(path)]
        else:
            path = workdir / f"zone{i}.py"
            path.write_text(zone_source(zone, records))
            args += ["--pyzone", str(path)]
    probe_zone = next(iter(zones)).rstrip(".")
    log = workdir / "dns.log"
    attempts = 1 if port is not None else 3
    last_error = ""
    for _ in range(attempts):
        use_port = port if port is not None else free_port_udp_tcp(host)
        cmd = [sys.executable, "-m", "twisted", "--log-file", str(log), "--log-format", "text",
               "dns", "--interface", host, "--port", str(use_port), *args]
        with open(workdir / "dns.stderr", "ab") as stderr:
            proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        server = DNSServer(host, use_port, workdir, log, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.running():
            if _probe(host, use_port, probe_zone):
                return server
            time.sleep(0.05)
        server.stop()
        stderr = (workdir / "dns.stderr").read_text(errors="replace")
        last_error = f"exit status {proc.returncode}\n{stderr[-2000:]}\n{server.log_tail()}"
    raise RuntimeError(f"DNS server did not answer on {host}:{use_port}: {last_error}")


@pytest.fixture
def dns_server(tmp_path):
    """Factory fixture: ``dns_server(zones, **kw) -> DNSServer``; all are stopped after the test."""
    started: list[DNSServer] = []

    def start(zones, **kwargs) -> DNSServer:
        server = start_dns_server(tmp_path, zones, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
