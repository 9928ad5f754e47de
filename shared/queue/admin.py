"""Queue administration behind ``smarthost queue list|show|flush|hold|release|delete``
and ``smarthost quarantine list|show|release|delete``.

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
  flush and release set to now.

Everything else the daemon must know or log goes through R/requests/ too, one
empty file per message and fact, read at the same poll:

    flush          every deferred message is due now
    <qid>.flush    this deferred message is due now: schedule it
    <qid>.release  this message was moved from hold/ to deferred/: log it, schedule it
    <qid>.held     this message was moved to hold/: log it
    <qid>.deleted  this message was deleted: log it
    <qid>.quarantine-release  this message was moved from quarantine/ to deferred/:
                   log it, schedule it
    <qid>.quarantine-deleted  this message was deleted from quarantine/: log it

So every hold, release and delete leaves a line in the tier's log, written by
the daemon (the admin process has no log of its own), whether the admin
command did it with a rename or the daemon applied a request: at most a
poll interval later, or when the daemon next starts if it is down (the
command's own output says what it did at once).  Notices left within one
poll interval are logged in no particular order.

Queue ids on the command line (:func:`main`) are case-insensitive (ids are
upper-case letters and digits, :mod:`shared.ids`) and checked against the
queue id syntax before they are used in a path.  A name that is no queue
file's is looked up as an upstream id: the previous tier's queue id, which
its client was told in "250 ... queued as ID" (see :func:`resolve`).

``--json`` (like ``postqueue -j``): ``list`` prints one JSON object per
message and line, :func:`list_json`; ``show`` one object per message,
:func:`show_json`.

Quarantine (:func:`quarantine_main`).  A message an end-of-data check asked to
keep from delivery sits in quarantine/ (its envelope says why), never
scheduled.  ``queue list`` and ``queue show`` show it with its state and
reason, ``queue delete`` may delete it; ``queue hold``, ``release`` and
``flush`` leave it alone and say it is quarantined.  ``quarantine list`` and
``show`` show only quarantined messages (show: with the whole message, for
judging it), ``quarantine release`` moves one to deferred/, due now, where the
daemon delivers it as any other (with its header edits, not filtered again),
and ``quarantine delete`` removes it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from shared.queue.store import (
    HEADER_READ_LIMIT, STATES, CorruptFile, SpoolFiles, read_queue_file, valid_qid,
)

_TRIES = 3

# What ALL stands for, per action (flush ALL is flush without a qid).
_ALL_STATES = {"show": STATES, "hold": ("incoming", "active", "deferred"), "release": ("hold",),
               "delete": STATES,
               "quarantine show": ("quarantine",), "quarantine release": ("quarantine",),
               "quarantine delete": ("quarantine",)}

QUARANTINED = "quarantined (see smarthost quarantine)"     # what queue hold/release/flush say of it


class AdminError(Exception):
    """A queue command that cannot be carried out (bad spool, bad id, no such message)."""


def main(root: Path | str, action: str, qids: list[str], out: TextIO | None = None,
         *, as_json: bool = False) -> int:
    """Run one ``smarthost queue`` action and print its result.

    Each QID is a queue id or an upstream id (:func:`resolve`), in any case.
    ``ALL`` as the only qid means every message the action applies to (show
    and delete: everything; hold: incoming, active and deferred; release:
    hold; flush: deferred, as does flush without a qid).  ``as_json``: JSON
    output for list and show.  Returns 0, or 1 if some named message was not
    found or not changed.  Raises AdminError for a path that is not a spool or
    a bad ``show``.
    """
    out = out or sys.stdout
    try:
        files = SpoolFiles(root)
    except FileNotFoundError as e:
        raise AdminError(str(e)) from None
    if action == "list":
        entries = list_queue(root)
        if as_json:
            for e in entries:
                print(json.dumps(list_json(e), ensure_ascii=False), file=out)
        else:
            print(format_list(entries), file=out, end="")
        return 0
    if action == "flush" and [q.upper() for q in qids] in ([], ["ALL"]):
        n = flush(root)
        print(f"{n} deferred message(s) made due now", file=out)
        return 0
    if action == "show":
        targets = _targets(files, action, qids)
        for given, qid in targets:
            if qid is None:
                raise AdminError(f"invalid queue id {given!r}" if not valid_qid(given)
                                 else f"{given}: no such message")
        for given, qid in targets:
            try:
                if as_json:
                    print(json.dumps(show_json(root, qid), ensure_ascii=False), file=out)
                else:
                    print(show(root, qid), file=out)
            except KeyError:
                if given is not None:            # None (ALL): gone since it was listed
                    raise AdminError(f"{given}: no such message") from None
        return 0
    ops: dict[str, tuple[Callable[..., dict[str, str]], set[str]]] = {
        "hold": (hold, {"held", "hold requested"}),
        "release": (release, {"released", "hold request cancelled"}),
        "delete": (delete, {"deleted", "delete requested"}),
        "flush": (flush_messages, {"made due now", "in delivery"}),
    }
    if action not in ops:
        raise AdminError(f"unknown action {action!r}")
    func, ok = ops[action]
    targets = _targets(files, action, qids)
    results = func(root, [qid for _, qid in targets if qid is not None])
    return _report(targets, results, ok, out)


def _report(targets, results: dict[str, str], ok: set[str], out) -> int:
    """One line per message named (its result, and the upstream id it was named by); exit
    status 1 unless every result is one of `ok`."""
    status = 0
    for given, qid in targets:
        if qid is None:
            result = "invalid queue id" if not valid_qid(given) else "not found"
            line = f"{given}: {result}"
        else:
            result = results[qid]
            via = f" (upstream id {given.upper()})" if given and given.upper() != qid else ""
            line = f"{qid}: {result}{via}"
        if result not in ok:
            status = 1
        print(line, file=out)
    return status


def _targets(files: SpoolFiles, action: str, qids: list[str]) -> list[tuple[str | None, str | None]]:
    """(name as given, queue id) for each message the command-line names stand
    for (:func:`resolve`), in order; the queue id is None for a name that is
    not a valid queue id or matches nothing.  ALL: (None, queue id) for every
    message the action applies to."""
    names = [q.upper() for q in qids]
    if names == ["ALL"]:
        return [(None, qid) for state in _ALL_STATES[action] for qid in files.list(state)]
    matches = resolve(files, [n for n in names if valid_qid(n)])
    targets: list[tuple[str | None, str | None]] = []
    for given, name in zip(qids, names):
        found = matches.get(name) or [None]
        targets.extend((given, qid) for qid in found)
    return targets


def resolve(files: SpoolFiles, names: Iterable[str]) -> dict[str, list[str]]:
    """The queue ids each of ``names`` (valid, upper-case queue ids) stands for.

    A name that is a file name in a state directory stands for that message
    (at most five stats).  Otherwise it is taken as an upstream id: it stands
    for the messages whose envelope has that ``upstream_id`` -- usually one,
    more if the previous tier sent its message twice (a lost 250).  Finding
    them means reading the envelope of every message in the spool (its
    trailer and envelope, not the message), once for all the names that need
    it: fine for an admin command, a few seconds for a very large queue.  Like
    :meth:`SpoolFiles.locate` this is advisory: a message that changes state
    while it is looked for can be missed.  Result: {name: [qid, ...]}.
    """
    matches: dict[str, list[str]] = {}
    upstream: set[str] = set()
    for name in names:
        if files.locate(name) is not None:
            matches[name] = [name]
        else:
            matches[name] = []
            upstream.add(name)
    if upstream:
        for state in STATES:
            for qid, _ in files.scan(state):
                try:
                    env, _, _ = read_queue_file(files.path(qid, state))
                except (OSError, CorruptFile):
                    continue                     # gone, or nothing to compare with
                up = (env.upstream_id or "").upper()
                if up in upstream:
                    matches[up].append(qid)
        for name in upstream:                    # seen twice if it moved on during the scan
            matches[name] = sorted(set(matches[name]))
    return matches


def format_list(entries: list[dict[str, Any]], empty: str = "Queue is empty") -> str:
    """A listing like Postfix's mailq: one block per message; a quarantined one says why."""
    if not entries:
        return empty + "\n"
    lines = []
    for e in entries:
        if e["error"]:
            lines.append(f"{e['qid']:<22} {e['state']:<9} (corrupt: {e['error']})")
            lines.append("")
            continue
        if len(e["state"]) <= 9:
            state_size = f"{e['state']:<9} {e['size']:>9}"
        else:                                    # "quarantine": the same width, the size narrower
            state_size = f"{e['state']} {e['size']:>{max(1, 18 - len(e['state']))}}"
        lines.append(f"{e['qid']:<22} {state_size}  "
                     f"{_fmt_time(e['arrival'])}  <{e['sender']}>")
        if e["state"] == "quarantine":
            lines.append(f"{'':<22} quarantined: {e['reason']}")
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


