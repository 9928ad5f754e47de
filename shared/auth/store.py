"""The embedded user store: a file of users with argon2id password hashes.

One user per line, ``NAME:HASH`` or ``NAME:HASH:cram-md5=HEX``; ``#`` starts a
comment line::

    alice@example.test:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA
    bob@example.test:$argon2id$v=19$m=19456,t=2,p=1$...$...:cram-md5=73656372657431

HASH is an argon2id hash in its standard encoded form (the parameters travel in
it, so old hashes keep verifying when the defaults change).  CRAM-MD5 (RFC
2195) needs the server to hold a secret equivalent to the password; a user gets
one only when the administrator asks for it (``smarthost user add --cram-md5``),
and CRAM-MD5 is offered only while some user has one.  The file is written by
``smarthost user`` only: atomically (a temporary file, fsynced, renamed), mode
0600, owned by the user the tier runs as.

The daemon reads the file in the pool and again whenever it changed (its
inode, size or modification time), so ``smarthost user add`` takes effect at
the next AUTH without a reload.  Verifying a password costs tens of
milliseconds and 19 MiB by design: it always runs in the few threads of
``auth.hash_threads``, never on the reactor, and an unknown user costs the same as a wrong
password (a fixed dummy hash is verified instead), so timing says nothing about
which names exist.
"""
from __future__ import annotations

import fcntl
import hmac
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import argon2

# argon2id with OWASP's minimum parameters (19 MiB, 2 passes, 1 lane): ~35 ms here.
HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=argon2.Type.ID)
_DUMMY = HASHER.hash("smarthost: the hash verified for unknown users")

_NAME = re.compile(r"[^\s:#\x00-\x1f\x7f][^\s:\x00-\x1f\x7f]{0,255}\Z")


class StoreError(Exception):
    """The user file cannot be read or has a bad line (the message names file and line)."""


def valid_name(name: str) -> bool:
    """A user name the file can hold: 1 to 256 characters, no space, colon or control."""
    return bool(_NAME.match(name))


@dataclass(frozen=True)
class User:
    name: str
    hash: str
    cram_key: bytes | None = None      # the CRAM-MD5 secret, when the user has one

    def line(self) -> str:
        extra = f":cram-md5={self.cram_key.hex()}" if self.cram_key is not None else ""
        return f"{self.name}:{self.hash}{extra}"


def parse(text: str, path: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"{path}: line {n}"
        if len(parts) not in (2, 3) or not valid_name(parts[0]):
            raise StoreError(f"{where}: expected NAME:ARGON2ID-HASH[:cram-md5=HEX]")
        name, hashed = parts[0], parts[1]
        if not hashed.startswith("$argon2id$"):
            raise StoreError(f"{where}: {name}: the password hash is not argon2id")
        cram = None
        if len(parts) == 3:
            field = parts[2]
            try:
                if not field.startswith("cram-md5="):
                    raise ValueError
                cram = bytes.fromhex(field[len("cram-md5="):])
            except ValueError:
                raise StoreError(f"{where}: {name}: the third field must be cram-md5=HEX") from None
        key = name.lower()
        if key in users:
            raise StoreError(f"{where}: {name} is listed twice")
        users[key] = User(name, hashed, cram)
    return users


class UserStore:
    """The users of one file, read again when it changes.  Thread-safe: the methods run
    in pool threads; the reactor only reads ``has_cram``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: dict[str, User] = {}
        self.has_cram = False        # read by the reactor (a bool: atomic enough)

    def refresh(self) -> dict[str, User]:
        """The users as the file says now (re-read if it changed); raises StoreError."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp, users = None, {}
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror}") from None
        else:
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            users = None
        with self._lock:
            if stamp == self._stamp and stamp is not None:
                return self._users
            if users is None:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        users = parse(f.read(), self.path)
                except (OSError, UnicodeDecodeError) as e:
                    raise StoreError(f"{self.path}: {getattr(e, 'strerror', None) or e}") from None
            self._stamp, self._users = stamp, users
            self.has_cram = any(u.cram_key is not None for u in users.values())
            return users

    def verify(self, name: str, password: str) -> str | None:
        """The user's stored name when `password` is theirs, else None (pool thread)."""
        user = self.refresh().get(name.lower())
        try:
            HASHER.verify(user.hash if user else _DUMMY, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None
        return user.name if user else None

    def cram_md5(self, name: str, challenge: bytes, digest: str) -> str | None:
        """The user's stored name when `digest` is HMAC-MD5(secret, challenge) in hex."""
        user = self.refresh().get(name.lower())
        if user is None or user.cram_key is None:
            return None
        expected = hmac.new(user.cram_key, challenge, "md5").hexdigest()
        return user.name if hmac.compare_digest(expected, digest.lower()) else None


# -- editing the file (smarthost user ...) -----------------------------------------

@contextmanager
def editing(path: str, owner: tuple[int, int] | None = None):
    """Hold the file's lock and yield its users; what the caller leaves in the dict is
    written back atomically when the block ends without an exception."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                users = parse(f.read(), path)
        except FileNotFoundError:
            users = {}
        yield users
        text = "# smarthost users: NAME:ARGON2ID-HASH[:cram-md5=HEX]; edit with `smarthost user`\n"
        text += "".join(u.line() + "\n" for u in sorted(users.values(), key=lambda u: u.name.lower()))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o600)
                if owner is not None:
                    os.fchown(f.fileno(), *owner)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def make_user(name: str, password: str, cram_md5: bool) -> User:
    if not valid_name(name):
        raise StoreError(f"{name!r}: a user name is 1 to 256 characters without space, colon or control")
    if not password:
        raise StoreError("the password must not be empty")
    return User(name, HASHER.hash(password), password.encode("utf-8") if cram_md5 else None)
