"""Before-queue proxy: the edge's sink.

Each client session gets, at its first MAIL, one connection to the next tier
(tried in the configured order), opened with XCLIENT so the next tier sees the
original client.  When the client leaves between transactions the connection
goes back to the relay client, which keeps it briefly for the next client's
session (a new XCLIENT instead of a new connection; see RelayClient.release).
Every MAIL, RCPT, DATA and end of data is forwarded and the
client is answered with the next tier's reply: a greylist 451, a virus 550 or
an unknown-user 550 reaches the original client while it is still connected,
and nothing accepted here can bounce later.  The edge's queue id goes along as
XFORWARD IDENT so the next tier's logs name it.

When the next tier cannot be reached or the connection fails mid-transaction
the client gets 451 4.4.x and will retry: a message is either acknowledged by
the next tier's durable queue or not acknowledged at all.
"""
from __future__ import annotations

from dataclasses import replace

from twisted.logger import Logger
from twisted.python.failure import Failure

from shared.smtp.reply import Reply

log = Logger(namespace="smarthost.proxy")

NEXT_HOP_DOWN = Reply(451, "4.4.1", "Next hop not reachable, try again later")
NEXT_HOP_LOST = Reply(451, "4.4.2", "Lost connection with next hop, try again later")


class ProxySink:
    def __init__(self, relay_client) -> None:
        self.relay_client = relay_client

    def session(self, port) -> "ProxySession":
        return ProxySession(self, port)


