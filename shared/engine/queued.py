"""Queue sink: the filter's way of accepting mail.

The message streams into a new queue file while DATA arrives; at end of data
the envelope and the completion trailer are appended, the file and its
directory entry are fsynced (directory fsyncs shared by concurrent
transactions), and only then is 250 sent.  The queue manager is told at once
and delivers to the next tier with retries.

Header edits the end-of-data checks asked for are kept with the envelope and
applied each time the message is sent (:mod:`shared.queue.delivery`): the queue
file holds the message as received.

A message an end-of-data check asked to quarantine (``txn.quarantine``, the
reason) is committed into quarantine/ instead, just as durably, with the reason
in its envelope; the client gets the same 250 as for any accepted message, the
queue manager is not told, and it waits there for ``smarthost quarantine
release`` (then it is delivered with its header edits, not filtered again) or
``delete``.
"""
from __future__ import annotations

from dataclasses import replace

from twisted.logger import Logger

from shared.smtp.reply import Reply, storage_error

log = Logger(namespace="smarthost.queue")


def _one_line(text: str | None) -> str | None:
    """A check's reason as one printable line (it goes into the log and the listing)."""
    if not text:
        return None
    return "".join(c if c.isprintable() else " " for c in text).strip() or "quarantined"


class QueueSink:
    def __init__(self, spool, manager) -> None:
        self.spool = spool
        self.manager = manager

    def session(self, port) -> "QueueSession":
        return QueueSession(self)


class QueueSession:
    def __init__(self, sink: QueueSink) -> None:
        self.sink = sink
        self.message = None
        self.write_error: OSError | None = None

    def begin(self, txn):
        return None

    def rcpt(self, txn, recipient):
        return None

    def data_start(self, txn):
        try:
            self.message = self.sink.spool.new_message(qid=txn.queue_id)
        except OSError as e:
            log.error("{qid}: cannot create queue file: {err}", qid=txn.queue_id, err=str(e))
            return storage_error(e)
        return None

    def write(self, chunk: bytes) -> None:
        if self.message is not None and self.write_error is None:
            try:
                self.message.write(chunk)
            except OSError as e:          # disk full, I/O error: answered at end of data
                self.write_error = e

    def body_reader(self, txn):
        message = self.message
        if message is None or self.write_error is not None:
            return None
        return message.contents

    def data_end(self, txn):
        message, self.message = self.message, None
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            log.error("{qid}: queue file write failed: {err}", qid=txn.queue_id,
                      err=error.strerror or str(error))
            message.abort()
            return storage_error(error)
        envelope = replace(txn.envelope, header_edits=txn.edits) if txn.edits else txn.envelope
        reason = _one_line(getattr(txn, "quarantine", None))
        if reason:
            envelope = replace(envelope, quarantine=reason)
            d = message.commit(envelope, state="quarantine")
        else:
            d = message.commit(envelope)

        def durable(_):
            if reason:
                log.info("{qid}: quarantined: {reason}", qid=message.qid, reason=reason)
            else:
                self.sink.manager.notify(message.qid, (envelope, message.size), message.body)
            return Reply(250, "2.0.0", f"Ok: queued as {message.qid}")

        def failed(failure):
            # The spool logged the failure (one line for an OSError such as a full disk).
            message.abort()
            return storage_error(failure.value)
        return d.addCallbacks(durable, failed)

    def abort(self, txn) -> None:
        self.write_error = None
        if self.message is not None:
            self.message.abort()
            self.message = None

    def close(self) -> None:
        self.abort(None)
