"""Delivery into Maildir, before the 250: the domain tier's sink.

Hosted domains, users and aliases come from the ``[mailboxes]`` section.  A
recipient is looked up when RCPT arrives: an alias expands to its users, an
unknown address gets 550 5.1.1 while the sender is still connected (no bounce
later).  The message streams into one file under ``MAILDIR_ROOT/.tmp/HOSTNAME``; at end
of data a thread of the bounded pool fsyncs it, hard-links it into each
mailbox's ``new/`` (copying when the mailbox is on another file system), fsyncs
each ``new/`` directory and only then is 250 sent.  Pool threads delivering
into the same mailbox at the same time share the fsync of its ``new/``
(shared.dirsync: each still waits for an fsync that started after its link).
A mailbox directory found or made once is not checked again; if it disappears,
the link fails and the delivery makes it again.

TRUST: addresses reaching this module were parsed by the SMTP core; a local
part is used in a path only after it matched a configured user exactly, so no
client string ever names a file.
"""
from __future__ import annotations

import copy
import errno
import os
import socket
import time
from itertools import count
from pathlib import Path

from twisted.logger import Logger

from shared.config import schema as rules
from shared.config.schema import Key, Loading, Section
from shared.dirsync import DirSyncs
from shared.message import HeaderEdits
from shared.reserve import FileReserve, write_all
from shared.smtp.reply import UNKNOWN_USER, Reply, storage_error

log = Logger(namespace="smarthost.maildir")
WRITE_BEHIND = 64 * 1024      # message bytes held in memory before they are written on the reactor
CANNOT_WRITE = Reply(451, "4.3.0", "Error: cannot write to mailbox, try again later")
CONFIG_ERROR = Reply(451, "4.3.0", "Error: local configuration error, try again later")
_seq = count(1)


def _finish(ld: Loading) -> None:
    """Users in hosted domains, aliases pointing at users; the hosted domains are the
    relay domains unless relay.relay_domains says otherwise; a domain without a
    postmaster is a warning."""
    mb = ld.values["mailboxes"]
    users = set(mb["users"])
    for user in users:
        if user.rpartition("@")[2] not in mb["domains"]:
            raise ld.error("mailboxes.users", f"{user} is not in a hosted domain (mailboxes.domains)")
    aliases = {}
    for alias, targets in mb["aliases"].items():
        key = f"mailboxes.aliases.{alias}"
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ld.error(key, "expected an address or a non-empty array of addresses")
        try:
            alias = rules.user_address(alias)
            targets = [rules.user_address(t) for t in targets]
        except ValueError as e:
            raise ld.error(key, str(e)) from None
        for t in targets:
            if t not in users:
                raise ld.error(key, f"target {t} is not a user (mailboxes.users)")
        aliases[alias] = targets
    mb["aliases"] = aliases
    if not ld.values["relay"]["relay_domains"]:
        ld.values["relay"]["relay_domains"] = list(mb["domains"])
    known = users | set(aliases)
    for d in mb["domains"]:
        if f"postmaster@{d}" not in known:
            ld.warn("mailboxes.aliases", f"no postmaster@{d} (RFC 5321 4.5.1: every domain has one); "
                                         f"mail to it, and the filter's double bounces, are refused")
    if not mb["fsync"]:
        ld.warn("mailboxes.fsync", "false: a 250 no longer promises that the message survives a "
                                   "crash or power loss (never in production)")


MAILBOXES = Section("mailboxes", {
    "domains": Key(list, [], "hosted domains", rules.domain, required_in=("domain",)),
    "maildir_root": Key(str, "", "mailboxes are ROOT/DOMAIN/LOCALPART/Maildir (absolute path)", rules.path,
                        required_in=("domain",), directory=True),
    "users": Key(list, [], "user addresses with a mailbox (the local part is a directory name: "
                           "no '/', no control characters, no leading '.')", rules.user_address),
    "aliases": Key(dict, {}, "alias address -> list of user addresses"),
    "fsync": Key(bool, True, "fsync each message and each mailbox's new/ before 250 (never turn off "
                             "in production)"),
}, finish=_finish)


