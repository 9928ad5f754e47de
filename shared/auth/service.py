"""The edge's ``[auth]`` section, and the :class:`Authenticator` a listener with AUTH uses.

A listener takes AUTH when its ``auth`` key says so (on by default on the
submission and submissions roles, off on mx).  The authenticator of a
configuration is its backend -- the embedded user store (``backend = "file"``,
:mod:`shared.auth.local`) or Dovecot's authentication service (``backend =
"dovecot"``, :mod:`shared.auth.dovecot`) -- and the failure limits
(:class:`FailureGuard`):

- failed AUTHs are counted per client address (IPv6 by its /64, as the rate
  limits) and per user name, across connections, within ``failure_time_unit``;
- past ``client_failure_limit`` the client gets 421 4.7.0, is disconnected, and
  for ``block_time`` seconds every new AUTH from it is refused the same way;
- past ``user_failure_limit`` the user name is blocked for ``block_time``: even
  the right password is refused (a brute force of one account from many
  addresses gets nowhere), each attempt counted against its client;
- ``relay.mynetworks`` and ``server.upstream_hosts`` are exempt.

Each failure is one log line and each block another, in a form meant for
fail2ban (``auth failed: client=NAME[ADDR] ...``, ``auth blocked: client=[ADDR]
...``; see docs/edge.md).  The counts are :mod:`shared.counters`': kept across
reloads, and shared by every edge node through Redis when ``[redis]`` is set.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from shared.auth.local import MECHANISMS, FileBackend
from shared.auth.store import UserStore
from shared.blocking import WorkerPool
from shared.checks.rates import client_key
from shared.counters import counters
from shared.config.schema import Loading, Section, bounded, choice, path, setting
from shared.netlist import NetworkList

log = Logger(namespace="smarthost.auth")

DAY = 86400


def _mechanism(value: str) -> str:
    if value.upper() not in MECHANISMS:
        raise ValueError(f"{value!r}: smarthost offers {', '.join(MECHANISMS)}")
    return value.upper()


def _dovecot_address(value: str) -> str:
    if not value:
        return value
    if value.startswith("/"):
        return value
    from shared.config.schema import hostport
    hostport(value)
    return value


@dataclass(frozen=True)
class AuthSettings:
    """SMTP AUTH: the backend, the mechanisms, the failure limits"""
    backend: str = setting("file", "file: the embedded user store (users_file, managed with `smarthost user`); "
                                   "dovecot: Dovecot's auth service at auth.dovecot", choice("file", "dovecot"))
    users_file: str = setting("", "the embedded user store, absolute path (read again when it changes)", path)
    dovecot: str = setting("", "Dovecot's auth socket: an absolute UNIX socket path, or host:port",
                           _dovecot_address)
    mechanisms: tuple = setting(MECHANISMS, "SASL mechanisms offered, in order (CRAM-MD5 only while some "
                                            "user has a CRAM-MD5 secret, with the file backend)", _mechanism)
    plaintext: bool = setting(False, "also offer AUTH without TLS (never on the Internet: the password "
                                     "crosses in clear)")
    hash_threads: int = setting(2, "threads verifying passwords (argon2id: ~35 ms and 19 MiB each; read at "
                                   "start)",
                                bounded(1, 64))
    max_pending: int = setting(64, "verifications waiting for a thread before AUTH gets 454 4.7.0",
                               bounded(1, 100_000))
    timeout: float = setting(10, "seconds the Dovecot backend may take to answer (then 454 4.7.0)",
                             bounded(0, 300, above=True))
    client_failure_limit: int = setting(5, "failed AUTHs per client per failure_time_unit before it is "
                                           "blocked (0: no limit)", bounded(0, 1_000_000))
    user_failure_limit: int = setting(10, "failed AUTHs per user name per failure_time_unit before the name "
                                          "is blocked (0: no limit)", bounded(0, 1_000_000))
    failure_time_unit: float = setting(900, "seconds failures are counted for (at most 1 day)",
                                       bounded(0, DAY, above=True))
    block_time: float = setting(900, "seconds a client or user name stays blocked (at most 1 day)",
                                bounded(0, DAY, above=True))
    ipv6_prefix: int = setting(64, "an IPv6 client is counted with its /PREFIX", bounded(48, 128))


def _finish(ld: Loading) -> None:
    a = ld.values["auth"]
    uses_auth = [name for name, lst in ld.values["listeners"].items() if lst.get("auth")]
    if not uses_auth:
        return
    if a["backend"] == "file" and not a["users_file"]:
        raise ld.error("auth.users_file", f"required: listener {uses_auth[0]} takes AUTH with the file backend")
    if a["backend"] == "dovecot" and not a["dovecot"]:
        raise ld.error("auth.dovecot", f"required: listener {uses_auth[0]} takes AUTH with the dovecot backend")


AUTH = Section.of("auth", AuthSettings, finish=_finish)


class FailureGuard:
    """Failed AUTHs per client and per user name, and the blocks they lead to, counted in
    the configuration's counters (:mod:`shared.counters`: this process, or Redis shared by
    every edge node).  Answers are values or, with Redis, Deferreds of them (never failing)."""

    FAILURES, BLOCKED = "auth_failures", "auth_blocked"

    def __init__(self, own: AuthSettings, exempt: NetworkList, store) -> None:
        self.own = own
        self.exempt = exempt
        self.store = store

    def _keys(self, address: str, user: str | None) -> list[tuple[str, str, int]]:
        """(what, key, limit) of a client and, when known, a user name."""
        keys = [("client", f"client:{client_key(address, self.own.ipv6_prefix)}", self.own.client_failure_limit)]
        if user:
            keys.insert(0, ("user", f"user:{user.lower()}", self.own.user_failure_limit))
        return keys

    def blocked(self, address: str, user: str | None = None):
        """What is blocked ("client" or "user"), or None."""
        keys = self._keys(address, user)
        return when_all([self.store.get(self.BLOCKED, key) for _, key, _ in keys],
                        lambda counts: next((what for (what, _, _), n in zip(keys, counts) if n), None))

    def failed(self, address: str, user: str | None):
        """Count one failure; what it blocked ("client", or "user" alone), or None."""
        if address in self.exempt:
            return None
        keys = [k for k in self._keys(address, user) if k[2]]
        counts = [self.store.add(self.FAILURES, key, self.own.failure_time_unit) for _, key, _ in keys]
        return when_all(counts, lambda ns: self._block(address, user, keys, ns))

    def _block(self, address: str, user: str | None, keys, counts):
        own, outcome = self.own, None
        for (what, key, limit), n in zip(keys, counts):
            if n < limit:
                continue
            self.store.add(self.BLOCKED, key, own.block_time)      # the block's window starts once
            if self.store.first_refusal(self.BLOCKED, key):
                log.warn("auth blocked: {what}={who} after {n} failures in {unit:g}s; blocked for {t:g}s",
                         what=what, who=f"[{address}]" if what == "client" else f"<{user}>", n=n,
                         unit=own.failure_time_unit, t=own.block_time)
            outcome = what if outcome is None or what == "client" else outcome
        return outcome


def when_all(values, then):
    """`then(values)`, once every value that is a Deferred has fired (a plain call when none is)."""
    if not any(isinstance(v, defer.Deferred) for v in values):
        return then(values)
    return defer.gatherResults([defer.maybeDeferred(lambda v=v: v) for v in values]).addCallback(then)


@dataclass
class Authenticator:
    """What a listener with AUTH uses: the backend and the failure guard."""
    backend: object
    guard: FailureGuard
    plaintext: bool = False

    def mechanisms(self) -> tuple[str, ...]:
        return self.backend.mechanisms()


def build_authenticator(settings, ctx) -> Authenticator | None:
    """The configuration's authenticator (None when no listener takes AUTH)."""
    if not any(listener.auth for listener in settings.listeners.values()):
        return None
    own: AuthSettings = settings.auth
    if own.backend == "dovecot":
        from shared.auth.dovecot import DovecotBackend
        backend = DovecotBackend(ctx.reactor, own.dovecot, mechanisms=own.mechanisms, timeout=own.timeout)
        ctx.on_retire(backend.close)
    else:
        # One pool for the life of the process (its size is read at start): a reload
        # never waits for a thread in the middle of a hash.
        pool = ctx.kept("auth-hash-pool", lambda: _started(WorkerPool(ctx.reactor, size=own.hash_threads,
                                                                      name="auth-hash")))
        backend = FileBackend(ctx.kept(f"auth-store:{own.users_file}", lambda: UserStore(own.users_file)),
                              pool, settings.hostname, mechanisms=own.mechanisms, max_pending=own.max_pending)
        backend.run(backend.store.refresh)          # read it now (CRAM-MD5 is offered if a user has it)
    exempt = NetworkList([*settings.relay.mynetworks, *settings.server.upstream_hosts])
    return Authenticator(backend, FailureGuard(own, exempt, counters(ctx)), own.plaintext)


def preflight(settings) -> None:
    """What start-up and check-config refuse: a user file that exists but cannot be read
    or has a bad line (a missing one is an empty store: users may come later)."""
    if not settings.has("auth") or settings.auth.backend != "file" or not settings.auth.users_file:
        return
    if not any(listener.auth for listener in settings.listeners.values()):
        return
    from shared.config import ConfigError
    from shared.auth.store import StoreError
    try:
        UserStore(settings.auth.users_file).refresh()
    except StoreError as e:
        raise ConfigError(settings.path, "auth.users_file", str(e)) from None


def _started(pool: WorkerPool) -> WorkerPool:
    pool.start()
    return pool
