"""Queue administration behind ``smarthost queue list|show|flush|hold|release|delete``.

These functions run in the admin's process, while the daemon may be running
on the same spool, so they only use operations that are safe against it:

- a state change is a rename; if the daemon moved the file first, our rename
  fails with ENOENT and we look again (a few times) where the file went;
- a message in active/ belongs to a delivery in progress: instead of touching
  it, hold and delete leave a request file R/requests/<qid>.hold|.delete that
  the queue manager applies when the attempt ends (or, if the message is no
  longer in flight, at its next poll of R/requests/, once a second; if the
  daemon is down, at its next start);
- the status files (R/status/) belong to the daemon and are only read here;
  the next-attempt time of a deferred message is its file's mtime, which
  flush and release set to now;
- the daemon is poked through R/requests/: ``flush`` (every deferred message
  is due now) and ``<qid>.release`` (schedule this released message now).

Queue ids given on the command line are checked against the queue id syntax
before they are used in a path.  :func:`main` is the CLI's entry point
(``smarthost queue ACTION [QID...|ALL]``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from shared.queue.store import (
    HEADER_READ_LIMIT, STATES, CorruptFile, SpoolFiles, read_queue_file, valid_qid,
)

_TRIES = 3


class AdminError(Exception):
    """A queue command that cannot be carried out (bad spool, bad id, no such message)."""


def main(root: Path | str, action: str, qids: list[str], out: TextIO | None = None) -> int:
    """Run one ``smarthost queue`` action and print its result.

    ``ALL`` as the only qid means every message the action applies to (hold:
    incoming, active and deferred; release: hold; delete: everything).
    Returns 0, or 1 if some named message was not found or not changed.
    Raises AdminError for a path that is not a spool or a bad ``show``.
    """
    out = out or sys.stdout
    try:
        files = SpoolFiles(root)
    except FileNotFoundError as e:
        raise AdminError(str(e)) from None
    if action == "list":
        print(format_list(list_queue(root)), file=out, end="")
        return 0
    if action == "flush":
        n = flush(root)
        print(f"{n} deferred message(s) made due now", file=out)
        return 0
    if action == "show":
        for qid in qids:
            try:
                print(show(root, qid), file=out)
            except ValueError as e:
                raise AdminError(str(e)) from None
            except KeyError:
                raise AdminError(f"{qid}: no such message") from None
        return 0
    ops: dict[str, tuple[Callable[..., dict[str, str]], tuple[str, ...], set[str]]] = {
        "hold": (hold, ("incoming", "active", "deferred"), {"held", "hold requested"}),
        "release": (release, ("hold",), {"released", "hold request cancelled"}),
        "delete": (delete, ("incoming", "active", "deferred", "hold", "corrupt"),
                   {"deleted", "delete requested"}),
    }
    if action not in ops:
        raise AdminError(f"unknown action {action!r}")
    func, states, ok = ops[action]
    if [q.upper() for q in qids] == ["ALL"]:
        qids = [qid for state in states for qid in files.list(state)]
    results = func(root, qids)
    for qid, result in results.items():
        print(f"{qid}: {result}", file=out)
    return 0 if all(r in ok for r in results.values()) else 1


def format_list(entries: list[dict[str, Any]]) -> str:
    """A listing like Postfix's mailq: one block per message."""
    if not entries:
        return "Queue is empty\n"
    lines = []
    for e in entries:
        if e["error"]:
            lines.append(f"{e['qid']:<22} {e['state']:<9} (corrupt: {e['error']})")
            lines.append("")
            continue
        lines.append(f"{e['qid']:<22} {e['state']:<9} {e['size']:>9}  "
                     f"{_fmt_time(e['arrival'])}  <{e['sender']}>")
        if e["next_attempt"] is not None:
            lines.append(f"{'':<22} next attempt {_fmt_time(e['next_attempt'])}, "
                         f"{e['attempts']} attempt(s) so far")
        for rcpt in e["recipients"]:
            lines.append(f"{'':<22} <{rcpt}>")
            reply = (e["last_reply"] or {}).get(rcpt)
            if reply:
                lines.append(f"{'':<24} ({reply})")
        lines.append("")
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    lines.append("-- " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines) + "\n"


def list_queue(root: Path | str) -> list[dict[str, Any]]:
    """Every message in the spool, oldest first.

    Each entry: qid, state, size (message bytes), arrival (epoch seconds),
    sender, recipients (those still to deliver), next_attempt (deferred only,
    epoch seconds), attempts, last_reply ({recipient: reply}), upstream_id,
    and error (corrupt files: why; the other fields are then None).
    """
    files = SpoolFiles(root)
    out = []
    for state in STATES:
        for qid, mtime in files.scan(state):
            entry: dict[str, Any] = {
                "qid": qid, "state": state, "size": None, "arrival": None, "sender": None,
                "recipients": None, "next_attempt": mtime if state == "deferred" else None,
                "attempts": 0, "last_reply": {}, "upstream_id": None, "error": None,
            }
            try:
                env, body_len, _ = read_queue_file(files.path(qid, state))
            except FileNotFoundError:
                continue                         # moved or removed while we looked
            except CorruptFile as e:
                entry["error"] = e.reason
                out.append(entry)
                continue
            status = files.read_status(qid) or {}
            pending = status.get("pending")
            recipients = [r.address for r in env.recipients]
            if isinstance(pending, list):
                recipients = [a for a in dict.fromkeys(recipients) if a in set(pending)]
            entry.update(size=body_len, arrival=env.received_at, sender=env.sender,
                         recipients=recipients, attempts=status.get("attempts", 0),
                         last_reply=status.get("last_reply", {}), upstream_id=env.upstream_id)
            out.append(entry)
    out.sort(key=lambda e: e["qid"])
    return out


