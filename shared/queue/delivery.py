"""Queue delivery: queued messages sent to the next hop in batches.

:meth:`QueueDelivery.deliver_batch` is the queue manager's delivery function.
It takes a session from the relay client's pool (``shared.transport.pool``),
sends the messages of the batch over it one after the other -- XFORWARD
IDENT (the next hop's log names our queue id), MAIL, RCPT, DATA, the message
-- and gives the session back for the next batch.  Every connection problem
becomes a 451 for the recipients concerned: a message is never lost to a
network error and never bounced for one.

Queue files are opened and read in a thread of the blocking pool, never on
the reactor thread: the open and the first chunk in one job (a message of up
to :data:`BODY_CHUNK` bytes costs one hand-off), then one job per chunk,
started as soon as the chunk before it is in hand, so that the next chunk is
read while the last one is written: one chunk waits, one is being read.  The
next message's open starts when the message before it is begun, so that the
connection never waits for a thread to be free: a batch holds at most one
message opened ahead, closed unsent if the batch stops before it.

The queue's reader checks the message against its checksum and fails the
read that reaches the end of a damaged message
(``shared.queue.store.CheckedBody``).  That chunk is never sent and the
message is never ended: the connection is aborted instead of the final dot,
so the next hop cannot deliver a damaged message.

Header edits that end-of-data checks asked for (``Envelope.header_edits``)
are applied as the message is sent -- the added fields first, then the
message with the removed fields taken out of its header section
(:class:`shared.message.HeaderRemover`) -- so the queue file is never
rewritten.  A message without edits goes as it is stored.

What it trusts: the queue (its envelopes, and with ``content_checked`` that
its messages hold no bare CR or LF).  Of the next hop, only its reply codes.
"""
from __future__ import annotations

import io

from typing import Any, BinaryIO, Callable, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from shared.envelope import Envelope
from shared.logging import debug_enabled
from shared.message import HeaderRemover
from shared.smtp.client import LocalProtocolError, RemoteProtocolError
from shared.smtp.reply import Reply
from shared.transport.client import SMTPClientError
from shared.transport.pool import (NextHopUnavailable, RelayClient, Session, failure_text,
                                   xforward_attributes)

__all__ = ["QueueDelivery", "BODY_CHUNK", "Message"]

# Bytes read from a queue file at a time.  Large, because each read is a hand-off to a
# pool thread and back, which costs about as much CPU as the CRC-32 of 128 KiB (measured:
# 1 MB messages in 64 KiB reads took half as much CPU again as reading on the reactor);
# a message being sent holds at most two chunks (one written, one being read).
BODY_CHUNK = 256 * 1024

# (queue id, envelope, open_body, body_len): open_body() returns a binary file
# positioned at the message, of which body_len bytes are sent; or open_body is the
# message itself, still in memory from its reception (sent without the pool).
Message = tuple[str, Envelope, "Callable[[], BinaryIO] | bytes", int]