def list_json(entry: dict[str, Any]) -> dict[str, Any]:
    """One :func:`list_queue` entry as ``list --json`` prints it (``postqueue -j``'s names).

    queue_id; queue_name (the state: incoming, active, deferred, hold,
    corrupt); arrival_time (epoch seconds); message_size (bytes);
    sender ("" for the null sender); recipients, those still to deliver:
    [{address, delay_reason}] with delay_reason (the last reply) only for
    recipients that have been tried; next_attempt (epoch seconds, deferred
    only, else null); attempts; upstream_id (the previous tier's queue id, or
    null); and, for a message in quarantine only, quarantine_reason (why a
    check kept it from delivery).  A corrupt file has only queue_id,
    queue_name and error (why it is corrupt).
    """
    if entry["error"]:
        return {"queue_id": entry["qid"], "queue_name": entry["state"], "error": entry["error"]}
    replies = entry["last_reply"] or {}
    reason = {"quarantine_reason": entry["reason"]} if entry["state"] == "quarantine" else {}
    return {
        "queue_id": entry["qid"],
        "queue_name": entry["state"],
        "arrival_time": int(entry["arrival"]),
        "message_size": entry["size"],
        "sender": entry["sender"],
        "recipients": [{"address": a, **({"delay_reason": replies[a]} if a in replies else {})}
                       for a in entry["recipients"]],
        "next_attempt": None if entry["next_attempt"] is None else int(entry["next_attempt"]),
        "attempts": entry["attempts"],
        "upstream_id": entry["upstream_id"],
        **reason,
    }


