"""The SASL mechanisms smarthost runs itself, over the embedded user store.

- PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one response; an
  authorization identity other than the authentication identity is refused
  (nobody may act as someone else);
- LOGIN (the de-facto mechanism of older clients): "Username:", then
  "Password:" challenges, the user name possibly sent as initial response;
- CRAM-MD5 (RFC 2195): a fresh challenge ``<random.time@hostname>``, answered
  with ``user HMAC-MD5-hex``; only for users with a CRAM-MD5 secret.

Password checks run in a pool of their own (``auth.hash_threads`` threads; an
argon2id verification costs ~35 ms).  At most ``max_pending`` wait there;
beyond that an AUTH gets a temporary failure at once, so a flood of AUTH
commands costs a queue slot, not a thread or the reactor.
"""
from __future__ import annotations

import os
import string
import time

from twisted.internet import defer
from twisted.logger import Logger

from shared.auth.sasl import Challenge, ClientContext, Failure, Success
from shared.auth.store import StoreError, UserStore, valid_name
from shared.blocking import WorkerPool

log = Logger(namespace="smarthost.auth")

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


class FileBackend:
    name = "file"

    def __init__(self, store: UserStore, pool: WorkerPool, hostname: str, *,
                 mechanisms: tuple[str, ...] = MECHANISMS, max_pending: int = 64) -> None:
        self.store = store
        self.pool = pool
        self.hostname = hostname
        self.configured = tuple(m for m in mechanisms if m in MECHANISMS)
        self.max_pending = max_pending
        self.pending = 0

    def mechanisms(self) -> tuple[str, ...]:
        return tuple(m for m in self.configured if m != "CRAM-MD5" or self.store.has_cram)

    def start(self, mechanism: str, client: ClientContext):
        return {"PLAIN": PlainExchange, "LOGIN": LoginExchange, "CRAM-MD5": CramExchange}[mechanism](self)

    def close(self) -> None:
        pass            # the hash pool lives as long as the process (shared.auth.service)

    def run(self, fn, *args) -> defer.Deferred:
        """A store call in the pool: a Deferred of its result, or of None when the pool is
        full or the file is unreadable (both logged; the caller answers temporary)."""
        if self.pending >= self.max_pending:
            return defer.succeed(_BUSY)
        self.pending += 1

        def done(result):
            self.pending -= 1
            return result

        def failed(failure):
            if failure.check(StoreError):
                log.error("auth: {err}", err=str(failure.value))
            else:
                log.failure("auth: user store error", failure)
            return _UNREADABLE
        return self.pool.run(fn, *args).addCallbacks(done, lambda f: done(failed(f)))


_BUSY = object()
_UNREADABLE = object()


def _checked(result, user: str, mechanism: str):
    if result is _BUSY:
        return Failure("too many authentications in progress", temporary=True, user=user)
    if result is _UNREADABLE:
        return Failure("user store unavailable", temporary=True, user=user)
    if result is None:
        return Failure(f"{mechanism} authentication failed", user=user)
    return Success(result)


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Exchange:
    mechanism = ""

    def __init__(self, backend: FileBackend) -> None:
        self.backend = backend

    def _check(self, fn, user: str, *args) -> defer.Deferred:
        """``fn(user, *args)`` (a store method) in the pool, as a Success or Failure."""
        return self.backend.run(fn, user, *args).addCallback(_checked, user, self.mechanism)

    def cancel(self) -> None:
        pass


class PlainExchange(_Exchange):
    mechanism = "PLAIN"

    def step(self, response: bytes | None) -> defer.Deferred:
        if response is None:
            return defer.succeed(Challenge(b""))
        parts = response.split(b"\0")
        if len(parts) != 3:
            return defer.succeed(Failure("malformed PLAIN response"))
        authzid, authcid, password = (_text(p) for p in parts)
        if authcid is None or password is None or authzid is None or not valid_name(authcid):
            return defer.succeed(Failure("malformed PLAIN response"))
        if authzid and authzid.lower() != authcid.lower():
            return defer.succeed(Failure(f"authorization identity {authzid!r} is not {authcid!r}", user=authcid))
        return self._check(self.backend.store.verify, authcid, password)


class LoginExchange(_Exchange):
    mechanism = "LOGIN"

    def __init__(self, backend: FileBackend) -> None:
        super().__init__(backend)
        self.user: str | None = None
        self.started = False

    def step(self, response: bytes | None) -> defer.Deferred:
        if not self.started:
            self.started = True
            if not response:                  # no initial response (or "="): ask for the name
                return defer.succeed(Challenge(b"Username:"))
        if self.user is None:
            name = _text(response or b"")
            if name is None or not valid_name(name):
                return defer.succeed(Failure("malformed LOGIN user name"))
            self.user = name
            return defer.succeed(Challenge(b"Password:"))
        password = _text(response or b"")
        if password is None:
            return defer.succeed(Failure("malformed LOGIN password", user=self.user))
        return self._check(self.backend.store.verify, self.user, password)


class CramExchange(_Exchange):
    mechanism = "CRAM-MD5"

    def __init__(self, backend: FileBackend) -> None:
        super().__init__(backend)
        self.challenge: bytes | None = None

    def step(self, response: bytes | None) -> defer.Deferred:
        if self.challenge is None:
            if response:
                return defer.succeed(Failure("CRAM-MD5 takes no initial response"))
            self.challenge = f"<{int.from_bytes(os.urandom(8), 'big')}.{int(time.time())}@" \
                             f"{self.backend.hostname}>".encode()
            return defer.succeed(Challenge(self.challenge))
        text = _text(response or b"")
        user, _, digest = (text or "").rpartition(" ")
        if not valid_name(user) or len(digest) != 32 or not all(c in string.hexdigits for c in digest):
            return defer.succeed(Failure("malformed CRAM-MD5 response"))
        return self._check(self.backend.store.cram_md5, user, self.challenge, digest)