def ensure_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


class MailboxOutsideRoot(PermissionError):
    """A mailbox path that, symbolic links resolved, leads out of the maildir root."""


class Mailboxes:
    """Hosted domains, users and aliases: address -> Maildir paths.

    A mailbox is ROOT/DOMAIN/LOCALPART/Maildir.  Each user's domain and local part
    must be one ordinary directory name (the configuration refuses others; so does
    the constructor, with ValueError), so the path built is always below the root;
    what the directories hold at delivery time is checked by
    :meth:`check_inside_root`.
    """

    def __init__(self, root: str, domains: list[str], users: list[str], aliases: dict[str, list[str]]) -> None:
        self.root = Path(root)
        self.domains = frozenset(domains)
        for user in users:
            for part in user.rpartition("@")[::2]:
                if not part or part.startswith(".") or "/" in part or "\0" in part:
                    raise ValueError(f"{user!r}: {part!r} cannot be a directory name under {root}")
        self.users = {u.lower(): u for u in users}
        self.aliases = {a.lower(): [t.lower() for t in ts] for a, ts in aliases.items()}

    def maildir(self, user: str) -> str:
        local, _, domain = self.users[user].rpartition("@")
        return os.path.join(self.root, domain, local, "Maildir")

    def check_inside_root(self, path: str) -> None:
        """Raise MailboxOutsideRoot unless `path`, every symbolic link in it resolved
        (os.path.realpath, at the time of the call), lies below the real maildir root.

        For the sink, before it makes or writes into a mailbox directory: a link
        planted inside the root must not carry a delivery elsewhere.
        """
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real == root or os.path.commonpath((root, real)) != root:
            raise MailboxOutsideRoot(errno.EACCES, f"mailbox leads out of the maildir root {root} "
                                                   f"(to {real})", path)

    def resolve(self, address: str) -> list[str] | None:
        """The mailboxes `address` delivers to, or None when it is unknown."""
        key = address.lower()
        if "@" not in key and key == "postmaster":
            key = next((a for a in self.aliases if a.startswith("postmaster@")), key)
        targets = self.aliases.get(key, [key])
        if not all(t in self.users for t in targets):
            return None
        return [self.maildir(t) for t in targets]