def list_queue(root: Path | str, states: Iterable[str] = STATES) -> list[dict[str, Any]]:
    """Every message in the spool (in `states`), oldest first.

    Each entry: qid, state, size (message bytes), arrival (epoch seconds),
    sender, recipients (those still to deliver), next_attempt (deferred only,
    epoch seconds), attempts, last_reply ({recipient: reply}), upstream_id,
    reason (why it was quarantined, else None), and error (corrupt files:
    why; the other fields are then None).
    """
    files = SpoolFiles(root)
    out = []
    for state in states:
        for qid, mtime in files.scan(state):
            entry: dict[str, Any] = {
                "qid": qid, "state": state, "size": None, "arrival": None, "sender": None,
                "recipients": None, "next_attempt": mtime if state == "deferred" else None,
                "attempts": 0, "last_reply": {}, "upstream_id": None, "reason": None, "error": None,
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
                         last_reply=status.get("last_reply", {}), upstream_id=env.upstream_id,
                         reason=env.quarantine)
            out.append(entry)
    out.sort(key=lambda e: e["qid"])
    return out


def _inspect(root: Path | str, qid: str, *, whole: bool = False) -> dict[str, Any]:
    """What show and show_json print: state, then envelope, message size,
    next attempt (deferred only), status and header, or the error of a
    corrupt file; `whole`: also the whole message ("message", checked against
    its checksum first).  KeyError if there is no such message, ValueError for a
    malformed id."""
    if not valid_qid(qid):
        raise ValueError(f"invalid queue id {qid!r}")
    files = SpoolFiles(root)
    for _ in range(_TRIES):
        state = files.locate(qid)
        if state is None:
            raise KeyError(qid)
        path = files.path(qid, state)
        try:
            env, body_len, _ = read_queue_file(path, check_message=whole)
            with open(path, "rb") as f:
                head = f.read(body_len if whole else min(body_len, HEADER_READ_LIMIT))
            next_attempt = os.stat(path).st_mtime if state == "deferred" else None
        except FileNotFoundError:
            continue                             # moved meanwhile: look again
        except CorruptFile as e:
            return {"state": state, "error": e.reason}
        end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0),
                  default=len(head))
        m = {"state": state, "error": None, "envelope": env, "size": body_len,
             "next_attempt": next_attempt, "status": files.read_status(qid),
             "header": head[:end].decode("utf-8", "replace").replace("\r\n", "\n")}
        if whole:
            m["message"] = head.decode("utf-8", "replace").replace("\r\n", "\n")
        return m
    raise KeyError(qid)