class QueueDelivery:
    """Delivers queued messages over sessions of ``relay_client``, reading their
    files in ``pool`` (a :class:`shared.blocking.BlockingPool`: ``pool.run(fn,
    *args)`` gives a Deferred of ``fn(*args)`` run in one of its threads).

    ``content_checked``: the messages hold no bare CR or LF (a queue fed by our
    server core, which refuses them, and bounces built with CRLF), so they are
    sent without counting line ends again (dot-stuffing still applies).  It is
    set on each session a message is sent on.

    Log lines go to the relay client's logger (one per message, at debug level).
    """

    def __init__(self, relay_client: RelayClient, pool: Any, *,
                 content_checked: bool = True) -> None:
        self.relay_client = relay_client
        self.pool = pool
        self.content_checked = content_checked

    def deliver_batch(self, messages: Sequence[Message]) -> Deferred[list[dict[str, Reply]]]:
        """Deliver ``(qid, envelope, open_body, body_len)`` messages, up to
        ``max_messages_per_connection`` per connection.

        ``open_body()`` returns a binary file positioned at the body, of
        which ``body_len`` bytes are sent.  Fires (never fails) with one
        dict per message, in order: recipient address -> the RCPT reply if
        it was not 2xx, else the reply to the end of data.  Connection
        problems give 451s: 4.4.1 if no hop could be used, 4.4.2 for a
        connection lost or timed out mid-batch.
        """
        return Deferred.fromCoroutine(self._deliver_batch(list(messages)))

    async def _deliver_batch(self, messages: list[Message]) -> list[dict[str, Reply]]:
        client = self.relay_client
        log = client.log
        out: list[dict[str, Reply]] = []
        session: Session | None = None
        gone: Reply | None = None          # the connection broke: the rest of the batch waits
        started = client.reactor.seconds()
        # Each message's file is opened (and its first chunk read) while the message before
        # it is sent: the hand-off to the pool costs the connection no time.
        upcoming = _QueueFile(self.pool, *messages[0][2:]) if messages else None
        try:
            for i, (qid, env, _open_body, body_len) in enumerate(messages):
                body, upcoming = upcoming, None
                try:
                    if (session is not None
                            and session.messages_sent >= client.max_messages_per_connection):
                        await session.close()
                        session = None
                    if session is None and gone is None:
                        try:
                            session = await client.take_session()
                        except NextHopUnavailable as exc:
                            gone = exc.reply
                    if session is not None and gone is None and not session.usable:
                        gone = Reply(451, "4.4.2", f"lost connection with {session.relay} "
                                                   "while delivering an earlier message")
                    if gone is not None:
                        result = {r.address: gone for r in env.recipients}
                        relay = session.relay if session is not None else "none"
                    else:
                        relay = session.relay
                        if i + 1 < len(messages):
                            upcoming = _QueueFile(self.pool, *messages[i + 1][2:])
                        try:
                            result = await self._deliver_message(session, qid, env, body, body_len)
                        except Exception:                   # a bug: defer, never lose
                            log.failure("{qid}: delivery to {relay} failed", qid=qid, relay=relay)
                            session.abort()
                            reply = Reply(451, "4.3.0", "local error while delivering")
                            result = {r.address: reply for r in env.recipients}
                finally:
                    if body is not None:
                        await body.close()
                if debug_enabled():
                    self._log_message(qid, env, relay, started, result)
                out.append(result)
        finally:
            if upcoming is not None:
                await upcoming.close()
            if session is not None:
                await client.put_back(session)
        return out

    async def _deliver_message(self, session: Session, qid: str, env: Envelope,
                               body: "_QueueFile", body_len: int) -> dict[str, Reply]:
        relay = session.relay
        rcpts = [r.address for r in env.recipients]

        def everyone(reply: Reply) -> dict[str, Reply]:
            return {a: reply for a in rcpts}

        ascii_only = env.sender.isascii() and all(a.isascii() for a in rcpts)
        if not ascii_only and "SMTPUTF8" not in session.extensions:
            return everyone(Reply(550, "5.6.7",
                                  f"SMTPUTF8 is required, but was not offered by host {relay}"))
        edits = env.header_edits
        prefix = edits.prefix() if edits else b""
        remover = edits.remover() if edits and edits.removes else None
        # The length sent, for SIZE and the next hop's limit.  Removed fields are not
        # counted off (that would take reading the header first): with removals it is an
        # upper estimate, never less than what is sent.  SIZE is "the client's estimate"
        # (RFC 1870); at worst a message that fits only without its removed fields is
        # refused as too big.
        size = body_len + len(prefix)
        limit = session.protocol.conn.max_size
        if limit is not None and size > limit:
            return everyone(Reply(552, "5.3.4", f"message size {size} exceeds size "
                                                f"limit {limit} of server {relay}"))
        try:
            await body.opened()
        except OSError as exc:
            return everyone(Reply(451, "4.3.0", f"cannot open queue file: {exc.strerror or exc}"))
        session.content_checked(self.content_checked)
        result: dict[str, Reply] = {}
        phase = "sending MAIL FROM"
        try:
            mail_reply, rcpt_replies, data_reply = await session.send_envelope(
                env, xforward=xforward_attributes(qid, env.client), size=size)
            if not mail_reply.positive:
                return everyone(mail_reply)
            for address, reply in zip(rcpts, rcpt_replies):
                if not reply.positive:
                    result[address] = reply
            if data_reply is None or data_reply.code != 354:
                fallback = data_reply or Reply(554, "5.5.1", "Error: no valid recipients")
                return {a: result.get(a, fallback) for a in rcpts}
            phase = "sending message body"
            await _send_body(session, body, prefix, remover)
            phase = "sending end of data -- message may be sent more than once"
            final = await session.end_data()
        except _LocalReadError as exc:
            session.abort()                     # no "." for a partial message
            reply = Reply(451, "4.3.0", f"error reading queue file: {exc}")
            return {a: result.get(a, reply) for a in rcpts}
        except (SMTPClientError, ConnectionError, RemoteProtocolError,
                LocalProtocolError) as exc:
            if session.protocol.lost is None:
                session.abort()
            code = "4.5.0" if isinstance(exc, (RemoteProtocolError,
                                               LocalProtocolError)) else "4.4.2"
            reply = Reply(451, code, failure_text(exc, relay, phase))
            return {a: result.get(a, reply) for a in rcpts}
        return {a: result.get(a, final) for a in rcpts}

    def _log_message(self, qid: str, env: Envelope, relay: str, started: float,
                     result: dict[str, Reply]) -> None:
        now = self.relay_client.reactor.seconds()
        delay = max(0.0, now - (env.received_at or started))
        replies = list(result.values())
        if all(r.positive for r in replies):
            status = "sent"
        elif all(r.permanent for r in replies):
            status = "bounced"
        elif all(r.transient for r in replies):
            status = "deferred"
        else:
            status = "partial"
        distinct: dict[Reply, list[str]] = {}
        for address, reply in result.items():
            distinct.setdefault(reply, []).append(address)
        if len(distinct) == 1:
            detail = str(replies[0]) if replies else ""
        else:
            detail = "; ".join(f"{','.join(f'<{a}>' for a in addrs)}: {reply}"
                               for reply, addrs in distinct.items())
        # The queue manager logs the per-recipient outcome; this line is the transport's view.
        self.relay_client.log.debug(
            "{qid}: to={to}, relay={relay}, delay={delay:.2f}, status={status} ({detail})",
            qid=qid, to=",".join(f"<{a}>" for a in result), recipients=list(result),
            relay=relay, delay=delay, status=status, detail=detail,
            replies={a: str(r) for a, r in result.items()})


