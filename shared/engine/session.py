"""One SMTP session as the engine sees it: checks at each phase, then the sink.

:class:`EngineSession` is the handler the Twisted adapter
(:mod:`shared.transport.server`) calls for each decision event.  For every
phase it builds a frozen :class:`~shared.checks.Request`, runs the configured
checks, and maps the verdict to a reply; what passes goes to the tier's *sink*:

- the edge's sink proxies each command to the filter inside the client's
  transaction (:mod:`shared.engine.proxy`), so the filter's verdict is the
  client's answer;
- the filter's sink writes the message to its durable queue
  (:mod:`shared.engine.queued`);
- the domain tier's sink delivers into Maildir (:mod:`domain.maildir`).

A sink makes one sink session per SMTP session, ``sink.session(port)``, where
``port`` (:class:`SinkPort`) is all it may use of the session: pause and resume
reading from the client, the client's identity and TLS, the current queue id.
A sink session implements::

    begin(txn) -> Reply | None | Deferred      after MAIL passed the checks
    rcpt(txn, recipient) -> Reply | None | Deferred
    data_start(txn) -> Reply | None | Deferred
    write(chunk: bytes) -> None                 message bytes, Received header first
    body_reader(txn) -> (() -> Deferred[bytes]) | None
                                                at end of data, before the checks: the
                                                message as written, read off the reactor
                                                (None: the sink keeps no copy)
    data_end(txn) -> Reply | Deferred           the final answer (250 only when durable);
                                                applies txn.edits, the checks' header edits
    abort(txn) -> None                          transaction abandoned
    close() -> None                             session over

Checks' results are kept per session until MAIL and per transaction after it
(``Request.results``); header edits asked for at ``data`` (the DATA command)
are written right below our Received field, those asked for at
``end_of_data`` are handed to the sink in ``txn.edits``.

TRUST: the peer's address comes from the socket, or from XCLIENT when the peer
is a configured upstream host (the core refuses XCLIENT from anyone else).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType

from twisted.internet import defer
from twisted.logger import Logger

from shared.auth.sasl import Challenge, ClientContext, Success
from shared.checks.core import CONTINUE, Action, Chain, Request, Verdict
from shared.checks.relay import RelayControl
from shared.engine.received import HeaderScanner, received_header, with_protocol
from shared.envelope import ClientInfo, Envelope, Recipient
from shared.ids import new_queue_id
from shared.message import HeaderEdits, MessageView, ReadOnce
from shared.smtp import events as ev
from shared.smtp.reply import TOO_MANY_HOPS, Reply
from shared.smtp.server import AUTH_OK, challenge
from shared.transport.server import CloseAfter

log = Logger(namespace="smarthost.session")

_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")


@dataclass
class Transaction:
    queue_id: str
    envelope: Envelope
    rcpt_count: int = 0
    size: int = 0
    scanner: HeaderScanner = field(default_factory=HeaderScanner)
    in_data: bool = False
    results: dict[str, Verdict] = field(default_factory=dict)
    edits: HeaderEdits = HeaderEdits()      # end_of_data checks' edits, for the sink to apply
    quarantine: str | None = None           # an end_of_data check's reason to keep it from delivery


class SinkPort:
    """What a sink session may use of the SMTP session it serves."""

    __slots__ = ("_engine",)

    def __init__(self, engine: "EngineSession") -> None:
        self._engine = engine

    def pause(self) -> None:
        """Stop reading from the client (the sink's own buffer is full)."""
        self._engine.protocol.pause_input()

    def resume(self) -> None:
        self._engine.protocol.resume_input()

    @property
    def client(self) -> ClientInfo:
        """The original client as known now (XCLIENT from a trusted upstream included)."""
        return self._engine.client

    @property
    def peer(self) -> tuple[str, int | None]:
        """The address and port of the connected peer (an upstream tier behind the edge)."""
        return self._engine.protocol.peer_host, self._engine.protocol.peer_port

    @property
    def tls(self) -> str | None:
        """This connection's TLS protocol and cipher, or None."""
        return self._engine.protocol.tls_text()

    @property
    def queue_id(self) -> str | None:
        txn = self._engine.txn
        return txn.queue_id if txn else None


@dataclass(frozen=True)
class EngineConfig:
    hostname: str
    max_received_headers: int = 50
    tier: str = "smtp"


class EngineSession:
    def __init__(self, protocol, *, config: EngineConfig, chain: Chain, relay: RelayControl,
                 sink, reactor, resolver=None, listener: str | None = None) -> None:
        self.protocol = protocol
        self.resolver = resolver
        self.config = config
        self.chain = chain
        self.relay = relay
        self.reactor = reactor
        self.listener = listener
        self.client = ClientInfo(addr=protocol.peer_host, port=protocol.peer_port)
        self.sink_session = sink.session(SinkPort(self))
        self.txn: Transaction | None = None
        self.upstream_id: str | None = None
        self.session_id = new_queue_id()
        self.xclient_set = False
        self.trusted_upstream = protocol.upstream
        self.results: dict[str, Verdict] = {}      # before MAIL: connect, helo, starttls, auth checks
        self.client_certificate: str | None = None  # its fingerprint, when it counts (Request field)
        self._exchange = None                      # (mechanism, shared.auth.sasl.Exchange) during AUTH

    @property
    def in_transaction(self) -> bool:
        return self.txn is not None

    @property
    def vouched_for(self) -> bool:
        """Whether a check vouched for the client before MAIL: a result whose ``allowlisted``
        is true (the dnsbl check's, :class:`shared.checks.dnsbl.DnsblResult`).  The
        adapter's pregreet wait ends for such a client."""
        return any(getattr(v.result, "allowlisted", False) for v in self.results.values())

    # -- helpers ---------------------------------------------------------------
    def _request(self, phase: str, **kw) -> Request:
        c = self.client
        results = self.txn.results if self.txn is not None else self.results
        return Request(phase=phase, client_address=c.addr or "", client_port=c.port,
                       client_name=c.name, helo=c.helo, protocol=c.proto, tls=c.tls,
                       login=c.login, results=MappingProxyType(results), listener=self.listener,
                       client_certificate=self.client_certificate, **kw)

    def _record(self, name: str, verdict: Verdict) -> None:
        results = self.txn.results if self.txn is not None else self.results
        results.pop(name, None)              # in the order they last ran: the log line reads so
        results[name] = verdict

    def _log(self, fmt: str, **kw) -> None:
        # The ids are fields, never part of the format: the set of formats stays
        # small (the log observer keeps each one parsed).
        qid = self.txn.queue_id if self.txn else self.session_id
        if self.upstream_id:
            log.info("{qid}: " + fmt + " upstream={upstream}", qid=qid,
                     upstream=self.upstream_id, **kw)
        else:
            log.info("{qid}: " + fmt, qid=qid, **kw)

    @staticmethod
    def _reply_for(verdict: Verdict):
        """Verdict -> what the adapter gives the core."""
        if verdict.action is Action.DISCONNECT:
            return CloseAfter(verdict.reply or Reply(421, "4.7.0", "Closing connection"))
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            return verdict.reply
        return verdict.reply if verdict.action is Action.ACCEPT else None

    def _checks(self, request: Request, then):
        """The phase's checks, then `then(verdict)`: a plain call when the phase has none."""
        if not self.chain.has(request.phase):
            return then(CONTINUE)
        return self.chain.run(request, self._record).addCallback(then)

    def _run(self, request: Request):
        """Run the phase's checks; Deferred of a Verdict (skips the Deferred when none)."""
        if not self.chain.has(request.phase):
            return defer.succeed(Verdict(Action.CONTINUE))
        return self.chain.run(request, self._record)

    @staticmethod
    def _found(txn: Transaction) -> str:
        """What the transaction's checks found, for the message's log line: each result's
        ``log`` text ("spf=pass", "score=1.2/15 action=no action"), in the order they ran."""
        return ", ".join(text for v in txn.results.values() if (text := getattr(v.result, "log", None)))

    def _edits(self, phase: str) -> HeaderEdits:
        """The header edits the transaction's `phase` checks asked for, in check order."""
        edits = HeaderEdits()
        for name, verdict in self.txn.results.items():
            if verdict.edits and self.chain.runs(name, phase):
                edits = edits.then(verdict.edits)
        return edits

    # -- phases ----------------------------------------------------------------
    def on_connect(self):
        if self.resolver is not None and not self.trusted_upstream:
            d = self.resolver.lookup(self.client.addr)
            d.addCallback(self._named)
        else:
            d = defer.succeed(None)
        d.addCallback(lambda _: self._log("connect from {name}[{addr}]", name=self.client.name or "unknown",
                                          addr=self.client.addr))
        d.addCallback(lambda _: self._run(self._request("connect")))
        return d.addCallback(lambda v: self._reply_for(v) if v.final and v.action is not Action.ACCEPT else None)

    def _named(self, reverse) -> None:
        """The verified reverse name (None unless the PTR name resolves back to the address)."""
        self.client.name = reverse.name
        if reverse.status != "verified" and reverse.status != "none":
            self._log("reverse name of {addr}: {status} (ptr {ptr})", addr=self.client.addr,
                      status=reverse.status, ptr=reverse.ptr or "-")

    def on_hello(self, e: ev.Hello):
        self._abandon()
        if not self.xclient_set:     # XCLIENT's HELO, PROTO and TLS outrank the upstream's own
            self.client.helo = e.domain
            self.client.proto = "ESMTP" if e.verb == "EHLO" else "SMTP"
            if self.client.tls is None and self.protocol.conn.tls_active:
                self.client.tls = self.protocol.tls_text()     # the handshake is done by now
                if self.client.tls:
                    self._tls_established()
        d = self._run(self._request("helo"))
        return d.addCallback(lambda v: self._reply_for(v) if v.action is not Action.ACCEPT else None)

    def _tls_established(self) -> None:
        """Log the client's TLS (and its certificate, if it presented one) and keep the
        certificate's fingerprint for the checks when it counts."""
        cert = self.protocol.tls_client_certificate()
        who = dict(name=self.client.name or "unknown", addr=self.client.addr, tls=self.client.tls)
        if cert is None:
            self._log("TLS connection from {name}[{addr}]: {tls}", **who)
            return
        self.client_certificate = cert.fingerprint if cert.counts else None
        self._log("TLS connection from {name}[{addr}]: {tls}; client certificate {cert}", cert=str(cert), **who)

    def authenticated(self, login: str, mechanism: str):
        """The client proved to be `login` with SASL `mechanism` (the SMTP AUTH exchange
        itself is the server core's): run the ``auth`` checks, which may still refuse
        (a per-user limit, a listener that takes no AUTH).  A Deferred of the Verdict;
        unless it refuses, the session is `login`'s from now on (Received "with
        ESMTPA", XCLIENT LOGIN downstream, the ``authenticated`` relay permit)."""
        req = replace(self._request("auth"), login=login, mechanism=mechanism)

        def checked(v: Verdict) -> Verdict:
            if v.final and v.action is not Action.ACCEPT:
                self._log("reject: AUTH {mech} as {login}: {reply}", mech=mechanism, login=login,
                          reply=str(v.reply))
                return v
            self.client.login = login
            return v
        return self._run(req).addCallback(checked)

    # -- AUTH: the core runs the SMTP side, the listener's authenticator the mechanism --
    def on_auth_start(self, e: ev.AuthStart):
        return _then(self.protocol.config.auth.guard.blocked(self.client.addr or ""),
                     lambda blocked: self._auth_blocked() if blocked == "client" else self._auth_begin(e))

    def _auth_begin(self, e: ev.AuthStart):
        auth, p = self.protocol.config.auth, self.protocol
        ctx = ClientContext(remote_ip=self.client.addr or "", remote_port=self.client.port,
                            local_ip=p.local_host, local_port=p.local_port, secured=p.conn.tls_active,
                            session_id=self.session_id)
        self._exchange = (e.mechanism, auth.backend.start(e.mechanism, ctx))
        return self._auth_step(e.initial)

    def on_auth_response(self, e: ev.AuthResponse):
        return self._auth_step(e.data)

    def on_auth_aborted(self, e: ev.AuthAborted) -> None:
        mechanism = self._end_exchange()
        self._log("auth aborted: client={name}[{addr}] mechanism={mech}: {reply}",
                  name=self.client.name or "unknown", addr=self.client.addr, mech=mechanism, reply=str(e.reply))

    def _end_exchange(self) -> str | None:
        if self._exchange is None:
            return None
        mechanism, exchange = self._exchange
        self._exchange = None
        exchange.cancel()
        return mechanism

    def _auth_step(self, data: bytes | None):
        mechanism, exchange = self._exchange
        return exchange.step(data).addCallback(self._auth_answer, mechanism)

    def _auth_answer(self, step, mechanism: str):
        if isinstance(step, Challenge):
            return challenge(step.data)
        self._exchange = None
        if isinstance(step, Success):
            blocked = self.protocol.config.auth.guard.blocked(self.client.addr or "", step.login)
            return _then(blocked, lambda what: self._auth_success(step.login, mechanism, what))
        return self._auth_failed(step, mechanism)

    def _auth_success(self, login: str, mechanism: str, blocked: str | None):
        if blocked == "user":          # even the right password, while the user name is blocked
            return self._auth_failed(_Refused(f"user {login} is blocked after too many failures", False,
                                              login), mechanism)
        return self.authenticated(login, mechanism).addCallback(self._authenticated, mechanism)

    def _auth_failed(self, step, mechanism: str):
        self._log("auth failed: client={name}[{addr}] mechanism={mech} user=<{user}> reason={reason}",
                  name=self.client.name or "unknown", addr=self.client.addr, mech=mechanism,
                  user=step.user or "", reason=step.reason)
        if step.temporary:
            return AUTH_TEMPFAIL
        return _then(self.protocol.config.auth.guard.failed(self.client.addr or "", step.user),
                     lambda blocked: self._auth_blocked() if blocked == "client" else AUTH_FAILED)

    def _authenticated(self, verdict: Verdict, mechanism: str):
        if verdict.final and verdict.action is not Action.ACCEPT:
            return self._reply_for(verdict)
        self._log("auth: client={name}[{addr}] mechanism={mech} user=<{user}>", name=self.client.name or "unknown",
                  addr=self.client.addr, mech=mechanism, user=self.client.login)
        return AUTH_OK

    def _auth_blocked(self) -> CloseAfter:
        return CloseAfter(Reply(421, "4.7.0", f"{self.config.hostname} Error: too many failed "
                                              f"authentications from {self.client.addr}; try again later"))

    def on_xclient(self, e: ev.XClient):
        self._abandon()
        a = e.attrs
        def val(key):
            v = a.get(key)
            return None if v is None or v in _UNAVAILABLE else v
        if "ADDR" in a:
            addr = val("ADDR")
            self.client.addr = addr[5:] if addr and addr.upper().startswith("IPV6:") else addr
        if "PORT" in a:
            p = val("PORT")
            self.client.port = int(p) if p and p.isdigit() else None
        for key, attr in (("NAME", "name"), ("HELO", "helo"), ("PROTO", "proto"), ("LOGIN", "login"),
                          ("TLS", "tls")):
            if key in a:
                setattr(self.client, attr, val(key))
        self.xclient_set = True
        self.upstream_id = None        # a new client: its XFORWARD IDENT follows, not the last one's
        self.results = {}              # a new client: the last one's check results are not its
        self.client_certificate = None  # the connection's certificate is the upstream's, not the client's
        self._log("xclient from {peer}: client={name}[{addr}] helo={helo} tls={tls}", peer=self.protocol.peer_host,
                  name=self.client.name or "unknown", addr=self.client.addr, helo=self.client.helo,
                  tls=self.client.tls or "none")
        return None

    def on_xforward(self, e: ev.XForward):
        ident = e.attrs.get("IDENT")
        if ident and ident not in _UNAVAILABLE:
            self.upstream_id = ident
        return None

    def on_mail_from(self, e: ev.MailFrom):
        self.txn = Transaction(new_queue_id(), Envelope(
            sender=e.sender, recipients=[], ret=e.ret, envid=e.envid, body=e.body,
            smtputf8=e.smtputf8, client=_copy_client(self.client), upstream_id=self.upstream_id),
            results=dict(self.results))
        req = self._request("mail", queue_id=self.txn.queue_id, sender=e.sender, size=e.size)

        def checked(v: Verdict):
            if v.final and v.action is not Action.ACCEPT:
                self._log("reject: MAIL from <{sender}>: {reply}", sender=e.sender, reply=str(v.reply))
                self._end_txn()
                return self._reply_for(v)
            return _call(self.sink_session.begin, self.txn, then=begun)

        def begun(answer):
            if isinstance(answer, Reply) and not answer.positive:
                self._log("reject: MAIL from <{sender}>: {reply}", sender=e.sender, reply=str(answer))
                self._end_txn()
            return answer
        return self._abandon_on_failure(self._checks(req, checked))

    def on_rcpt_to(self, e: ev.RcptTo):
        txn = self.txn
        req = self._request("rcpt", queue_id=txn.queue_id, sender=txn.envelope.sender,
                            recipient=e.recipient, recipients=tuple(r.address for r in txn.envelope.recipients))
        relay_verdict = self.relay(req)
        if relay_verdict.final:
            self._log("reject: RCPT from {name}[{addr}]: {reply}; from=<{sender}> to=<{rcpt}>",
                      name=self.client.name or "unknown", addr=self.client.addr,
                      reply=str(relay_verdict.reply), sender=txn.envelope.sender, rcpt=e.recipient)
            return relay_verdict.reply
        recipient = Recipient(e.recipient, e.notify, e.orcpt)

        def checked(v: Verdict):
            if v.final and v.action is not Action.ACCEPT:
                self._log("reject: RCPT to=<{rcpt}>: {reply}", rcpt=e.recipient, reply=str(v.reply))
                return self._reply_for(v)
            return _call(self.sink_session.rcpt, txn, recipient, then=answered)

        def answered(answer):
            if answer is None or (isinstance(answer, Reply) and answer.positive):
                txn.envelope.recipients.append(recipient)
            else:
                self._log("reject: RCPT to=<{rcpt}>: {reply}", rcpt=e.recipient, reply=str(answer))
            return answer
        return self._checks(req, checked)

    def on_data_start(self, e: ev.DataStart):
        txn = self.txn

        def checked(v: Verdict):
            if v.final and v.action is not Action.ACCEPT:
                self._log("reject: DATA: {reply}", reply=str(v.reply))
                return self._reply_for(v)
            return _call(self.sink_session.data_start, txn, then=started)

        def started(answer):
            if answer is None or (isinstance(answer, Reply) and answer.positive):
                txn.in_data = True
                c = txn.envelope.client
                self.sink_session.write(received_header(
                    helo=c.helo, client_name=c.name, client_addr=c.addr,
                    hostname=self.config.hostname,
                    protocol=with_protocol(c.proto != "SMTP", self.protocol.conn.tls_active,
                                           bool(c.login), txn.envelope.smtputf8),
                    queue_id=txn.queue_id, recipients=[r.address for r in txn.envelope.recipients],
                    now=self.reactor.seconds(), tls=c.tls))
                if self.chain.has("data"):
                    added = self._edits("data")
                    if added.add:                     # below our Received field, above the message
                        self.sink_session.write(added.prefix())
                    if added.removes:
                        txn.edits = HeaderEdits(remove=added.remove, drop=added.drop)
            return answer
        if not self.chain.has("data"):          # the usual case: no Request to build
            return checked(CONTINUE)
        req = self._request("data", queue_id=txn.queue_id, sender=txn.envelope.sender,
                            recipients=tuple(r.address for r in txn.envelope.recipients))
        return self.chain.run(req, self._record).addCallback(checked)

    def on_data_chunk(self, e: ev.DataChunk) -> None:
        txn = self.txn
        txn.size += len(e.data)
        if not txn.scanner.done:
            txn.scanner.feed(e.data)
        self.sink_session.write(e.data)

    def on_data_end(self, e: ev.DataEnd):
        txn = self.txn
        count = txn.scanner.received_count()
        if self.trusted_upstream:      # the pipeline's own hops were counted where mail entered
            count -= txn.scanner.pipeline_hops()
        if count > self.config.max_received_headers:
            self._log("reject: END-OF-MESSAGE: {reply} ({n} Received headers)", reply=str(TOO_MANY_HOPS), n=count)
            self._abandon()
            return self._after_txn(TOO_MANY_HOPS)
        req = None
        if self.chain.has("end_of_data"):
            req = self._request("end_of_data", queue_id=txn.queue_id, sender=txn.envelope.sender,
                                recipients=tuple(r.address for r in txn.envelope.recipients),
                                size=txn.size, received_count=count,
                                message=MessageView(bytes(txn.scanner.buf[1:]), txn.size,
                                                    _shared_body(self.sink_session.body_reader(txn))))

        def checked(v: Verdict):
            if v.final and v.action is not Action.ACCEPT:
                found = self._found(txn)
                self._log("reject: END-OF-MESSAGE: {reply}; from=<{sender}>" + (", {found}" if found else ""),
                          reply=str(v.reply), sender=txn.envelope.sender, found=found)
                self._abandon()
                return self._after_txn(self._reply_for(v))
            if req is not None:
                txn.edits = txn.edits.then(self._edits("end_of_data"))
                txn.quarantine = next((v.quarantine for n, v in txn.results.items()
                                       if v.quarantine and self.chain.runs(n, "end_of_data")), None)
            txn.envelope.received_at = self.reactor.seconds()
            return _call(self.sink_session.data_end, txn, then=done)

        def done(answer):
            login = txn.envelope.client.login
            found = self._found(txn) if req is not None else ""
            self._log("from=<{sender}>, size={size}, nrcpt={n}, message-id={mid}"
                      + (", login=<{login}>" if login else "") + (", {found}" if found else "")
                      + (", quarantine=<{why}>" if txn.quarantine else "") + ": {reply}",
                      sender=txn.envelope.sender, size=txn.size, n=len(txn.envelope.recipients),
                      mid=txn.scanner.message_id() or "-", login=login, found=found,
                      why=txn.quarantine, reply=str(answer))
            self._end_txn()
            return self._after_txn(answer)
        if req is None:
            return self._abandon_on_failure(checked(CONTINUE))
        return self._abandon_on_failure(self.chain.run(req, self._record).addCallback(checked))

    def on_data_aborted(self, e: ev.DataAborted) -> None:
        self._log("reject: END-OF-MESSAGE: {reply}", reply=str(e.reply))
        self._abandon()

    def on_reset(self, e: ev.Reset) -> None:
        self._abandon()

    def on_starttls_request(self, e: ev.StartTLSRequest):
        """STARTTLS: the starttls checks (rate_limits' tls_rate) may refuse it (454 4.7.0);
        the session then goes on in plaintext."""
        def checked(v: Verdict):
            if v.final and v.action is not Action.ACCEPT:
                self._log("reject: STARTTLS from {name}[{addr}]: {reply}", name=self.client.name or "unknown",
                          addr=self.client.addr, reply=str(v.reply))
                return self._reply_for(v)
            return None
        return self._checks(self._request("starttls"), checked)

    def on_starttls(self, e: ev.StartTLS) -> None:
        self._abandon()
        self.client.helo = None

    def on_quit(self, e: ev.Quit) -> None:
        self._abandon()

    def on_too_many_errors(self, e: ev.TooManyErrors) -> None:
        self._log("too many errors from {name}[{addr}]", name=self.client.name or "unknown", addr=self.client.addr)
        self._abandon()

    def on_connection_closed(self, e) -> None:
        self._end_exchange()
        if self.txn is not None:
            self._log("lost connection from {addr} during the transaction", addr=self.client.addr)
        self._abandon()
        self.sink_session.close()
        self._log("disconnect from {name}[{addr}]", name=self.client.name or "unknown", addr=self.client.addr)

    # -- transaction end ---------------------------------------------------------
    def _after_txn(self, answer):
        """After end of data: during a shutdown, answer and then close."""
        if not self.protocol.accepting and answer is not None and not isinstance(answer, CloseAfter):
            return CloseAfter(answer)
        return answer

    def _abandon_on_failure(self, result):
        """A failed answer to MAIL or end of data (a sink's Deferred that errbacks) ends the
        transaction here too: the adapter answers 451 and the core has no transaction any
        more, so neither may the session (a shutdown would wait for it) nor the sink."""
        if isinstance(result, defer.Deferred):
            def failed(failure):
                self._abandon()
                return failure
            result.addErrback(failed)
        return result

    def _end_txn(self) -> None:
        self.txn = None

    def _abandon(self) -> None:
        if self.txn is not None:
            self.sink_session.abort(self.txn)
            self._end_txn()


@dataclass(frozen=True)
class _Refused:
    """A Success turned into a failure (its user name is blocked)."""
    reason: str
    temporary: bool
    user: str | None


def _then(value, fn):
    """`fn(value)`, once `value` has fired if it is a Deferred."""
    if isinstance(value, defer.Deferred):
        return value.addCallback(fn)
    return fn(value)


def _call(fn, *args, then):
    """`then(fn(*args))`, waiting if fn returns a Deferred; an exception becomes a failed Deferred
    (the adapter answers it with 451), never a traceback on the wire."""
    try:
        result = fn(*args)
    except Exception:
        return defer.fail()
    if isinstance(result, defer.Deferred):
        return result.addCallback(then)
    return then(result)


def _copy_client(c: ClientInfo) -> ClientInfo:
    return ClientInfo(addr=c.addr, port=c.port, name=c.name, helo=c.helo, proto=c.proto,
                      login=c.login, tls=c.tls)


def _shared_body(reader):
    """The end-of-data checks' reader of the message: one read, one copy, for all of them."""
    return ReadOnce(reader) if reader is not None else None