class ProxySession:
    def __init__(self, sink: ProxySink, port) -> None:
        self.sink = sink
        self.port = port              # the client's session (shared.engine.session.SinkPort)
        self.upstream = None          # the open next-hop session, if any
        self.opened_by = sink.relay_client   # the relay client it came from (and goes back to)
        self.announced = None         # the ClientInfo its XCLIENT carried
        self.in_data = False
        self.failed = False           # the current transaction's forward connection broke
        self.mail_pending = False     # MAIL not yet sent: it goes with the first RCPT
        self.mail_refused = None      # the next hop's refusal of this transaction's MAIL
        self.held = None              # message bytes waiting to go with the next ones

    def _drop(self) -> None:
        if self.upstream is not None:
            up, self.upstream = self.upstream, None
            up.abort()
        self.port.resume()

    def _failed(self, failure, what: str):
        log.warn("{qid}: next hop failed during {what}: {err}", qid=self._qid, what=what,
                 err=failure.getErrorMessage())
        self._drop()
        self.failed = True
        return NEXT_HOP_LOST

    @property
    def _qid(self) -> str:
        return self.port.queue_id or "-"

    # The handlers below answer with plain values when they can and otherwise
    # with one Deferred chain each (no generator machinery on the per-message path).

    def _open(self):
        """A Deferred of a next-hop session announcing the client's identity now
        (a kept connection told with XCLIENT, or a new one)."""
        up = self.upstream
        if up is not None and up.usable:
            self.upstream = None
            self.opened_by.release(up)       # may serve this very request
        else:
            self._drop()
        self.announced = replace(self.port.client)
        self.opened_by = self.sink.relay_client

        def opened(up):
            self.upstream = up
            # What this session forwards passed our server core, which refuses bare CR and LF.
            up.content_checked()
            return up
        return self.opened_by.open_session(self.announced).addCallback(opened)

    def begin(self, txn):
        """Open the session's next-hop connection, anew when the client's identity
        changed since its XCLIENT (a new EHLO, STARTTLS) or when it broke."""
        self.failed = False
        up = self.upstream
        if up is not None and up.usable and self.announced == self.port.client:
            return self._begin_on(up, txn)

        def unreachable(failure):
            log.warn("{qid}: next hop not reachable: {err}", qid=txn.queue_id,
                     err=str(failure.value))
            self.upstream = None
            return NEXT_HOP_DOWN
        try:
            d = self._open()
        except Exception:
            return unreachable(Failure())
        return d.addCallbacks(lambda up: self._begin_on(up, txn), unreachable)

    def _begin_on(self, up, txn):
        self.mail_refused = None
        self.mail_pending = "PIPELINING" in up.extensions
        if self.mail_pending:
            return None          # MAIL goes out with the first RCPT (see _send_mail)
        try:
            d = self._send_mail(up, txn)
        except Exception:
            return self._failed(Failure(), "MAIL")
        return d.addCallbacks(_refusal, self._failed, errbackArgs=("MAIL",))

    def _send_mail(self, up, txn):
        """XFORWARD IDENT (a no-op unless offered) and MAIL, pipelined; a Deferred of MAIL's reply."""
        env = txn.envelope
        up.xforward({"IDENT": txn.queue_id}).addErrback(lambda f: None)   # MAIL's fate tells
        return up.mail(env.sender, size=None, body=env.body, smtputf8=env.smtputf8,
                       ret=env.ret, envid=env.envid)

    def rcpt(self, txn, recipient):
        """Forward RCPT; with PIPELINING the transaction's MAIL travels with the first
        one, saving a round trip per message, and a refused MAIL is that RCPT's answer
        (as when a server delays its rejections to RCPT)."""
        if self.failed or self.upstream is None:
            return NEXT_HOP_LOST
        if self.mail_refused is not None:
            return self.mail_refused
        up = self.upstream
        try:
            mail = self._send_mail(up, txn) if self.mail_pending else None
            self.mail_pending = False
            pending = up.rcpt(recipient.address, notify=recipient.notify, orcpt=recipient.orcpt)
        except Exception:
            return self._failed(Failure(), "RCPT")
        if mail is None:
            return pending.addCallbacks(_refusal, self._failed, errbackArgs=("RCPT",))

        def mail_answered(mail_reply):
            if not mail_reply.positive:
                self.mail_refused = mail_reply
                return pending.addCallback(lambda _: mail_reply)   # after the 503 that follows
            return pending.addCallback(_refusal)

        def mail_failed(failure):
            pending.addErrback(lambda _: None)     # fails the same way; reported once
            return self._failed(failure, "RCPT")
        return mail.addCallbacks(mail_answered, mail_failed).addErrback(self._failed, "RCPT")

    def data_start(self, txn):
        if self.failed or self.upstream is None:
            return NEXT_HOP_LOST
        try:
            d = self.upstream.data()
        except Exception:
            return self._failed(Failure(), "DATA")

        def answered(reply):
            if reply.code != 354:
                return reply if not reply.positive else Reply(451, "4.3.0", "Next hop refused DATA")
            self.in_data = True
            self.held = b""
            return None
        return d.addCallbacks(answered, self._failed, errbackArgs=("DATA",))

    def write(self, chunk: bytes) -> None:
        """Forward message bytes; a full next-hop buffer pauses reading from the client.

        The first write (our Received header, written as DATA is answered) is held
        and sent with the client's first bytes: one segment fewer per message.
        """
        up = self.upstream
        if not self.in_data or self.failed or up is None:
            return
        if self.held is not None:
            if not self.held:
                self.held = chunk
                return
            chunk, self.held = self.held + chunk, None
        try:
            up.send_data(chunk)
        except Exception:
            self._failed(Failure(), "DATA")
            return
        if not up.is_writable():
            self.port.pause()
            up.wait_writable().addCallbacks(lambda _: self.port.resume(),
                                            lambda f: self._failed(f, "DATA"))

    def body_reader(self, txn):
        """None: the message went on to the next tier as it came; the edge keeps no copy."""
        return None

    def data_end(self, txn):
        self.in_data = False
        self.port.resume()                      # whatever the next hop's buffer, the message is whole
        if self.failed or self.upstream is None:
            return NEXT_HOP_LOST
        unable = _cannot_do(txn)
        if unable:
            # Edits at end of data need the message held (the filter's queue, the domain
            # tier's file), and so does a quarantine (the filter's queue): here it went to
            # the next tier as it came.  Never send it without what a check asked for: no
            # final dot.
            log.error("{qid}: an end_of_data check asked for {what}, which the edge cannot "
                      "do with a message it streams; run that check at the filter",
                      qid=txn.queue_id, what=unable)
            self._drop()
            self.failed = True
            return Reply(451, "4.3.0", "Error: local configuration error, try again later")
        up = self.upstream
        try:
            if self.held:
                up.send_data(self.held)
            self.held = None
            d = up.end_data()
        except Exception:
            return self._failed(Failure(), "end of data")

        def answered(reply):
            log.info("{qid}: to={to}, relay={relay}, status={status} ({reply})", qid=txn.queue_id,
                     to=",".join(f"<{r.address}>" for r in txn.envelope.recipients), relay=up.relay,
                     status="sent" if reply.positive else "rejected", reply=str(reply))
            if reply.positive:
                return Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")
            return reply
        return d.addCallbacks(answered, self._failed, errbackArgs=("end of data",))

    def abort(self, txn) -> None:
        if self.upstream is None:
            return
        if self.in_data:
            # The message must not be completed downstream: drop the connection
            # instead of sending the final dot.
            self.in_data = False
            self._drop()
        else:
            self.upstream.rset().addErrback(lambda f: self._drop())

    def close(self) -> None:
        if self.in_data:
            self._drop()
        elif self.upstream is not None:
            up, self.upstream = self.upstream, None
            self.opened_by.release(up)           # kept for the next client, or closed


def _cannot_do(txn) -> str | None:
    """What an end_of_data check asked of this sink that it cannot do, or None."""
    if getattr(txn, "quarantine", None):
        return "quarantine"
    if txn.edits:
        return "header edits"
    return None


def _refusal(reply: Reply):
    """A next-hop reply as the answer to our client: None (go on) unless it refuses."""
    return reply if not reply.positive else None
