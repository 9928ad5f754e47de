"""Running one tier: listeners, the engine, the tier's parts, signals.

A tier module (``edge.service``, ``filter.service``, ``domain.service``)
provides ``build(settings, reactor, pool) -> TierParts``: its sink, its checks
in order, and what it must start and stop (the filter's queue manager).  This
module does the rest, identically for every tier.

Signals: SIGTERM and SIGINT stop accepting connections, give open transactions
``server.shutdown_timeout`` seconds to finish (idle sessions get 421 at once),
stop the tier's parts and exit 0.  SIGHUP reloads the configuration file; a
file that does not validate is logged with its error and the running settings
stay.  Listen addresses are bound once: a change to them needs a restart.
"""
from __future__ import annotations

import grp
import importlib
import os
import pwd
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from shared.blocking import BlockingPool
from shared.checks.core import Chain, Check
from shared.checks.relay import RelayPolicy
from shared.config import ConfigError, Settings, check_host, load
from shared.config.schema import hostport_text
from shared.netlist import NetworkList
from shared.engine.session import EngineConfig, EngineSession
from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory

log = Logger(namespace="smarthost.daemon")

TIER_MODULES = {"edge": "edge.service", "filter": "filter.service", "domain": "domain.service"}


@dataclass
class TierParts:
    sink: object
    checks: list[Check] = field(default_factory=list)
    start: Callable[[], object] | None = None
    stop: Callable[[], object] | None = None
    reload: Callable[[Settings], None] | None = None   # may replace `checks`


def server_config(settings: Settings) -> ServerConfig:
    s = settings["server"]
    return ServerConfig(hostname=s["hostname"], max_message_size=s["max_message_size"],
                        max_recipients=s["max_recipients"], max_data_line=s["max_line_length"],
                        hard_error_limit=s["max_errors"], junk_command_limit=s["max_junk_commands"])


def allowed_clients(settings: Settings) -> NetworkList | None:
    """Who may open a session: anyone at the edge; at the inner tiers only the
    upstream tiers and ``mynetworks``, unless ``server.allow_any_client`` says
    otherwise (a client that reached the filter or the domain tier directly
    would skip the edge's protection and the filter's checks)."""
    if settings.tier == "edge" or settings["server"]["allow_any_client"]:
        return None
    return NetworkList([*settings["server"]["upstream_hosts"], *settings["relay"]["mynetworks"]])


def tls_context(settings: Settings):
    """The STARTTLS context of ``server.tls_cert`` and ``server.tls_key`` (None when unset).

    Raises ConfigError naming the key whose file cannot be read or holds no PEM
    certificate or key, or ``server.tls_key`` when the key is not the certificate's.
    """
    s = settings["server"]
    if not s["tls_cert"]:
        return None
    from OpenSSL import crypto
    from twisted.internet import ssl
    pem = {}
    for name in ("tls_cert", "tls_key"):
        try:
            with open(s[name], "rb") as f:
                pem[name] = f.read()
        except OSError as e:
            raise ConfigError(settings.path, f"server.{name}", f"cannot read {s[name]}: {e.strerror}") from None
    for name, what, loader in (("tls_cert", "certificate", ssl.Certificate.loadPEM),
                               ("tls_key", "private key", lambda b: ssl.KeyPair.load(b, crypto.FILETYPE_PEM))):
        try:
            loader(pem[name])
        except Exception as e:
            raise ConfigError(settings.path, f"server.{name}", f"no PEM {what} in {s[name]}: {e}") from None
    try:
        cert = ssl.PrivateCertificate.loadPEM(pem["tls_cert"] + b"\n" + pem["tls_key"])
    except Exception as e:
        raise ConfigError(settings.path, "server.tls_key", f"{s['tls_key']} does not go with "
                                                           f"server.tls_cert {s['tls_cert']}: {e}") from None
    return cert.options()


def preflight(settings: Settings) -> None:
    """What a tier needs from this host before it starts, checked without changing it:
    :func:`shared.config.check_host` and a TLS pair that loads.  Raises ConfigError;
    ``smarthost check-config`` runs the same, so it refuses whatever start-up would."""
    check_host(settings)
    tls_context(settings)


