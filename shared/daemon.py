"""Running one tier: listeners, the engine, the tier's component, signals.

A tier module (``edge.service``, ``filter.service``, ``domain.service``)
declares ``TIER`` (:class:`shared.config.schema.TierSpec`): its sections, its
checks, its default policy and its component (:mod:`shared.tier`).  This
module does the rest, identically for every tier.

A configuration in use is a :class:`Generation`: everything built from one
loaded file -- the policies and their checks, the sink and next hops (the
component's :class:`~shared.tier.Configured`), each listener's TLS (its
certificates, by SNI, :mod:`shared.transport.tls`), the reverse resolver, the
engine and listener settings.  A session takes the generation
that is current when it opens and keeps it to its end.

Signals: SIGTERM and SIGINT stop accepting connections, give open transactions
``server.shutdown_timeout`` seconds to finish (idle sessions get 421 at once),
stop the component and exit 0.  SIGHUP reloads by rebuilding: the file is
loaded and a whole new generation built; only if every part of it was built is
it swapped in, at once, and the old one retired (its kept connections closed,
its probe sessions ended).  A file that does not validate, or a part that does
not build (an unreadable certificate), leaves everything as it was; the reason
is logged and, with ``server.pid_file``, reported to ``smarthost reload``.
The log file is reopened (logrotate without copytruncate).  Listeners, the
spool and the user the tier runs as are set up once: when they changed, the
log line names them as needing a restart.
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
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from shared.auth.service import build_authenticator, preflight as auth_preflight
from shared.blocking import BlockingPool
from shared.checks.registry import BuildContext, Policy, build_policies, describe, preflight_checks
from shared.config import ConfigError, Settings, check_host, load
from shared.config.schema import TIER_MODULES, directories, hostport_text, tier_spec
from shared.engine.session import EngineConfig, EngineSession
from shared.firewall import Firewall, RuleError
from shared.netlist import NetworkList
from shared.smtp.server import ServerConfig
from shared.tier import Configured
from shared.transport import proxyproto
from shared.transport.server import ListenerConfig, SessionTable, SMTPServerFactory
from shared.transport.tls import tls_contexts

log = Logger(namespace="smarthost.daemon")


def server_config(settings: Settings, listener=None) -> ServerConfig:
    """The core's limits: the server section's, or a listener's own where it sets them."""
    s = listener if listener is not None else settings.server
    return ServerConfig(hostname=settings.hostname, max_message_size=s.max_message_size,
                        max_recipients=s.max_recipients, max_data_line=s.max_line_length,
                        hard_error_limit=s.max_errors, junk_command_limit=s.max_junk_commands)


def session_limits(settings: Settings) -> dict:
    s = settings.server
    return dict(max_connections=s.max_connections, max_connections_per_client=s.max_connections_per_client,
                stress_command_timeout=s.stress_command_timeout,
                stress_connections_per_client=s.stress_connections_per_client)


def allowed_clients(settings: Settings) -> NetworkList | None:
    """Who may open a session: anyone at the edge; at the inner tiers only the
    upstream tiers and ``mynetworks``, unless ``server.allow_any_client`` says
    otherwise (a client that reached the filter or the domain tier directly
    would skip the edge's protection and the filter's checks)."""
    if settings.tier == "edge" or settings.server.allow_any_client:
        return None
    return NetworkList([*settings.server.upstream_hosts, *settings.relay.mynetworks])


# Connections the kernel queues for a listener before the reactor accepts them.  Twisted's
# endpoints default to 50: a burst of clients (or 200 connecting at once) then overflows the
# queue and the rest wait for SYN retransmits (1 s, 3 s, ...).  511 as before listeners were
# endpoints (and as nginx and Redis use); a description's own backlog= wins.
LISTEN_BACKLOG = 511


