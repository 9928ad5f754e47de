"""A running tier's control files: its pid file, and the status file that answers a reload.

``smarthost reload`` must tell the administrator whether the new configuration
is in use, not merely that a signal was sent.  So the tier writes, after its
start and after every reload, one JSON object into a status file beside its
pid file (``server.pid_file`` + ``".status"``)::

    {"pid": 4242, "generation": 3, "ok": true, "message": "...",
     "restart_needed": ["server.listen"], "time": "2026-11-23T14:05:13Z"}

``generation`` is 0 for the start and one more for every reload attempt,
refused or not; :func:`signal_reload` sends SIGHUP and waits for a generation
newer than the one it saw before.

Files and privileges.  The daemon claims both files as the user who starts it
(root, usually, in a directory such as ``/run`` that only root may write) and
hands the status file to ``server.user`` before it drops privileges.  After
the drop, a report is written to a temporary file in the same directory and
renamed over the status file when the directory lets ``server.user`` create
files (a ``/run/smarthost`` owned by that user): a reader never sees half a
report.  Otherwise the report is written in place, truncating the file; a
reader may then see an empty or partial file for a moment, which
:func:`signal_reload` treats as "no answer yet" and reads again.  Nothing is
fsynced: these files describe a running process and mean nothing after a crash.

The pid file is not a lock: two starts racing over a stale pid file may both
replace it.  What it refuses is the common mistake, a second tier started with
the configuration of one that runs (whose ports it could not bind anyway).

SECURITY: the files are created as whoever starts the tier, in a directory
that person chose; temporary names come from :func:`tempfile.mkstemp` and the
in-place write does not follow a symbolic link.  :func:`signal_reload` sends
SIGHUP to whichever process the pid file names, with the caller's rights.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Sequence

STATUS_SUFFIX = ".status"
_POLL = 0.05            # seconds between two reads of the status file while waiting for an answer


class ControlError(Exception):
    """A control file that cannot be claimed or written; the text names the file."""


def status_path(pid_file: str) -> str:
    return pid_file + STATUS_SUFFIX


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive all the same
        return True
    return True


def _parse_pid(raw: bytes) -> int | None:
    raw = raw.strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def _read_pid(pid_file: str) -> int | None:
    """The pid in `pid_file`, or None when there is none to be read there.

    Read as bytes: no codec to import, which ``server.user`` may not be able to do."""
    try:
        with open(pid_file, "rb") as f:
            return _parse_pid(f.read(64))
    except OSError:
        return None


def _write_atomically(path: str, text: str) -> None:
    """`text` into `path` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_status(status_file: str, pid: int) -> dict | None:
    """The report `pid` last wrote, or None when the file holds none from it (missing,
    empty, half-written in place, or left by an earlier process); raises OSError when
    the file exists but cannot be read."""
    try:
        with open(status_file, encoding="utf-8") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(data, dict) or data.get("pid") != pid or type(data.get("generation")) is not int
            or not isinstance(data.get("ok"), bool)):
        return None
    return data