def show(root: Path | str, qid: str, *, whole: bool = False) -> str:
    """Envelope, delivery status and header of one message, as text; `whole`:
    the whole message instead of its header.

    KeyError if there is no such message, ValueError for a malformed id.
    """
    m = _inspect(root, qid, whole=whole)
    lines = [f"queue id: {qid}", f"state: {m['state']}"]
    if m["error"]:
        lines.append(f"corrupt: {m['error']}")
        return "\n".join(lines) + "\n"
    env = m["envelope"]
    if env.quarantine:
        lines.append(f"quarantine reason: {env.quarantine}")
    if m["next_attempt"] is not None:
        lines.append(f"next attempt: {_fmt_time(m['next_attempt'])}")
    lines.append(f"arrival: {_fmt_time(env.received_at)}")
    lines.append(f"size: {m['size']}")
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
        lines.append(f"client: {client.name or 'unknown'}[{client.addr}] helo={client.helo or '-'} "
                     f"login={client.login or '-'} tls={client.tls or 'none'}")
    if env.header_edits:
        edits = env.header_edits
        lines.append("header edits: " + "; ".join([*(f"add {n}" for n, _ in edits.add),
                                                   *(f"remove {n}" for n in sorted(edits.remove)),
                                                   *(f"remove {n} #{i + 1}" for n, i in sorted(edits.drop))]))
    status = m["status"]
    if status:
        lines.append(f"attempts: {status.get('attempts', 0)}")
        if isinstance(status.get("pending"), list):
            lines.append("pending: " + ", ".join(f"<{a}>" for a in status["pending"]))
        for addr, reply in (status.get("last_reply") or {}).items():
            lines.append(f"last reply for <{addr}>: {reply}")
    lines.append("")
    lines.append(m["message"] if whole else m["header"])
    return "\n".join(lines) + "\n"


def show_json(root: Path | str, qid: str, *, whole: bool = False) -> dict[str, Any]:
    """One message as ``show --json`` prints it.

    queue_id; queue_name (the state); message_size (bytes); next_attempt
    (epoch seconds, deferred only, else null); envelope (as stored in the
    queue file: sender, recipients [{address, notify, orcpt}], ret, envid,
    body, smtputf8, upstream_id, received_at, notice, client, and
    quarantine, why a check quarantined it, only when it did); status (the
    daemon's delivery status: pending, attempts, first_attempt, last_attempt,
    last_reply {address: reply}, failed, expired; null before the first
    attempt); header (the message header, as text); `whole` (``quarantine
    show``): also quarantine_reason and message (the whole message, as text).
    A corrupt file has only queue_id, queue_name and error.  KeyError if there
    is no such message, ValueError for a malformed id.
    """
    m = _inspect(root, qid, whole=whole)
    if m["error"]:
        return {"queue_id": qid, "queue_name": m["state"], "error": m["error"]}
    out = {"queue_id": qid, "queue_name": m["state"], "message_size": m["size"],
           "next_attempt": m["next_attempt"], "envelope": m["envelope"].to_json(),
           "status": m["status"], "header": m["header"]}
    if whole:
        out.update(quarantine_reason=m["envelope"].quarantine, message=m["message"])
    return out