@contextmanager
def writable_directory(settings: Settings, section: str, name: str):
    """Around the code that makes and opens what a tier writes under its directory
    ``section.name`` (``queue.directory``, ``mailboxes.maildir_root``): a
    PermissionError becomes the ConfigError :func:`shared.config.check_host` gives,
    naming the key and the path the running user may not write.

    check_host judges the directory itself; this reports what lies below it, such
    as a subdirectory left owned by root while the tier runs as ``server.user``.
    """
    try:
        yield
    except PermissionError as e:
        try:
            who = f"user {pwd.getpwuid(os.geteuid()).pw_name}"
        except KeyError:
            who = f"uid {os.geteuid()}"
        path = e.filename or settings[section][name]
        raise ConfigError(settings.path, f"{section}.{name}", f"{path} is not writable by {who}") from None


def build_parts(settings: Settings, reactor, pool, dry_run: bool = False) -> TierParts:
    """The tier's parts; `dry_run` builds them without touching disk or network."""
    module = importlib.import_module(TIER_MODULES[settings.tier])
    return module.build(settings, reactor, pool, dry_run=dry_run)


class Daemon:
    def __init__(self, settings: Settings, reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        self.pool = BlockingPool(reactor, size=4, name=f"{settings.tier}-blocking")
        self.ports = []
        self.factories: list[SMTPServerFactory] = []
        self.parts: TierParts | None = None
        self.log_observer = None          # set by run(): the level follows reloads
        self._configure(settings)

    def _configure(self, settings: Settings) -> None:
        """Everything a reload may change without rebinding sockets."""
        self.engine_config = EngineConfig(hostname=settings.hostname,
                                          max_received_headers=settings["server"]["max_received_headers"],
                                          tier=settings.tier)
        self.relay = RelayPolicy(settings["relay"]["relay_domains"], settings["relay"]["mynetworks"])
        self.server_config = server_config(settings)
        self.allowed_clients = allowed_clients(settings)
        self.resolver = None
        if settings["server"]["reverse_lookup"]:
            from shared.dns import ReverseResolver
            self.resolver = ReverseResolver(reactor=self.reactor, nameservers=settings["dns"]["nameservers"] or None,
                                            timeout=settings["dns"]["timeout"])

    def _new_session(self, protocol):
        return EngineSession(protocol, config=self.engine_config, chain=self.chain, relay=self.relay,
                             sink=self.parts.sink, reactor=self.reactor, resolver=self.resolver)

    def start(self) -> None:
        """Bind every listener, drop privileges, then build and start the tier's parts.

        As Postfix's master and Twisted's ``privilegedStartService`` do, only what
        needs root is done as root: the tier's code is loaded (``server.user`` need
        not be able to read the installation), the TLS key is read and the ports
        are bound.  Then the daemon becomes ``server.user``, and only then are the
        tier's parts built and started, so that everything they create (the
        filter's spool and its pid lock, the domain tier's Maildir spool, their
        reserve files) is that user's.  The reactor runs this method: no connection
        is served before it returns.  The log file was opened before, by
        :func:`run`.

        Raises, its listeners closed and its pool stopped, when a listener cannot
        be bound or a part cannot be built or started.
        """
        s = self.settings["server"]
        importlib.import_module(TIER_MODULES[self.settings.tier])     # build_parts finds it loaded
        tls = tls_context(self.settings)
        try:
            for host, port in s["listen"]:
                factory = SMTPServerFactory(
                    reactor=self.reactor, server_config=self.server_config,
                    handler_factory=self._new_session, tls_context=tls,
                    upstream_hosts=s["upstream_hosts"], command_timeout=s["command_timeout"],
                    session_timeout=s["session_timeout"], max_connections=s["max_connections"],
                    max_connections_per_client=s["max_connections_per_client"],
                    allowed_clients=self.allowed_clients)
                self.ports.append(self.reactor.listenTCP(port, factory, interface=host, backlog=511))
                self.factories.append(factory)
                log.info("listening on {host}:{port}", host=host, port=port)
            if s["user"]:
                drop_privileges(s["user"])
            self.parts = build_parts(self.settings, self.reactor, self.pool)
            self.chain = Chain(self.parts.checks, reactor=self.reactor)
            self.pool.start()
            if self.parts.start:
                self.parts.start()
        except Exception:
            for p in self.ports:
                p.stopListening()
            self.pool.stop()
            raise
        hops = ", ".join(hostport_text(*h) for h in self.settings["next_hop"]["hosts"])
        log.info("{tier} started: hostname={h}, next hop={nh}", tier=self.settings.tier,
                 h=self.settings.hostname, nh=hops or "-")

    @defer.inlineCallbacks
    def stop(self):
        log.info("stopping: no new connections")
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        grace = self.settings["server"]["shutdown_timeout"]
        yield defer.gatherResults([f.shutdown(grace) for f in self.factories])
        if self.parts and self.parts.stop:
            yield defer.maybeDeferred(self.parts.stop)
        self.pool.stop()
        log.info("stopped")

    def reload(self) -> bool:
        try:
            new = load(self.settings.tier, self.settings.path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {err}", err=str(e))
            return False
        for w in new.warnings:
            log.warn("{warning}", warning=w)
        for key in ("listen", "tls_cert", "tls_key"):
            if new["server"][key] != self.settings["server"][key]:
                log.warn("server.{key} changed: takes effect at the next restart", key=key)
        self.settings = new
        self._configure(new)
        for f in self.factories:
            f.server_config = self.server_config
            f.max_connections = new["server"]["max_connections"]
            f.max_connections_per_client = new["server"]["max_connections_per_client"]
            f.command_timeout = new["server"]["command_timeout"]
            f.upstream_hosts = NetworkList(new["server"]["upstream_hosts"])
            f.allowed_clients = self.allowed_clients
        if self.log_observer is not None:
            self.log_observer.set_level(new["log"]["level"])
        if self.parts and self.parts.reload:
            self.parts.reload(new)
            self.chain = Chain(self.parts.checks, reactor=self.reactor)
        log.info("configuration reloaded from {path}", path=new.path)
        return True


def drop_privileges(user: str) -> None:
    if os.getuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.setgroups([g.gr_gid for g in grp.getgrall() if user in g.gr_mem])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("running as {user}", user=user)


def raise_fd_limit() -> int:
    """Every session is a descriptor (two at the edge): lift the soft limit to the hard one."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def run(tier: str, config_path: str) -> int:
    """The foreground daemon: `smarthost TIER --config FILE`; its exit code.

    2: the configuration is refused (the reason on stderr).  1: the tier cannot
    start (a port in use, a directory ``server.user`` may not write): the reason
    is logged and, when the log goes to ``log.file``, also printed on stderr, for
    the terminal or the service manager's journal.  0: stopped by a signal.
    """
    try:
        settings = load(tier, config_path)
        preflight(settings)
    except ConfigError as e:
        print(f"smarthost {tier}: configuration error: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor
    from shared.logging import start_logging
    observer = start_logging(tier, settings["log"]["level"], settings["log"]["file"], os.getpid())
    for w in settings.warnings:
        log.warn("{warning}", warning=w)
    fds = raise_fd_limit()
    if fds < 2 * settings["server"]["max_connections"] + 64:
        log.warn("open-file limit {n} is low for server.max_connections = {m}", n=fds,
                 m=settings["server"]["max_connections"])
    daemon = Daemon(settings, reactor)
    daemon.log_observer = observer
    status = {"code": 0}

    def startup():
        try:
            daemon.start()
        except Exception as e:
            log.error("cannot start: {err}", err=str(e))
            if settings["log"]["file"] != "-":      # else that line went to stderr already
                print(f"smarthost {tier}: cannot start: {e}", file=sys.stderr)
            status["code"] = 1
            reactor.stop()

    stopping = []

    def on_term(signum, frame):
        if stopping:
            return
        stopping.append(signum)

        def go():
            daemon.stop().addErrback(lambda f: log.failure("error while stopping", f)) \
                .addBoth(lambda _: reactor.stop())
        reactor.callFromThread(go)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda n, f: reactor.callFromThread(daemon.reload))
    reactor.callWhenRunning(startup)
    reactor.run(installSignalHandlers=False)
    return status["code"]


def build_check_order(settings: Settings) -> str:
    """The order of checks, as `check-config` prints it, without starting anything."""
    from twisted.internet.task import Clock
    from shared.blocking import InlinePool
    parts = build_parts(settings, Clock(), InlinePool(), dry_run=True)
    lines = ["rcpt      0. relay control: relay_domains from anyone, other destinations from mynetworks only"]
    return "\n".join(lines + Chain(parts.checks, reactor=Clock()).describe().splitlines())