async def _send_body(session: Session, body: "_QueueFile", prefix: bytes,
                     remover: HeaderRemover | None) -> None:
    """The added fields, then the message (through ``remover`` if fields are removed),
    written as fast as the connection takes it."""
    if prefix:
        session.send_data(prefix)
    while chunk := await body.next():
        session.send_data(remover.feed(chunk) if remover is not None else chunk)
        if not session.is_writable():
            await session.wait_writable()
    if remover is not None:
        session.send_data(remover.flush())


class _QueueFile:
    """A message's queue file, opened and read in ``pool``: the open (with the first
    chunk) starts at once, and each later chunk is read while the one before it is
    written.

    An error reading the first chunk is kept until the sender asks for that chunk,
    after DATA, where an error reading any later chunk is met.  :meth:`close` is
    always called, whatever became of the message.
    """

    def __init__(self, pool: Any, open_body: Callable[[], BinaryIO] | bytes, body_len: int) -> None:
        self.pool = pool
        self.remaining = body_len            # bytes not yet in hand
        self.file: BinaryIO | None = None
        if isinstance(open_body, bytes):     # still in memory from reception: no I/O, no thread
            self.run = _now
            self.opening: Deferred | None = _now(_open, lambda: io.BytesIO(open_body), body_len)
        else:
            self.run = pool.run
            self.opening = pool.run(_open, open_body, body_len)
        self.reading: Deferred[bytes] | None = None     # the next chunk, read or being read

    async def opened(self) -> None:
        """Wait for the open; raises the OSError of a message that cannot be opened."""
        d, self.opening = self.opening, None
        self.file, first, error = await d
        if self.remaining > 0:
            self.reading = fail(error) if error else succeed(first)

    async def next(self) -> bytes:
        """The next chunk, b"" at the end; the one after it is read meanwhile.
        Raises :class:`_LocalReadError`."""
        d, self.reading = self.reading, None
        if d is None:
            return b""
        chunk = await d
        self.remaining -= len(chunk)
        if self.remaining > 0:
            self.reading = self.run(_read, self.file, self.remaining)
        return chunk

    async def close(self) -> None:
        """Close the file once no job is in flight.  The job that reads the last chunk,
        or fails, has closed it already (closing again does nothing)."""
        try:
            if self.opening is not None:
                await self.opened()
            if self.reading is not None:
                d, self.reading = self.reading, None
                await d
        except Exception:
            pass                    # the message is not being sent any more: its outcome is known
        if self.file is not None and self.remaining > 0:
            self.file.close()       # a read-only file: closing does not wait for the disk


class _LocalReadError(Exception):
    """The queue file could not be read to the announced length."""


def _now(fn: Callable[..., Any], *args: Any) -> Deferred:
    """``pool.run``'s contract, run here: for a message held in memory."""
    try:
        return succeed(fn(*args))
    except Exception:
        return fail()


# ---- run in a pool thread --------------------------------------------------

def _open(open_body: Callable[[], BinaryIO],
          body_len: int) -> tuple[BinaryIO, bytes, _LocalReadError | None]:
    """Open the message and read its first chunk: ``(file, chunk, None)``, or
    ``(file, b"", error)`` when the read fails (the file is then closed).  An error
    opening it is raised: the message is not begun."""
    file = open_body()
    if body_len == 0:
        file.close()
        return file, b"", None
    try:
        return file, _read(file, body_len), None
    except _LocalReadError as exc:
        return file, b"", exc


def _read(file: BinaryIO, remaining: int) -> bytes:
    """The next chunk of the ``remaining`` bytes of the message.  Closes the file
    after the last one and when the read fails (:class:`_LocalReadError`)."""
    try:
        chunk = file.read(min(BODY_CHUNK, remaining))
    except OSError as exc:
        file.close()
        raise _LocalReadError(exc.strerror or str(exc)) from exc
    except BaseException:
        file.close()
        raise
    if not chunk:
        file.close()
        raise _LocalReadError(f"file ends {remaining} bytes early")
    if len(chunk) >= remaining:
        file.close()
    return chunk