def _each(root: Path | str, qids: Iterable[str], attempt) -> dict[str, str]:
    """``attempt(files, qid)`` for each queue id, its result per qid.  An attempt answers
    None when the message moved under it (the running daemon picked it up or put it
    back): it is tried again, ``_TRIES`` times at most, then the result is "not found".
    An id that is not a queue id is "invalid queue id", never looked for."""
    files = SpoolFiles(root)
    results = {}
    for qid in qids:
        if not valid_qid(qid):
            results[qid] = "invalid queue id"
            continue
        result = None
        for _ in range(_TRIES):
            result = attempt(files, qid)
            if result is not None:
                break
        results[qid] = result or "not found"
    return results


def hold(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Put messages on hold.  Result per qid: "held", "already held",
    "hold requested" (in delivery: done when the attempt ends), "corrupt",
    "not found" or "invalid queue id"."""
    def attempt(files: SpoolFiles, qid: str) -> str | None:
        if files.move(qid, "incoming", "hold") or files.move(qid, "deferred", "hold"):
            files.request(f"{qid}.held")
            return "held"
        state = files.locate(qid)
        if state == "active":
            files.request(f"{qid}.hold")
            return "hold requested"
        if state in ("hold", "quarantine", "corrupt", None):
            return {"hold": "already held", "quarantine": QUARANTINED,
                    "corrupt": "corrupt"}.get(state, "not found")
        return None
    return _each(root, qids, attempt)


def release(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Release held messages: hold/ -> deferred/, due now, and tell the daemon.
    Result per qid: "released", "hold request cancelled", "not held", the
    quarantined note (quarantine/ is :func:`quarantine_release`'s), "invalid queue id"."""
    def attempt(files: SpoolFiles, qid: str) -> str:
        if files.move(qid, "hold", "deferred"):
            files.set_next_attempt(qid, "deferred", time.time())
            files.request(f"{qid}.release")
            return "released"
        if f"{qid}.hold" in files.requests():
            files.clear_request(f"{qid}.hold")
            return "hold request cancelled"
        if files.locate(qid) == "quarantine":
            return QUARANTINED
        return "not held"
    return _each(root, qids, attempt)


def delete(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Delete messages without a bounce.  Result per qid: "deleted",
    "delete requested" (in delivery: done when the attempt ends), "not found"
    or "invalid queue id"."""
    def attempt(files: SpoolFiles, qid: str) -> str | None:
        if any(files.remove(qid, state) for state in ("incoming", "deferred", "hold", "quarantine",
                                                      "corrupt")):
            files.clear_request(f"{qid}.hold")
            files.request(f"{qid}.deleted")
            return "deleted"
        state = files.locate(qid)
        if state == "active":
            files.request(f"{qid}.delete")
            return "delete requested"
        return "not found" if state is None else None
    return _each(root, qids, attempt)


def flush(root: Path | str) -> int:
    """Make every deferred message due now and poke the daemon; the number made due."""
    files = SpoolFiles(root)
    now = time.time()
    count = sum(1 for qid, _ in list(files.scan("deferred"))
                if files.set_next_attempt(qid, "deferred", now))
    files.request("flush")
    return count


def flush_messages(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Make these deferred messages due now and ask the daemon to schedule them
    (``postqueue -i``).  Result per qid: "made due now", "in delivery"
    (incoming or active: nothing to wait for), "on hold", the quarantined
    note, "corrupt", "not found" or "invalid queue id"."""
    now = time.time()

    def attempt(files: SpoolFiles, qid: str) -> str | None:
        if files.set_next_attempt(qid, "deferred", now):
            files.request(f"{qid}.flush")
            return "made due now"
        state = files.locate(qid)
        if state == "deferred":                 # it was in active a moment ago
            return None
        return {"incoming": "in delivery", "active": "in delivery", "hold": "on hold",
                "quarantine": QUARANTINED, "corrupt": "corrupt", None: "not found"}[state]
    return _each(root, qids, attempt)


# -- quarantine ---------------------------------------------------------------------

def quarantine_main(root: Path | str, action: str, qids: list[str], out: TextIO | None = None,
                    *, as_json: bool = False) -> int:
    """Run one ``smarthost quarantine`` action (list, show, release, delete) and print
    its result, as :func:`main` does for ``queue``: QIDs are queue ids or upstream ids,
    in any case, ALL is every quarantined message.  list: the quarantined messages
    (:func:`format_list`, or :func:`list_json` with ``as_json``); show: envelope,
    reason, header edits and the whole message of each (AdminError for one that is
    not quarantined); release and delete: one line per message.  Returns 0, or 1 if
    some named message was not found or not changed."""
    out = out or sys.stdout
    try:
        files = SpoolFiles(root)
    except FileNotFoundError as e:
        raise AdminError(str(e)) from None
    if action == "list":
        entries = list_queue(root, ("quarantine",))
        if as_json:
            for e in entries:
                print(json.dumps(list_json(e), ensure_ascii=False), file=out)
        else:
            print(format_list(entries, empty="Quarantine is empty"), file=out, end="")
        return 0
    if action not in ("show", "release", "delete"):
        raise AdminError(f"unknown action {action!r}")
    targets = _targets(files, f"quarantine {action}", qids)
    if action == "show":
        for given, qid in targets:
            if qid is None:
                raise AdminError(f"invalid queue id {given!r}" if not valid_qid(given)
                                 else f"{given}: no such message")
            state = files.locate(qid)
            if given is not None and state != "quarantine":
                raise AdminError(f"{qid}: not quarantined ({state or 'gone'})")
        for given, qid in targets:
            try:
                if as_json:
                    print(json.dumps(show_json(root, qid, whole=True), ensure_ascii=False), file=out)
                else:
                    print(show(root, qid, whole=True), file=out)
            except KeyError:
                if given is not None:
                    raise AdminError(f"{given}: no such message") from None
        return 0
    func = quarantine_release if action == "release" else quarantine_delete
    ok = {"released"} if action == "release" else {"deleted"}
    results = func(root, [qid for _, qid in targets if qid is not None])
    return _report(targets, results, ok, out)


def _not_quarantined(files: SpoolFiles, qid: str) -> str:
    state = files.locate(qid)
    return "not found" if state is None else f"not quarantined ({state})"


def quarantine_release(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Release quarantined messages: quarantine/ -> deferred/, due now, and tell the
    daemon (it logs the release and delivers the message at once, with its header
    edits; the checks do not run again).  Result per qid: "released", "not
    quarantined (STATE)", "not found" or "invalid queue id"."""
    def attempt(files: SpoolFiles, qid: str) -> str:
        if files.move(qid, "quarantine", "deferred"):
            files.set_next_attempt(qid, "deferred", time.time())
            files.request(f"{qid}.quarantine-release")
            return "released"
        return _not_quarantined(files, qid)
    return _each(root, qids, attempt)


def quarantine_delete(root: Path | str, qids: Iterable[str]) -> dict[str, str]:
    """Delete quarantined messages, without a bounce; the daemon logs each.  Result per
    qid: "deleted", "not quarantined (STATE)", "not found" or "invalid queue id"."""
    def attempt(files: SpoolFiles, qid: str) -> str:
        if files.remove(qid, "quarantine"):
            files.request(f"{qid}.quarantine-deleted")
            return "deleted"
        return _not_quarantined(files, qid)
    return _each(root, qids, attempt)


def _fmt_time(t: float | None) -> str:
    if not t:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