def with_backlog(description: str) -> str:
    """A stream endpoint description (tcp:, tcp6:, ssl:, unix:) with ``backlog=LISTEN_BACKLOG``
    unless it names a backlog; any other description as it is."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl", "unix") or not rest or "backlog=" in rest:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def firewalls(settings: Settings) -> dict[str, tuple[Firewall, ...]]:
    """Each listener's firewall: its own rules, then the global ones (each compiled once).
    Raises ConfigError naming the key whose rule file cannot be read or holds a bad line."""
    def compiled(key: str, rules) -> Firewall:
        try:
            return Firewall(rules)
        except RuleError as e:
            raise ConfigError(settings.path, key, str(e)) from None
    shared = compiled("firewall.rules", settings.firewall.rules)
    out = {}
    for name, listener in settings.listeners.items():
        own = compiled(f"listeners.{name}.firewall", listener.firewall)
        out[name] = tuple(f for f in (own, shared) if f)
    return out


def preflight(settings: Settings) -> None:
    """What a tier needs from this host before it starts, checked without changing it:
    :func:`shared.config.check_host`, TLS pairs (``tls_cert``, every ``tls_sni`` entry)
    that load and firewall rule files that read.  Raises ConfigError; ``smarthost
    check-config`` runs the same, so it refuses whatever start-up would."""
    check_host(settings)
    tls_contexts(settings)
    firewalls(settings)
    auth_preflight(settings)
    preflight_checks(settings, tier_spec(settings.tier))


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
        path = e.filename or getattr(settings.sections[section], name)
        raise ConfigError(settings.path, f"{section}.{name}", f"{path} is not writable by {who}") from None


@implementer(IOpenSSLServerConnectionCreator)
class CurrentTLS:
    """The implicit-TLS listeners' connection creator: always the running generation's
    certificates (:class:`shared.transport.tls.ServerTLS`), so a reload's new ones serve
    the next handshake."""

    def __init__(self, daemon: "Daemon", listener: str) -> None:
        self.daemon = daemon
        self.listener = listener

    def serverConnectionForTLS(self, protocol):
        return self.daemon.generation.tls[self.listener].serverConnectionForTLS(protocol)


@dataclass
class Generation:
    """Everything built from one loaded configuration (see the module docstring)."""
    number: int
    settings: Settings
    configured: Configured
    policies: dict[str, Policy]
    tls: dict[str, Any]                 # listener name -> its ServerTLS (or None)
    resolver: Any
    engine_config: EngineConfig
    listeners: dict[str, ListenerConfig] = field(default_factory=dict)
    closers: list = field(default_factory=list)

    def retire(self):
        """Close what this generation opened (kept next-hop connections, probe sessions)."""
        return close_all(self.closers)


def close_all(closers) -> defer.Deferred:
    """Call every closer (BuildContext.on_retire); a Deferred when all are done, never failing."""
    d = defer.gatherResults([defer.maybeDeferred(close) for close in closers], consumeErrors=True)
    return d.addErrback(lambda f: log.failure("error while retiring a configuration", f))


@dataclass(frozen=True)
class Loaded:
    """A configuration file with what it names on disk read: the listeners' TLS (every
    certificate and key, the ``tls_sni`` ones too, and the client CAs) and the firewalls.
    Reading blocks (files, and compiling large rule lists): a reload does it in the pool."""
    settings: Settings
    tls: Any
    firewalls: dict

    @classmethod
    def read(cls, settings: Settings) -> "Loaded":
        return cls(settings, tls_contexts(settings), firewalls(settings))

    @classmethod
    def read_file(cls, tier: str, path: str) -> "Loaded":
        return cls.read(load(tier, path))


# Settings bound once, at start: a change needs a restart (named in the reload line).
RESTART_KEYS = ("server.user", "server.pid_file", "log.file")


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The settings that changed but take effect only at a restart: listeners added,
    removed or moved, and RESTART_KEYS and the tier's directories."""
    out = []
    for name in sorted(set(old.listeners) | set(new.listeners)):
        a, b = old.listeners.get(name), new.listeners.get(name)
        if a is None or b is None or (a.endpoint, a.tls) != (b.endpoint, b.tls):
            out.append(f"listeners.{name}")
    for key in [*RESTART_KEYS, *(f"{s}.{k}" for s, k in directories(new))]:
        section, name = key.split(".")
        if getattr(old.sections[section], name) != getattr(new.sections[section], name):
            out.append(key)
    return out


