"""The durable spool: queue files, state directories and group-committed fsync.

Layout of a spool root ``R`` (every directory mode 0700)::

    R/tmp/        being received; never acknowledged, deleted at start-up
    R/incoming/   committed (fsynced, 250 sent), waiting for the queue manager
    R/active/     picked up by the queue manager, delivery in progress
    R/deferred/   waiting for a retry; the file's mtime is the next attempt time
    R/hold/       parked by an administrator, never scheduled
    R/quarantine/ kept from delivery by a check at reception (the envelope says
                  why), never scheduled; released or deleted by an administrator
    R/corrupt/    damaged files, kept for inspection and never deleted by us
    R/status/     per-message delivery status (JSON), owned by the queue manager
    R/requests/   admin requests to the running daemon (see shared.queue.admin)
    R/pid         pid of the daemon, exclusively flock()ed while it runs

A message's state is the directory its file is in, and exactly one function
changes it: :meth:`SpoolFiles.move`, a ``rename(2)`` between two directories
of the same file system, which is atomic.  When two processes race to move a
file (the daemon picks it up while an admin holds it) exactly one rename wins
and the other sees ENOENT.

Queue file format::

    [message bytes][envelope JSON, UTF-8][trailer]
    trailer = b"SMQ2END\\n" + u64 message length + u64 envelope length
              + u32 crc32(envelope JSON) + u32 crc32(message bytes)
                                                  (big endian, 32 bytes)

The message is written first, in chunks, while DATA streams in (so a large
message never sits in memory); its CRC-32 is computed from the same chunks as
they arrive, and the envelope and trailer are appended at commit.  The trailer
proves the file is complete: a file whose trailer is missing, whose lengths
disagree with the file size, whose envelope checksum fails or whose envelope
does not parse is corrupt.  The message checksum is verified where the message
is read whole anyway -- by recovery, and while it is sent to the next hop
(:meth:`QueuedMessage.open_body`) -- so picking a file up reads only its
trailer and envelope.

Files written before the message checksum have the 28-byte trailer
``b"SMQ1END\\n"`` + the same three fields; they are still read and delivered,
their message bytes unchecked.

Durability: :meth:`IncomingMessage.commit` appends the trailer, fsyncs the
file, renames it from tmp/ to incoming/ (or quarantine/) and fsyncs that
directory before its Deferred fires -- only then may the SMTP server say 250.  Directory fsyncs are
group-committed: concurrent commits share one.  Blocking calls (fsync, and the
writes that precede it at commit) run in a bounded thread pool, never on the
reactor thread.  Renames between state directories after that are not
fsynced (as in Postfix): a crash can at worst undo a state change, which
means a message is tried again, never that it is lost.

Trust: everything under R is written by this process or by the admin CLI
running as the same user; file names are still checked against the queue id
syntax before they are used in a path.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.blocking import WorkerPool
from shared.envelope import Envelope
from shared.ids import new_queue_id
from shared.reserve import FileReserve, write_all

log = Logger(namespace="smarthost.queue.store")

STATES = ("incoming", "active", "deferred", "hold", "quarantine", "corrupt")
# The states a commit can put a message in: incoming/ for the queue manager,
# quarantine/ for the administrator.
COMMIT_STATES = ("incoming", "quarantine")
# States an older version's spool lacks: the admin commands read such a spool as it
# is (nothing is in them); the daemon makes them at its next start.
NEWER_STATES = ("quarantine",)
TMP = "tmp"
STATUS = "status"
REQUESTS = "requests"

MAGIC = b"SMQ2END\n"
_TRAILER = struct.Struct(">8sQQII")      # magic, message length, envelope length, envelope CRC, message CRC
TRAILER_SIZE = _TRAILER.size
MAGIC_V1 = b"SMQ1END\n"                  # read, never written: no message CRC
_TRAILER_V1 = struct.Struct(">8sQQI")
TRAILER_V1_SIZE = _TRAILER_V1.size
CHECK_CHUNK = 1024 * 1024                # bytes read at a time when recovery checks a message
MESSAGE_MISMATCH = "message checksum mismatch"
HEADER_READ_LIMIT = 64_000     # how much of a message admin tools read to show its header

# Queue ids come from shared.ids (time-sortable, unique across nodes); any
# 12-32 ASCII letters and digits are accepted, which keeps them safe as file
# names (no "/", no ".", no "..").
QID_RE = re.compile(r"^[0-9A-Za-z]{12,32}$")


def valid_qid(qid: str) -> bool:
    return isinstance(qid, str) and QID_RE.match(qid) is not None


class CorruptFile(ValueError):
    """A queue file that does not prove itself complete; ``reason`` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CorruptBody(OSError):
    """The message bytes read from a queue file do not match its checksum.

    An OSError (EBADMSG, ``strerror`` = the reason), so that whoever reads a
    message treats it like a read error: the message is not passed on.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(errno.EBADMSG, reason, path)
        self.reason = reason


class SpoolLocked(RuntimeError):
    """Another daemon already runs on this spool."""


def encode_envelope(envelope: Envelope) -> bytes:
    return json.dumps(envelope.to_json(), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def make_trailer(body_len: int, body_crc: int, envelope_json: bytes) -> bytes:
    """The end record of a message of ``body_len`` bytes with CRC-32 ``body_crc``."""
    return _TRAILER.pack(MAGIC, body_len, len(envelope_json), zlib.crc32(envelope_json), body_crc)


class Trailer(NamedTuple):
    body_len: int
    env_len: int
    env_crc: int
    body_crc: int | None          # None: an SMQ1 file, no message checksum
    file_size: int


def read_trailer(fd: int, path: str | Path) -> Trailer:
    """The trailer of the open queue file ``fd``, checked against the file's
    size.  Raises :class:`CorruptFile`.  Leaves the file offset alone."""
    size = os.fstat(fd).st_size
    if size < TRAILER_V1_SIZE:
        raise CorruptFile(path, f"truncated: {size} bytes, no end record")
    tail = os.pread(fd, TRAILER_SIZE, max(0, size - TRAILER_SIZE))
    if len(tail) == TRAILER_SIZE and tail.startswith(MAGIC):
        _, body_len, env_len, env_crc, body_crc = _TRAILER.unpack(tail)
        trailer_size = TRAILER_SIZE
    elif tail[-TRAILER_V1_SIZE:].startswith(MAGIC_V1):
        _, body_len, env_len, env_crc = _TRAILER_V1.unpack(tail[-TRAILER_V1_SIZE:])
        body_crc, trailer_size = None, TRAILER_V1_SIZE
    else:
        raise CorruptFile(path, "no end record (truncated or not a queue file)")
    if body_len + env_len + trailer_size != size:
        raise CorruptFile(path, f"length mismatch: record says {body_len}+{env_len}, "
                                f"file has {size - trailer_size} bytes")
    return Trailer(body_len, env_len, env_crc, body_crc, size)


def read_queue_file(path: str | Path, *, check_message: bool = False) -> tuple[Envelope, int, int]:
    """Validate a queue file: return (envelope, message length, file size).

    ``check_message`` also reads the whole message, CHECK_CHUNK bytes at a
    time, and verifies its checksum (SMQ1 files have none).  Raises
    :class:`CorruptFile` naming the reason, FileNotFoundError if it is gone.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        trailer = read_trailer(fd, path)
        raw = os.pread(fd, trailer.env_len, trailer.body_len)
        if zlib.crc32(raw) != trailer.env_crc:
            raise CorruptFile(path, "envelope checksum mismatch")
        if check_message and trailer.body_crc is not None:
            crc, offset = 0, 0
            while offset < trailer.body_len:
                chunk = os.pread(fd, min(CHECK_CHUNK, trailer.body_len - offset), offset)
                if not chunk:
                    raise CorruptFile(path, f"truncated at {offset} bytes while being checked")
                crc = zlib.crc32(chunk, crc)
                offset += len(chunk)
            if crc != trailer.body_crc:
                raise CorruptFile(path, MESSAGE_MISMATCH)
    finally:
        os.close(fd)
    try:
        envelope = Envelope.from_json(json.loads(raw.decode("utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFile(path, f"bad envelope: {type(e).__name__}: {e}") from None
    return envelope, trailer.body_len, trailer.file_size


@dataclass
class QueuedMessage:
    """A validated queue file: its envelope and where its message bytes are.

    ``damaged`` is None until a read of the message from the file finds it
    damaged (see :meth:`open_body`); then it says why, and the message must
    not be delivered but moved to corrupt/.
    """
    qid: str
    state: str
    envelope: Envelope
    body_len: int
    path: str
    body: bytes | None = None        # the message bytes, when still in memory from reception
    damaged: str | None = field(default=None, init=False)

    def open_body(self) -> "io.BytesIO | CheckedBody":
        """The message for reading from its start; it ends after ``body_len`` bytes.

        The caller closes it.  From memory when the message was just received
        and is small (it never went through the disk); else from the queue
        file (it stays valid if the file is later renamed to another state
        directory), checked against the file's message checksum as it is read:
        see :class:`CheckedBody`.  Raises :class:`CorruptBody` (and sets
        ``damaged``) if the file's trailer is no longer valid.
        """
        if self.body is not None:
            return io.BytesIO(self.body)
        f = open(self.path, "rb")
        try:
            trailer = read_trailer(f.fileno(), self.path)
        except CorruptFile as e:
            f.close()
            self.damaged = e.reason
            raise CorruptBody(self.path, e.reason) from None
        except BaseException:
            f.close()
            raise
        return CheckedBody(f, self, trailer.body_crc)

    def read_prefix(self, limit: int) -> bytes:
        """At most ``limit`` bytes from the start of the message (never past it).

        When that is the whole message it has been checked: CorruptBody if damaged.
        """
        with self.open_body() as f:
            return f.read(min(limit, self.body_len))


class CheckedBody:
    """The message bytes of a queue file, checked against their CRC-32 as they are read.

    ``read(n)`` returns at most ``n`` bytes (all that is left if ``n`` < 0),
    and b"" at the end of the message: the envelope after it is never
    returned.  The CRC is updated with each chunk returned (no second pass,
    no copy); the read that reaches the end of the message raises
    :class:`CorruptBody` instead of returning its bytes when the CRC does not
    match the trailer's, and records the reason in ``message.damaged``.  So a
    reader that passes on each chunk before asking for the next (the relay
    client) never passes on the end of a damaged message.  ``crc`` None (an
    SMQ1 file): nothing to check against, the bytes are returned as they are.
    """

    def __init__(self, file: BinaryIO, message: QueuedMessage, crc: int | None):
        self.file = file
        self.message = message
        self.expected = crc
        self.left = message.body_len
        self.crc = 0

    def read(self, size: int | None = -1) -> bytes:
        n = self.left if size is None or size < 0 else min(size, self.left)
        if n == 0:
            return b""
        data = self.file.read(n)
        self.left -= len(data)
        if self.expected is not None:
            self.crc = zlib.crc32(data, self.crc)
            if self.left == 0 and self.crc != self.expected:
                self.message.damaged = MESSAGE_MISMATCH
                raise CorruptBody(self.message.path, MESSAGE_MISMATCH)
        return data

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CheckedBody":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


@dataclass
class RecoveryReport:
    removed_tmp: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)         # active -> incoming
    corrupt: list[tuple[str, str, str]] = field(default_factory=list)   # (name, state, reason)
    removed_status: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)     # valid files per state


class SpoolFiles:
    """Synchronous access to a spool directory: what the daemon and the admin CLI share.

    Nothing here blocks for long (renames, small reads, directory scans), except
    :meth:`write_status` which fsyncs: the daemon calls it in its thread pool.
    """

    def __init__(self, root: Path | str, *, create: bool = False):
        self.root = Path(root)
        # "<root>/<state>/" as strings: a path is built for every file operation
        # of every message, and string concatenation is a tenth of a Path join.
        self._dirs = {name: f"{self.root}/{name}/" for name in (TMP, *STATES, STATUS, REQUESTS)}
        if create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in (TMP, *STATES, STATUS, REQUESTS):
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
        else:
            for name in (TMP, *STATES, STATUS, REQUESTS):
                if name not in NEWER_STATES and not (self.root / name).is_dir():
                    raise FileNotFoundError(f"{self.root}: not a spool directory "
                                            f"(missing {name}/)")

    # -- paths and states -------------------------------------------------

    def path(self, qid: str, state: str) -> str:
        if state not in STATES and state != TMP:
            raise ValueError(f"unknown queue state {state!r}")
        if not valid_qid(qid):
            raise ValueError(f"invalid queue id {qid!r}")
        return self._dirs[state] + qid

    def move(self, qid: str, src: str, dst: str) -> bool:
        """Change a message's state.  False if the file is not in ``src`` (any more)."""
        try:
            os.rename(self.path(qid, src), self.path(qid, dst))
        except FileNotFoundError:
            log.debug("{qid}: not in {src}/, not moved to {dst}/", qid=qid, src=src, dst=dst)
            return False
        log.debug("{qid}: {src} -> {dst}", qid=qid, src=src, dst=dst)
        return True

    def list(self, state: str) -> list[str]:
        """Queue ids in ``state``, oldest first (ids sort by time)."""
        return sorted(name for name, _ in self.scan(state))

    def scan(self, state: str) -> Iterator[tuple[str, float]]:
        """(qid, mtime) of each well-named file in ``state``; one stat per file."""
        try:
            it = os.scandir(self.root / state)
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                if not valid_qid(entry.name):
                    continue
                try:
                    yield entry.name, entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue

    def locate(self, qid: str) -> str | None:
        """The state a message is in now, or None.  Racy by nature: advisory."""
        for state in STATES:
            if os.path.lexists(self.path(qid, state)):
                return state
        return None

    def open(self, qid: str, state: str) -> QueuedMessage:
        """Validate and parse a queue file; CorruptFile or FileNotFoundError.

        The message bytes are not read here: they are checked when they are
        read for delivery (:meth:`QueuedMessage.open_body`).
        """
        path = self.path(qid, state)
        envelope, body_len, _ = read_queue_file(path)
        return QueuedMessage(qid, state, envelope, body_len, path)

    def set_next_attempt(self, qid: str, state: str, when: float) -> bool:
        """Record the next attempt time as the file's mtime (the scheduler's clock)."""
        try:
            os.utime(self.path(qid, state), (when, when))
        except FileNotFoundError:
            return False
        return True

    # -- status -------------------------------------------------------------

    def status_path(self, qid: str) -> str:
        if not valid_qid(qid):
            raise ValueError(f"invalid queue id {qid!r}")
        return self._dirs[STATUS] + qid

    def read_status(self, qid: str) -> dict[str, Any] | None:
        """The message's delivery status, or None if it has none (first attempt)."""
        try:
            with open(self.status_path(qid), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            log.error("{qid}: unreadable status file ignored: {err}", qid=qid, err=e)
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, qid: str, status: dict[str, Any], *, fsync: bool = True) -> None:
        """Replace the status atomically: write a temporary file, fsync, rename."""
        final = self.status_path(qid)
        tmp = final + ".tmp"
        data = json.dumps(status, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)

    def remove(self, qid: str, state: str | None = None, *, status: bool = True) -> bool:
        """Delete a message (from ``state``, or wherever it is) and its status.

        True if a queue file was removed.  ``status=False`` when the caller
        knows the message never had a status file (delivered at its first
        attempt): one unlink fewer.
        """
        removed = False
        for st in ([state] if state else STATES):
            try:
                os.unlink(self.path(qid, st))
                removed = True
                break
            except FileNotFoundError:
                continue
        if removed and status:
            _unlink_quiet(self.status_path(qid))
        return removed

    # -- admin requests -------------------------------------------------------

    def request(self, name: str) -> None:
        """Leave a request for the daemon: ``<qid>.hold``, ``<qid>.delete``,
        ``<qid>.release`` or ``flush``."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad request name {name!r}")
        fd = os.open(self.root / REQUESTS / name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def requests(self) -> list[str]:
        try:
            with os.scandir(self._dirs[REQUESTS]) as it:
                return [e.name for e in it]
        except FileNotFoundError:
            return []

    def clear_request(self, name: str) -> None:
        _unlink_quiet(self.root / REQUESTS / name)


class Spool(SpoolFiles):
    """The daemon's view of the spool: receiving, recovery and fsync in a thread pool.

    The constructor makes the directories that are missing and raises
    PermissionError, naming it, for a directory the running user may not write
    (one left owned by root, say): a daemon started as root builds its spool only
    after it became ``server.user`` (:meth:`shared.daemon.Daemon.start`).

    ``runner`` (tests only) replaces the thread pool: a callable
    ``runner(f, *args) -> Deferred`` that runs ``f`` somewhere.  ``fsync=False``
    disables every fsync and is only for tests and benchmarks that say so.
    """

    def __init__(self, root: Path | str, *, reactor, threadpool_size: int = 4,
                 fsync: bool = True, runner: Callable[..., Deferred] | None = None):
        super().__init__(root, create=True)
        for directory in (self.root, *(self.root / name for name in (TMP, *STATES, STATUS, REQUESTS))):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(directory))
        self.reactor = reactor
        self.fsync = fsync
        self.threadpool = None if runner else WorkerPool(reactor, threadpool_size, name="smarthost-spool")
        self.runner = runner
        self.dir_syncs = 0                       # directory fsyncs done (instrumentation)
        self.open_tmp: set[str] = set()          # tmp file names of this process, not yet committed
        # Empty tmp files made ahead in the pool: a reception never creates one on
        # the reactor (see shared.reserve).  Used once recovery has cleaned tmp/.
        self.reserve = FileReserve(self.root / TMP, self.run) if not runner else None
        # One group commit per directory a commit renames into.
        self.group_syncs = {state: GroupSync(self.run, self.fsync_dir_blocking, self.root / state)
                            for state in COMMIT_STATES}
        self.group_sync = self.group_syncs["incoming"]
        # Removals after delivery, many per pool job: unlink waits on the journal
        # under fsync load, and one hand-off per message costs more than the unlink.
        self.remover = Batcher(self.run, self._remove_batch)
        self.lock_fd: int | None = None
        self.recovery: RecoveryReport | None = None   # set by recover()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Lock the spool against a second daemon (R/pid) and start the thread pool."""
        fd = os.open(self.root / "pid", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{self.root}: another daemon holds the spool lock") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd
        if self.threadpool is not None and not self.threadpool.started:
            self.threadpool.start()

    def stop(self) -> None:
        """Stop the thread pool (waits for running jobs) and release the lock."""
        if self.reserve is not None:
            self.reserve.close()
        if self.threadpool is not None and self.threadpool.started:
            self.threadpool.stop()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run a blocking call off the reactor thread; a Deferred of its result."""
        if self.runner is not None:
            return self.runner(f, *args)
        if not self.threadpool.started:
            return fail(RuntimeError(f"{self.root}: spool not started (call Spool.start())"))
        return self.threadpool.run(f, *args)

    def fsync_dir_blocking(self, path: Path) -> None:
        self.dir_syncs += 1
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- receiving ------------------------------------------------------------

    def new_message(self, qid: str | None = None) -> "IncomingMessage":
        """Create tmp/<qid> (exclusive create) for a message being received.

        ``qid`` lets the SMTP session use its transaction id as the queue id
        (one id in every log line).  Ids are unique by construction (the time
        in microseconds and 50 random bits, :mod:`shared.ids`), so no state
        directory is searched for it on this hot path; FileExistsError if a
        reception with that id is in progress, ValueError if it is malformed.
        By default a new id is made.
        """
        if qid is not None and not valid_qid(qid):
            raise ValueError(f"invalid queue id {qid!r}")
        qid = qid or new_queue_id()
        if self.reserve is not None and self.recovery is not None:
            fd, path = self.reserve.take()
            name = os.path.basename(path)
        else:
            name = qid
            fd = os.open(self.root / TMP / name,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        self.open_tmp.add(name)
        return IncomingMessage(self, qid, fd, name)

    def remove_async(self, qid: str, state: str, *, status: bool = True) -> Deferred:
        """remove() in the thread pool, batched with other removals; fires with its result."""
        return self.remover.request((qid, state, status))

    def _remove_batch(self, items: list[tuple[str, str, bool]]) -> list[bool | BaseException]:
        out: list[bool | BaseException] = []
        for qid, state, status in items:
            try:
                out.append(self.remove(qid, state, status=status))
            except OSError as e:
                out.append(e)
        return out

    def write_status_async(self, qid: str, status: dict[str, Any]) -> Deferred:
        """write_status in the thread pool (it fsyncs)."""
        return self.run(self._write_status_blocking, qid, status)

    def _write_status_blocking(self, qid: str, status: dict[str, Any]) -> None:
        self.write_status(qid, status, fsync=self.fsync)

    # -- start-up ---------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the spool to a consistent state after a restart (or a crash).

        - tmp/*: never acknowledged -> deleted and logged (except files this
          process is receiving right now);
        - active/*: an interrupted delivery -> back to incoming/;
        - every file in incoming/, deferred/, hold/ and quarantine/ is validated by its
          trailer and its message checksum (the whole file is read, a chunk at
          a time); a bad one goes to corrupt/ with a log line naming it and why;
        - status files without a queue file are removed.

        Call it once at start-up, before the queue manager schedules anything
        (QueueManager.start() does, unless it has been done on this Spool).
        """
        report = RecoveryReport()
        with os.scandir(self.root / TMP) as it:
            names = [e.name for e in it]
        for name in names:
            if name in self.open_tmp:
                continue
            path = self.root / TMP / name
            try:
                empty = path.stat().st_size == 0
            except FileNotFoundError:
                continue
            _unlink_quiet(path)
            report.removed_tmp.append(name)
            if not empty:       # empty ones are a previous run's unused reserve
                log.warn("tmp/{name}: removed: never acknowledged (interrupted receive)", name=name)
        for qid in self.list("active"):
            if self.move(qid, "active", "incoming"):
                report.requeued.append(qid)
                log.info("{qid}: interrupted delivery, back to incoming/", qid=qid)
        for state in ("incoming", "deferred", "hold", "quarantine"):
            count = 0
            with os.scandir(self.root / state) as it:
                names = sorted(e.name for e in it)
            for name in names:
                path = self.root / state / name
                if not valid_qid(name):
                    reason = "unexpected file name"
                else:
                    try:
                        read_queue_file(path, check_message=True)
                        count += 1
                        continue
                    except FileNotFoundError:
                        continue
                    except CorruptFile as e:
                        reason = e.reason
                    except OSError as e:
                        reason = f"unreadable: {e.strerror}"
                try:
                    os.rename(path, self.root / "corrupt" / name)
                except FileNotFoundError:
                    continue
                report.corrupt.append((name, state, reason))
                log.error("{state}/{name}: corrupt queue file ({reason}); moved to corrupt/",
                          state=state, name=name, reason=reason)
            report.counts[state] = count
        known = set()
        for state in STATES:
            with os.scandir(self.root / state) as it:
                known.update(e.name for e in it)
        with os.scandir(self.root / STATUS) as it:
            names = [e.name for e in it]
        for name in names:
            base = name[:-4] if name.endswith(".tmp") else name
            if name.endswith(".tmp") or base not in known:
                _unlink_quiet(self.root / STATUS / name)
                report.removed_status.append(name)
        self.recovery = report
        return report


def _read_start(path: str, size: int) -> bytes:
    """The first `size` octets of `path` (the message's descriptor is write-only)."""
    with open(path, "rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path} ends at {len(data)} of {size} bytes")
    return data


class IncomingMessage:
    """A message being received into tmp/<qid>.

    ``write`` appends a chunk synchronously (it lands in the page cache; fine
    on the reactor thread) and adds it to the message's CRC-32 (``crc``), so
    that commit never reads the message again.  ``commit`` makes it durable
    in incoming/ (or quarantine/); ``abort`` throws it away.  OSError from ``write`` (disk
    full) is the caller's to turn into a 4xx reply, after calling ``abort``.
    """

    def __init__(self, spool: Spool, qid: str, fd: int, tmp_name: str | None = None):
        self.spool = spool
        self.qid = qid
        self.tmp_name = tmp_name or qid
        self.size = 0
        self.crc = 0                     # zlib.crc32 of the bytes written so far
        self.fd: int | None = fd
        self.state = "open"          # open -> committing -> committed | aborted
        # Message bytes not yet written: a typical message is written whole by the
        # pool thread that fsyncs it; only a large one is written as it streams in.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body: bytes | None = None   # after commit: the message, if held whole in memory
        self.target = "incoming"         # the state directory commit renames it into

    @property
    def tmp_path(self) -> str:
        return self.spool._dirs[TMP] + self.tmp_name

    def write(self, data: bytes) -> None:
        """Take message bytes; they reach the file at once past WRITE_BEHIND bytes, else at commit."""
        if self.state != "open":
            raise ValueError(f"{self.qid}: write after {self.state}")
        self.pending.append(data)
        self.pending_size += len(data)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.pending_size >= WRITE_BEHIND:
            self._flush()

    def _flush(self) -> None:
        data, self.pending, self.pending_size = b"".join(self.pending), [], 0
        write_all(self.fd, data)

    def contents(self) -> Deferred:
        """A Deferred of the message written so far (for end-of-data checks): what is in
        the file is read by a pool thread, what is still in memory is taken now."""
        held = b"".join(self.pending)
        on_disk = self.size - len(held)
        if not on_disk:
            return succeed(held)
        path = self.tmp_path
        return self.spool.run(lambda: _read_start(path, on_disk) + held)

    def commit(self, envelope: Envelope, state: str = "incoming") -> Deferred:
        """Fire (with None) once the file and its entry in `state`/ are durable.

        `state` is incoming (the queue manager's to deliver: its caller notifies it)
        or quarantine (kept from delivery until an administrator releases it; the
        envelope's ``quarantine`` says why).  ``envelope.received_at`` is set to the
        reactor's time if it is 0.  Errors (disk full, I/O error) errback; the file
        is then removed.
        """
        if state not in COMMIT_STATES:
            return fail(ValueError(f"{self.qid}: cannot commit into {state}/"))
        if self.state != "open":
            return fail(ValueError(f"{self.qid}: commit after {self.state}"))
        self.state = "committing"
        self.target = state
        if not envelope.received_at:
            envelope = replace(envelope, received_at=self.spool.reactor.seconds())
        env_json = encode_envelope(envelope)
        rest = b"".join(self.pending)
        if len(rest) == self.size:           # never flushed: the queue manager may send from memory
            self.body = rest
        tail = rest + env_json + make_trailer(self.size, self.crc, env_json)
        self.pending, self.pending_size = [], 0
        spool = self.spool
        d = spool.run(self._finish_file, tail)
        if spool.fsync:
            d.addCallback(lambda _: spool.group_syncs[state].request())
        d.addCallbacks(self._committed, self._failed)
        return d

    def _finish_file(self, tail: bytes) -> None:      # in the thread pool
        fd, self.fd = self.fd, None
        try:
            write_all(fd, tail)
            if self.spool.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp_path, self.spool.path(self.qid, self.target))

    def _committed(self, _: Any) -> None:
        self.state = "committed"
        self.spool.open_tmp.discard(self.tmp_name)
        return None

    def _failed(self, failure: Failure) -> Failure:
        self.state = "aborted"
        self.spool.open_tmp.discard(self.tmp_name)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        _unlink_quiet(self.tmp_path)
        # The rename may have happened before the directory fsync failed: the
        # client gets a 4xx and will send again, so do not deliver this copy.
        _unlink_quiet(self.spool.path(self.qid, self.target))
        if failure.check(OSError):       # a full disk, an I/O error: one line, no traceback
            log.error("{qid}: queue file commit failed: {err}", qid=self.qid,
                      err=failure.value.strerror or str(failure.value))
        else:
            log.failure("{qid}: queue file commit failed", failure, qid=self.qid)
        return failure

    def abort(self) -> None:
        """Close and delete the tmp file.  Idempotent; no effect once committing."""
        if self.state != "open":
            return
        self.state = "aborted"
        self.spool.open_tmp.discard(self.tmp_name)
        self.pending, self.pending_size = [], 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        _unlink_quiet(self.tmp_path)


class Batcher:
    """Blocking work done in rounds, one pool job per round.

    ``request(item)`` returns a Deferred that fires with ``fn``'s result for
    that item, from a round that *started* after the request.  While a round
    runs, new requests wait for the next one; a round takes every request
    queued before it started.  ``fn(items)`` runs in the pool and returns one
    result per item (an exception instance fails that item's Deferred); if it
    raises, every request of the round fails.
    """

    def __init__(self, run: Callable[..., Deferred], fn: Callable[[list], list]):
        self.run = run
        self.fn = fn
        self.waiting: list[tuple[Any, Deferred]] = []
        self.running = False
        self.rounds = 0

    def request(self, item: Any = None) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((item, d))
        if not self.running:
            self._round()
        return d

    def _round(self) -> None:
        batch, self.waiting = self.waiting, []
        self.running = True
        self.rounds += 1

        def done(result: Any) -> None:
            self.running = False
            if not isinstance(result, Failure) and len(result) != len(batch):
                result = Failure(RuntimeError(f"batch of {len(batch)} gave {len(result)} results"))
            for i, (_, d) in enumerate(batch):
                if isinstance(result, Failure):
                    d.errback(result)
                elif isinstance(result[i], BaseException):
                    d.errback(Failure(result[i]))
                else:
                    d.callback(result[i])
            if self.waiting:
                self._round()

        maybeDeferred(self.run, self.fn, [item for item, _ in batch]).addBoth(done)


class GroupSync(Batcher):
    """Group commit of one directory's fsync.

    ``request()`` returns a Deferred that fires after a directory fsync that
    *started* after the request (see :class:`Batcher`).  So N concurrent
    commits cost about two fsyncs, not N.
    """

    def __init__(self, run: Callable[..., Deferred], fsync_dir: Callable[[Path], None],
                 path: Path):
        super().__init__(run, self.sync)
        self.fsync_dir = fsync_dir
        self.path = path

    def sync(self, items: list) -> list[None]:
        self.fsync_dir(self.path)
        return [None] * len(items)


WRITE_BEHIND = 64 * 1024      # message bytes held in memory before they are written on the reactor


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