class MaildirSink:
    """Delivery into the mailboxes; messages are received in ``MAILDIR_ROOT/.tmp/HOST``.

    The constructor makes that directory, empties it and raises PermissionError,
    naming it, when the running user may not write it (one left owned by root,
    say): a daemon started as root builds its sink only after it became
    ``server.user`` (:meth:`shared.daemon.Daemon.start`).
    """

    def __init__(self, mailboxes: Mailboxes, *, pool, hostname: str, fsync: bool = True) -> None:
        self.mailboxes = mailboxes
        self.pool = pool
        self.hostname = hostname.replace("/", "\\057").replace(":", "\\072")
        self.fsync = fsync
        # Per host: domain nodes may share the mailbox file system.
        self.spool = mailboxes.root / ".tmp" / socket.gethostname()
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(self.spool, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", str(self.spool))
        for stale in self.spool.iterdir():         # this host's last run: never acknowledged
            stale.unlink()
        self.reserve = FileReserve(str(self.spool), pool.run)
        self.dir_syncs = DirSyncs()
        self.known: set[str] = set()               # mailboxes whose directories exist

    def close(self) -> None:
        self.reserve.close()

    def session(self, port) -> "MaildirSession":
        return MaildirSession(self)

    def with_mailboxes(self, mailboxes: Mailboxes) -> "MaildirSink":
        """This sink (its spool, reserve and fsync sharing) delivering to `mailboxes`:
        what a reload gives new sessions; those open keep the mailboxes they began with."""
        other = copy.copy(self)
        other.mailboxes = mailboxes
        return other

    def unique_name(self, size: int) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(_seq)}.{self.hostname},S={size}"

    def deliver(self, tmp_path: str, fd: int, rest: bytes, size: int, mailboxes: list[str],
                edits: HeaderEdits | None = None, head: int = 0) -> list[str]:
        """Runs in the pool: write `rest`, apply the checks' header `edits` (below the first
        `head` octets, our Return-Path), make `tmp_path` durable, link it into every mailbox."""
        try:
            write_all(fd, rest)
            if edits:
                size = self._edit(tmp_path, edits, head)
            if self.fsync and not edits:      # an edited file was fsynced by _edit
                os.fsync(fd)
        finally:
            os.close(fd)
        delivered = []
        try:
            for mbox in mailboxes:
                name = self.unique_name(size)
                self._link(tmp_path, mbox, name)
                if self.fsync:
                    self.dir_syncs.sync(mbox + "/new")
                delivered.append(f"{mbox}/new/{name}")
        finally:
            os.unlink(tmp_path)
        return delivered

    def _edit(self, tmp_path: str, edits: HeaderEdits, head: int) -> int:
        """Rewrite the message file with `edits` applied (a new file renamed over it,
        fsynced when fsync is on); its new size."""
        remover = edits.remover()
        edited = tmp_path + ".edit"
        with open(tmp_path, "rb") as fin, open(edited, "xb") as fout:
            fout.write(fin.read(head))
            fout.write(edits.prefix())
            while chunk := fin.read(1 << 20):
                fout.write(remover.feed(chunk))
            fout.write(remover.flush())
            fout.flush()
            if self.fsync:
                os.fsync(fout.fileno())
            size = fout.tell()
        os.rename(edited, tmp_path)
        return size

    def _link(self, tmp_path: str, mbox: str, name: str) -> None:
        for sub in ("new", "tmp"):                  # tmp: where _copy writes
            self.mailboxes.check_inside_root(f"{mbox}/{sub}")
        if mbox not in self.known:
            ensure_maildir(mbox)
            self.known.add(mbox)
        try:
            os.link(tmp_path, f"{mbox}/new/{name}")
        except FileNotFoundError:                   # the mailbox was removed meanwhile
            ensure_maildir(mbox)
            os.link(tmp_path, f"{mbox}/new/{name}")
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._copy(tmp_path, mbox, name)

    def _copy(self, src: str, mbox: str, name: str) -> None:
        tmp = f"{mbox}/tmp/{name}"
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            if self.fsync:
                os.fsync(fout.fileno())
        os.rename(tmp, f"{mbox}/new/{name}")