class Daemon:
    def __init__(self, settings: Settings, reactor) -> None:
        self.settings = settings
        self.reactor = reactor
        self.spec = tier_spec(settings.tier)
        self.pool = BlockingPool(reactor, size=4, name=f"{settings.tier}-blocking")
        self.ports = []
        self.table = SessionTable(reactor, **session_limits(settings))
        self.component = None
        self.generation: Generation | None = None
        self.log_observer = None          # set by run(): the level follows reloads, the file reopens
        self.control = None               # set by run() with server.pid_file (shared.control)
        self.number = 0
        self.kept: dict = {}               # what checks keep across reloads (BuildContext.kept)
        self._reloading: defer.Deferred | None = None
        self._reload_again = False

    # -- building a configuration ------------------------------------------------
    def build(self, loaded: "Loaded") -> Generation:
        """A whole new generation from `loaded`; raises (ConfigError naming the key, or
        any error of a part) before anything running is touched.  What was opened for a
        generation that failed half-way is closed."""
        settings, tls, walls = loaded.settings, loaded.tls, loaded.firewalls
        ctx = BuildContext(settings, self.reactor, self.pool, store=self.kept)
        try:
            configured = self.component.configure(settings, ctx)
            ctx.next_hop = configured.next_hop
            policies = build_policies(settings, self.spec, ctx)
            auth = build_authenticator(settings, ctx) if settings.has("auth") else None
        except Exception:
            close_all(ctx.closers)          # what the half-built configuration opened
            raise
        resolver = None
        if settings.server.reverse_lookup:
            from shared.dns import ReverseResolver
            resolver = ReverseResolver(reactor=self.reactor, nameservers=settings.dns.nameservers or None,
                                       timeout=settings.dns.timeout)
        engine = EngineConfig(hostname=settings.hostname, max_received_headers=settings.server.max_received_headers,
                              tier=settings.tier)
        gen = Generation(self.number, settings, configured, policies, tls, resolver, engine, closers=ctx.closers)
        allowed, upstream = allowed_clients(settings), NetworkList(settings.server.upstream_hosts)
        for name, listener in settings.listeners.items():
            gen.listeners[name] = ListenerConfig(
                name, server_config(settings, listener), self._handler_factory(gen, name, policies[listener.policy]),
                tls_context=tls[name] if listener.tls == "starttls" else None, upstream_hosts=upstream,
                allowed_clients=allowed, command_timeout=listener.command_timeout,
                session_timeout=listener.session_timeout, firewalls=walls[name], greet_wait=listener.greet_wait,
                greet_exempt=NetworkList(settings.relay.mynetworks),
                soft_error_limit=listener.soft_error_limit, error_sleep=listener.error_sleep_time,
                auth=auth if listener.auth else None, auth_tls_only=not (auth and auth.plaintext),
                require_tls=listener.require_tls, require_auth=listener.require_auth)
        return gen

    def _handler_factory(self, gen: Generation, listener: str, policy: Policy):
        sink, reactor = gen.configured.sink, self.reactor

        def new_session(protocol):
            return EngineSession(protocol, config=gen.engine_config, chain=policy.chain, relay=policy.relay,
                                 sink=sink, reactor=reactor, resolver=gen.resolver, listener=listener)
        return new_session

    def _listener(self, name: str):
        return lambda: self.generation.listeners[name]

    # -- life ----------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self):
        """Bind every listener, drop privileges, then build and start the tier.

        As Postfix's master and Twisted's ``privilegedStartService`` do, only what
        needs root is done as root: the tier's code is loaded (``server.user`` need
        not be able to read the installation), the TLS key is read and every
        listener's endpoint is listening.  Then the daemon becomes ``server.user``,
        and only then is the component made and its first generation built, so
        that everything they create (the filter's spool and its pid lock, the
        domain tier's Maildir spool, their reserve files) is that user's.  Nothing
        is served before this returns: the listeners answer only once a generation
        exists (a connection that arrives earlier waits in the backlog).

        Fails, its listeners closed and its pool stopped, when a listener cannot be
        bound or a part cannot be built or started.
        """
        from twisted.internet import endpoints
        importlib.import_module(TIER_MODULES[self.settings.tier])
        first_tls = tls_contexts(self.settings)
        try:
            for name, listener in self.settings.listeners.items():
                factory = SMTPServerFactory(reactor=self.reactor, listener=self._listener(name), table=self.table)
                if listener.tls == "implicit":
                    from twisted.protocols.tls import TLSMemoryBIOFactory
                    if first_tls[name] is None:
                        raise ConfigError(self.settings.path, f"listeners.{name}.tls",
                                          "implicit TLS needs server.tls_cert and server.tls_key")
                    factory = TLSMemoryBIOFactory(CurrentTLS(self, name), False, factory)
                proxied, description = proxyproto.split(listener.endpoint)
                if proxied:
                    factory = proxyproto.HeaderFirstFactory(factory, self.reactor,
                                                            NetworkList(listener.proxy_hosts))
                endpoint = endpoints.serverFromString(self.reactor, with_backlog(description))
                port = yield endpoint.listen(factory)
                self.ports.append(port)
                address = port.getHost()
                log.info("listening on {addr} ({name}: {role}, policy {policy}, tls {tls}, auth {auth})",
                         addr=hostport_text(getattr(address, "host", "?"), getattr(address, "port", 0)),
                         name=name, role=listener.role, policy=listener.policy, tls=listener.tls,
                         auth="on" if listener.auth else "off")
            self._pause_listeners()
            if self.settings.server.user:
                drop_privileges(self.settings.server.user)
            self.component = self.spec.component(self.settings, self.reactor, self.pool)
            self.generation = self.build(Loaded.read(self.settings))
            self.component.activate(self.generation.configured)
            self.pool.start()
            self.component.start()
        except Exception:
            for p in self.ports:
                p.stopListening()
            self.pool.stop()
            raise
        self._resume_listeners()
        hops = ", ".join(hostport_text(*h) for h in self.settings.next_hop.hosts) \
            if self.settings.has("next_hop") else "-"
        log.info("{tier} started: hostname={h}, next hop={nh}", tier=self.settings.tier,
                 h=self.settings.hostname, nh=hops)
        self._report(True, f"started from {self.settings.path}", [])

    def _pause_listeners(self) -> None:
        for p in self.ports:
            if hasattr(p, "stopReading"):
                p.stopReading()

    def _resume_listeners(self) -> None:
        for p in self.ports:
            if hasattr(p, "startReading"):
                p.startReading()

    @defer.inlineCallbacks
    def stop(self):
        log.info("stopping: no new connections")
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        yield self.table.shutdown(self.settings.server.shutdown_timeout)
        if self.component is not None:
            yield defer.maybeDeferred(self.component.stop)
        if self.generation is not None:
            yield self.generation.retire()
        self.pool.stop()
        log.info("stopped")

    def reload(self) -> defer.Deferred:
        """SIGHUP: rebuild, then swap (see the module docstring); a Deferred of whether the
        new configuration is in use.  The file, certificates and firewall rule files (a
        100,000-line feed takes a second or two) are read in the pool, off the reactor; a
        SIGHUP that comes meanwhile runs once this reload is done."""
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        self.number += 1
        if self.log_observer is not None:
            problem = self.log_observer.reopen()
            if problem:
                log.error("{problem}", problem=problem)
        d = self.pool.run(Loaded.read_file, self.settings.tier, self.settings.path)
        d.addCallbacks(self._swap, self._unreadable)
        self._reloading = d

        def done(ok):
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                self.reload()
            return ok
        return d.addBoth(done)

    def _unreadable(self, failure) -> bool:
        if failure.check(ConfigError):
            return self._refused(str(failure.value))
        log.failure("reload: cannot read the new configuration", failure)
        return self._refused(f"{self.settings.path}: cannot read the new configuration: {failure.value}")

    def _swap(self, loaded: "Loaded") -> bool:
        new = loaded.settings
        try:
            gen = self.build(loaded)
        except ConfigError as e:
            return self._refused(str(e))
        except Exception as e:
            log.failure("reload: cannot build the new configuration")
            return self._refused(f"{self.settings.path}: cannot build the new configuration: {e}")
        for w in new.warnings:
            log.warn("{warning}", warning=w)
        restart = restart_needed(self.settings, new)
        old, self.generation, self.settings = self.generation, gen, new
        self.component.activate(gen.configured)
        self.table.set_limits(**session_limits(new))
        if self.log_observer is not None:
            self.log_observer.set_level(new.log.level)
        old.retire()
        note = f"; restart needed for: {', '.join(restart)}" if restart else ""
        log.info("configuration reloaded from {path}{note}", path=new.path, note=note)
        self._report(True, f"configuration reloaded from {new.path}", restart)
        return True

    def _refused(self, reason: str) -> bool:
        log.error("reload refused, keeping the running configuration: {err}", err=reason)
        self._report(False, reason, [])
        return False

    def _report(self, ok: bool, message: str, restart: list[str]) -> None:
        if self.control is not None:
            problem = self.control.report(self.number, ok, message, restart)
            if problem:
                log.error("{problem}", problem=problem)


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
    observer = start_logging(tier, settings.log.level, settings.log.file, os.getpid())
    for w in settings.warnings:
        log.warn("{warning}", warning=w)
    fds = raise_fd_limit()
    if fds < 2 * settings.server.max_connections + 64:
        log.warn("open-file limit {n} is low for server.max_connections = {m}", n=fds,
                 m=settings.server.max_connections)
    daemon = Daemon(settings, reactor)
    daemon.log_observer = observer
    status = {"code": 0}

    def cannot_start(e) -> None:
        log.error("cannot start: {err}", err=str(e))
        if settings.log.file != "-":      # else that line went to stderr already
            print(f"smarthost {tier}: cannot start: {e}", file=sys.stderr)
        if daemon.control is not None:
            daemon.control.release()
        status["code"] = 1
        reactor.stop()

    def startup():
        try:
            daemon.control = claim_control_files(settings)
        except Exception as e:
            cannot_start(e)
            return
        daemon.start().addErrback(lambda f: cannot_start(f.value))

    stopping = []

    def on_term(signum, frame):
        if stopping:
            return
        stopping.append(signum)

        def go():
            d = daemon.stop().addErrback(lambda f: log.failure("error while stopping", f))
            if daemon.control is not None:
                d.addBoth(lambda _: _log_problem(daemon.control.release()))
            d.addBoth(lambda _: reactor.stop())
        reactor.callFromThread(go)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda n, f: reactor.callFromThread(daemon.reload))
    reactor.callWhenRunning(startup)
    reactor.run(installSignalHandlers=False)
    return status["code"]


def _log_problem(problem: str | None) -> None:
    if problem:
        log.error("{problem}", problem=problem)


def claim_control_files(settings: Settings):
    """The pid and status files of ``server.pid_file`` (None when unset), claimed as the
    starting user and handed to ``server.user`` before privileges are dropped."""
    if not settings.server.pid_file:
        return None
    from shared.control import ControlFiles
    control = ControlFiles(settings.server.pid_file)
    pw = pwd.getpwnam(settings.server.user) if settings.server.user and os.getuid() == 0 else None
    control.claim(uid=pw.pw_uid if pw else None, gid=pw.pw_gid if pw else None)
    return control


def describe_policies(settings: Settings) -> str:
    """Every listener with its policy, and each policy's checks in order: what
    `check-config` prints, without starting anything."""
    return describe(settings, tier_spec(settings.tier))