class ControlFiles:
    """The pid file and status file of the running tier (see the module docstring)."""

    def __init__(self, pid_file: str) -> None:
        self.pid_file = pid_file
        self.status_file = status_path(pid_file)

    def claim(self, uid: int | None = None, gid: int | None = None) -> None:
        """Write our pid into the pid file and create an empty status file owned by
        `uid`:`gid`, so that the daemon can still report once it runs as them.

        Call before dropping privileges.  A pid file naming another live process is
        refused with :class:`ControlError`; one naming a dead process, or holding no
        pid at all, is replaced.
        """
        other = _read_pid(self.pid_file)
        if other is not None and other != os.getpid() and _alive(other):
            raise ControlError(f"{self.pid_file}: process {other} is running with this pid file: stop that "
                               f"tier first, or remove the file if process {other} is not a smarthost tier")
        try:
            _write_atomically(self.pid_file, f"{os.getpid()}\n")
        except OSError as e:
            raise ControlError(f"{self.pid_file}: cannot write the pid file: {e.strerror}") from None
        try:
            fd = os.open(self.status_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                if uid is not None or gid is not None:
                    os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            finally:
                os.close(fd)
        except OSError as e:
            raise ControlError(f"{self.status_file}: cannot create the status file: {e.strerror}") from None

    def report(self, generation: int, ok: bool, message: str, restart_needed: Sequence[str] = ()) -> str | None:
        """Write the outcome of the start (generation 0) or of a reload; None, or what went
        wrong, naming the file: the caller logs it (a reload or start goes on without it,
        but ``smarthost reload`` will then wait in vain)."""
        text = json.dumps({"pid": os.getpid(), "generation": generation, "ok": ok, "message": message,
                           "restart_needed": list(restart_needed),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
        try:
            _write_atomically(self.status_file, text)
            return None
        except PermissionError:          # the directory is not ours since the privilege drop
            pass
        except OSError as e:
            return f"{self.status_file}: cannot write the status file: {e.strerror}"
        try:
            fd = os.open(self.status_file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            return f"{self.status_file}: cannot write the status file: {e.strerror}"
        return None

    def release(self) -> str | None:
        """Remove both files when the pid file still names us (else another tier owns them
        now); None, or what could not be removed: after the privilege drop the directory may
        not let us, and the next start then finds a stale pid file and replaces it."""
        if _read_pid(self.pid_file) != os.getpid():
            return None
        problems = []
        for path in (self.pid_file, self.status_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"{path}: cannot remove: {e.strerror}")
        return "; ".join(problems) or None


def signal_reload(pid_file: str, timeout: float = 10.0) -> tuple[int, str]:
    """SIGHUP the tier named by `pid_file` and wait for its report: (exit code, text).

    0 when the tier reports the new configuration in use; 1 when it refused it,
    did not answer within `timeout` seconds, or could not be signalled.  Changed
    settings that take effect only at a restart are named on a second line.
    """
    status_file = status_path(pid_file)
    try:
        with open(pid_file, "rb") as f:
            raw = f.read(64)
    except FileNotFoundError:
        return 1, f"no running tier: {pid_file} not found (is server.pid_file the running tier's?)"
    except OSError as e:
        return 1, f"cannot read {pid_file}: {e.strerror}"
    pid = _parse_pid(raw)
    if pid is None:
        return 1, f"{pid_file} does not hold a process id (it holds {raw.strip()[:40].decode('latin-1')!r})"
    if not _alive(pid):
        return 1, f"no running tier: process {pid} named in {pid_file} is gone (a stale pid file)"
    try:
        before = _read_status(status_file, pid)
    except OSError as e:
        return 1, f"cannot read {status_file}: {e.strerror}"
    if before is None:
        return 1, (f"process {pid} named in {pid_file} has not reported its start in {status_file}: "
                   f"still starting, or not a smarthost tier")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return 1, f"no running tier: process {pid} named in {pid_file} is gone (a stale pid file)"
    except PermissionError:
        return 1, f"not allowed to signal process {pid} named in {pid_file}: run as root or as the tier's user"
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(_POLL)
        try:
            now = _read_status(status_file, pid)
        except OSError as e:
            return 1, f"cannot read {status_file}: {e.strerror}"
        if now is not None and now["generation"] > before["generation"]:
            break
        if not _alive(pid):
            return 1, f"process {pid} named in {pid_file} exited before answering (see its log)"
        if time.monotonic() >= deadline:
            return 1, f"no answer within {timeout:g} s from process {pid} ({status_file} unchanged)"
    text = ("reloaded: " if now["ok"] else "reload refused: ") + str(now.get("message", ""))
    restart = now.get("restart_needed") or []
    if restart:
        text += "\nrestart needed for: " + ", ".join(str(k) for k in restart)
    return (0 if now["ok"] else 1), text