class MaildirSession:
    def __init__(self, sink: MaildirSink) -> None:
        self.sink = sink
        self.targets: list[str] = []
        self.fd: int | None = None
        self.path: str | None = None
        self.size = 0
        self.pending: list[bytes] = []          # bytes not yet written (see write)
        self.pending_size = 0
        self.write_error: OSError | None = None  # a write failed (disk full): told at end of data
        self.head = 0                           # octets of our Return-Path at the top of the file

    def begin(self, txn):
        self.targets = []
        return None

    def rcpt(self, txn, recipient):
        boxes = self.sink.mailboxes.resolve(recipient.address)
        if boxes is None:
            return Reply(UNKNOWN_USER.code, UNKNOWN_USER.enhanced,
                         f"<{recipient.address}>: Recipient address rejected: User unknown in virtual mailbox table")
        for b in boxes:
            if b not in self.targets:
                self.targets.append(b)
        return None

    def data_start(self, txn):
        try:
            self.fd, self.path = self.sink.reserve.take()
        except OSError as e:
            log.error("{qid}: cannot create a file in {dir}: {err}", qid=txn.queue_id, dir=self.sink.spool, err=e)
            return CANNOT_WRITE
        self.size = 0
        self.write_error = None
        return_path = f"Return-Path: <{txn.envelope.sender}>\r\n".encode("utf-8")
        self.head = len(return_path)
        self.write(return_path)
        return None

    def write(self, chunk: bytes) -> None:
        """Bytes reach the file past WRITE_BEHIND, or with the fsync at end of data.

        A failed write (disk full, quota, I/O error) is not the client's fault
        and not a reason to drop its session: the rest of the message is
        discarded and end of data answers 452 4.3.1 (451 4.3.0 for other errors).
        """
        if self.fd is None or self.write_error is not None:
            return
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        self.size += len(chunk)
        if self.pending_size >= WRITE_BEHIND:
            data, self.pending, self.pending_size = b"".join(self.pending), [], 0
            try:
                write_all(self.fd, data)
            except OSError as e:
                self.write_error = e

    def body_reader(self, txn):
        """The message as received (without our Return-Path), read by a pool thread."""
        if self.fd is None or self.write_error is not None:
            return None
        held = b"".join(self.pending)
        path, on_disk, head = self.path, self.size - len(held), self.head

        def read() -> bytes:
            with open(path, "rb") as f:        # the session's descriptor is write-only
                data = f.read(on_disk)
            if len(data) != on_disk:
                raise OSError(f"{path} ends at {len(data)} of {on_disk} bytes")
            return (data + held)[head:]
        return lambda: self.sink.pool.run(read)

    def data_end(self, txn):
        if getattr(txn, "quarantine", None):
            # Only the filter's queue can keep a message from delivery: here it would land
            # in the mailbox.  Never deliver what a check asked to keep back.
            self.abort(txn)
            log.error("{qid}: an end_of_data check asked for quarantine, which the domain tier "
                      "cannot do: it delivers at once; run that check at the filter", qid=txn.queue_id)
            return CONFIG_ERROR
        if self.write_error is not None:
            error = self.write_error
            self.abort(txn)
            log.error("{qid}: cannot write the message under {dir}: {err}", qid=txn.queue_id,
                      dir=self.sink.spool, err=error.strerror or str(error))
            return storage_error(error, CANNOT_WRITE)
        fd, path, targets = self.fd, self.path, list(self.targets)
        rest, self.pending, self.pending_size = b"".join(self.pending), [], 0
        self.fd = self.path = None
        d = self.sink.pool.run(self.sink.deliver, path, fd, rest, self.size, targets, txn.edits, self.head)

        def done(files):
            where = dict(zip(targets, files))
            for rcpt in txn.envelope.recipients:
                boxes = self.sink.mailboxes.resolve(rcpt.address) or ()
                log.info("{qid}: to=<{rcpt}>, relay=maildir, status=sent (delivered to maildir {files})",
                         qid=txn.queue_id, rcpt=rcpt.address, files=", ".join(where[b] for b in boxes))
            return Reply(250, "2.0.0", f"Ok: delivered as {txn.queue_id}")

        def failed(failure):
            if failure.check(OSError):          # disk full, permissions: one line, no traceback
                reply = storage_error(failure.value, CANNOT_WRITE)
                detail = failure.value.strerror or str(failure.value)
            else:
                log.failure("{qid}: maildir delivery failed", failure, qid=txn.queue_id)
                reply, detail = CANNOT_WRITE, "internal error"
            log.error("{qid}: to={to}, relay=maildir, status=deferred ({reply}: {detail})", qid=txn.queue_id,
                      to=",".join(f"<{r.address}>" for r in txn.envelope.recipients), reply=str(reply),
                      detail=detail)
            return reply
        return d.addCallbacks(done, failed)

    def abort(self, txn) -> None:
        self.pending, self.pending_size = [], 0
        self.write_error = None
        if self.fd is not None:
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.fd = self.path = None
        self.targets = []

    def close(self) -> None:
        self.abort(None)