def show(root: Path | str, qid: str) -> str:
    """Envelope, delivery status and header of one message, as text.

    KeyError if there is no such message, ValueError for a malformed id.
    """
    if not valid_qid(qid):
        raise ValueError(f"invalid queue id {qid!r}")
    files = SpoolFiles(root)
    for _ in range(_TRIES):
        state = files.locate(qid)
        if state is None:
            raise KeyError(qid)
        path = files.path(qid, state)
        lines = [f"queue id: {qid}", f"state: {state}"]
        try:
            env, body_len, _ = read_queue_file(path)
            with open(path, "rb") as f:
                head = f.read(min(body_len, HEADER_READ_LIMIT))
        except FileNotFoundError:
            continue                             # moved meanwhile: look again
        except CorruptFile as e:
            lines.append(f"corrupt: {e.reason}")
            return "\n".join(lines) + "\n"
        if state == "deferred":
            try:
                lines.append(f"next attempt: {_fmt_time(os.stat(path).st_mtime)}")
            except FileNotFoundError:
                pass
        lines.append(f"arrival: {_fmt_time(env.received_at)}")
        lines.append(f"size: {body_len}")
        lines.append(f"sender: <{env.sender}>")
        for r in env.recipients:
            extra = []
            if r.notify is not None:
                extra.append("NOTIFY=" + ",".join(r.notify))
            if r.orcpt:
                extra.append(f"ORCPT={r.orcpt}")
            lines.append(f"recipient: <{r.address}>" + (" " + " ".join(extra) if extra else ""))
        for name in ("ret", "envid", "body", "smtputf8", "upstream_id"):
            value = getattr(env, name)
            if value not in (None, False):
                lines.append(f"{name}: {value}")
        client = env.client
        if client.addr or client.helo:
            lines.append(f"client: {client.name or 'unknown'}[{client.addr}] helo={client.helo} "
                         f"login={client.login} tls={client.tls}")
        status = files.read_status(qid)
        if status:
            lines.append(f"attempts: {status.get('attempts', 0)}")
            if isinstance(status.get("pending"), list):
                lines.append("pending: " + ", ".join(f"<{a}>" for a in status["pending"]))
            for addr, reply in (status.get("last_reply") or {}).items():
                lines.append(f"last reply for <{addr}>: {reply}")
        lines.append("")
        end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0),
                  default=len(head))
        lines.append(head[:end].decode("utf-8", "replace").replace("\r\n", "\n"))
        return "\n".join(lines) + "\n"
    raise KeyError(qid)


def hold(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Put messages on hold.  Result per qid: "held", "already held",
    "hold requested" (in delivery: done when the attempt ends), "corrupt",
    "not found" or "invalid queue id"."""
    files = SpoolFiles(root)
    results = {}
    for qid in qids:
        if not valid_qid(qid):
            results[qid] = "invalid queue id"
            continue
        result = "not found"
        for _ in range(_TRIES):
            if files.move(qid, "incoming", "hold") or files.move(qid, "deferred", "hold"):
                result = "held"
                break
            state = files.locate(qid)
            if state == "active":
                files.request(f"{qid}.hold")
                result = "hold requested"
                break
            if state in ("hold", "corrupt", None):
                result = {"hold": "already held", "corrupt": "corrupt"}.get(state, "not found")
                break
        results[qid] = result
    return results


def release(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Release held messages: hold/ -> deferred/, due now, and tell the daemon.
    Result per qid: "released", "hold request cancelled", "not held", "invalid queue id"."""
    files = SpoolFiles(root)
    results = {}
    for qid in qids:
        if not valid_qid(qid):
            results[qid] = "invalid queue id"
            continue
        if files.move(qid, "hold", "deferred"):
            files.set_next_attempt(qid, "deferred", time.time())
            files.request(f"{qid}.release")
            results[qid] = "released"
        elif f"{qid}.hold" in files.requests():
            files.clear_request(f"{qid}.hold")
            results[qid] = "hold request cancelled"
        else:
            results[qid] = "not held"
    return results


def delete(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Delete messages without a bounce.  Result per qid: "deleted",
    "delete requested" (in delivery: done when the attempt ends), "not found"
    or "invalid queue id"."""
    files = SpoolFiles(root)
    results = {}
    for qid in qids:
        if not valid_qid(qid):
            results[qid] = "invalid queue id"
            continue
        result = "not found"
        for _ in range(_TRIES):
            if any(files.remove(qid, state) for state in ("incoming", "deferred", "hold", "corrupt")):
                files.clear_request(f"{qid}.hold")
                result = "deleted"
                break
            state = files.locate(qid)
            if state == "active":
                files.request(f"{qid}.delete")
                result = "delete requested"
                break
            if state is None:
                break
        results[qid] = result
    return results


def flush(root: Path | str) -> int:
    """Make every deferred message due now and poke the daemon; the number made due."""
    files = SpoolFiles(root)
    now = time.time()
    count = sum(1 for qid, _ in list(files.scan("deferred"))
                if files.set_next_attempt(qid, "deferred", now))
    files.request("flush")
    return count


def _fmt_time(t: float | None) -> str:
    if not t:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
