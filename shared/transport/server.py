"""The Twisted adapter of the SMTP server core.

:class:`SMTPServerProtocol` moves bytes between a transport and a
:class:`shared.smtp.server.ServerConnection`, and hands every decision event to
a *handler* (one per session, see :mod:`shared.engine.session`).  It adds what
the sans-I/O core cannot do: timeouts, TLS, back-pressure and connection
limits.

The pump: after input arrives, events are taken from the core until it needs
more data or waits on a decision.  A decision goes to the handler, whose answer
(a Reply, None for the standard positive reply, or a Deferred of either) is
given back to the core, and pumping resumes.  Because the core parses nothing
further while a decision is pending, pipelined replies stay in order whatever
the handler's latency.  Replies are flushed each time the pump stops.

Back-pressure: reading stops while any of three things holds, each tracked by
itself, and resumes only when none does: more than ``max_buffered_input``
octets of input wait (a decision is out), the handler asked (``pause_input``:
its sink is full), or input waits while the output is full.  The protocol is
its transport's streaming producer (Twisted's producer/consumer): the transport
calls :meth:`~SMTPServerProtocol.pauseProducing` when more than its buffer size
(64 KiB in Twisted's TCP transports) waits to be sent, and until
:meth:`~SMTPServerProtocol.resumeProducing` the pump takes no event; so a peer
that pipelines commands and never reads the replies cannot make us buffer them.
(Reading goes on while no input waits: a TLS layer pauses us until its
handshake is done, and needs to read to get it done.)  Within one round,
everything the core holds is answered at once -- by the core itself (NOOP,
HELP, VRFY, errors) or by a handler answering at once -- so command input is
given to the core at most ``COMMAND_SLICE`` octets at a time (the 4096-octet
stream buffer of Postfix's smtpd), and each slice's replies go to the
transport, which may pause us, before the next slice: unsent replies stay under
the transport's buffer plus the answers to one slice.  Message content is given
whole, a read at a time: in DATA all the input (the commands pipelined behind
the end of data in that same read are answered in one round), in a BDAT chunk
the rest of the chunk (``ServerConnection.chunk_ahead``) and at most one slice
beyond it.

SECURITY: everything read from the peer is untrusted and is only ever parsed by
the core; a handler failure becomes 451 4.3.0, never a traceback on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shared.netlist import NetworkList
from shared.smtp import events as ev
from shared.smtp.reply import SHUTTING_DOWN, TEMPFAIL_CHECK, Reply
from shared.smtp.server import NEED_DATA, PAUSED, ServerConfig, ServerConnection, State
from shared.transport.tcp import no_delay, writer
from shared.transport.tls import ClientCertificate, client_certificate

log = Logger(namespace="smarthost.smtpd")


ABORT_GRACE = 5.0      # seconds a closing peer gets to read our last reply
COMMAND_SLICE = 4096   # octets of command input given to the core at a time (see Back-pressure)
PIPELINE_ALLOWANCE = 64 * 1024   # octets the pipeline may add to a message (see upstream_config)


@dataclass(frozen=True)
class CloseAfter:
    """A handler's answer meaning: send this reply, then close the session."""
    reply: Reply


_HANDLER_NAMES = {
    ev.Hello: "on_hello", ev.MailFrom: "on_mail_from", ev.RcptTo: "on_rcpt_to",
    ev.DataStart: "on_data_start", ev.DataChunk: "on_data_chunk", ev.DataEnd: "on_data_end",
    ev.DataAborted: "on_data_aborted", ev.XClient: "on_xclient", ev.XForward: "on_xforward",
    ev.Reset: "on_reset", ev.StartTLSRequest: "on_starttls_request", ev.StartTLS: "on_starttls",
    ev.Quit: "on_quit",
    ev.ConnectionClosed: "on_connection_closed", ev.TooManyErrors: "on_too_many_errors",
    ev.AuthStart: "on_auth_start", ev.AuthResponse: "on_auth_response", ev.AuthAborted: "on_auth_aborted",
}


@implementer(IPushProducer)
class SMTPServerProtocol(protocol.Protocol):
    """One SMTP session on a transport, and that transport's streaming producer."""

    def __init__(self, factory: "SMTPServerFactory") -> None:
        self.factory = factory
        self.reactor = factory.reactor
        self.config: ListenerConfig | None = None     # the listener's settings when the session began
        self.upstream = False          # the peer is one of the listener's upstream_hosts
        self.conn: ServerConnection | None = None
        self.handler = None
        self.peer_host: str = ""
        self.peer_port: int | None = None
        self.local_host: str = ""
        self.local_port: int | None = None
        self._pumping = False
        self._waiting = False          # a decision is out with the handler
        self._unfed = bytearray()      # input not yet given to the core (see _feed)
        self._paused_input = False     # we have paused the transport's reading
        self._paused_by_handler = False
        self._output_full = False      # the transport has paused us as its producer
        self._idle_timer = None
        self._session_timer = None
        self._grace_timer = None
        self._closed = False
        self._closing = False
        self.last_active = 0.0         # reactor time of the last input (the idle session closed first)
        self._greet_gate: defer.Deferred | None = None    # the pregreet wait (see _greet_wait)
        self._greet_timer = None
        self._errors_seen = 0          # the core's error count at the last tarpit check
        self._tarpit_timer = None      # replies held back after an error (see _tarpit)

    # -- connection life ------------------------------------------------------
    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._write = writer(self.transport)
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        self.peer_host = getattr(peer, "host", "") or ""
        self.peer_port = getattr(peer, "port", None)
        local = self.transport.getHost()
        self.local_host = getattr(local, "host", "") or ""
        self.local_port = getattr(local, "port", None)
        f = self.factory
        c = self.config = f.listener()
        upstream = self.upstream = self.peer_host in c.upstream_hosts
        # TLS from the first byte (a listener wrapped in TLS, port 465) is what the
        # transport is, never what a flag claims: a plain listener is never "TLS".
        implicit_tls = ISSLTransport.providedBy(self.transport)
        self.conn = ServerConnection(
            c.upstream_config if upstream else c.server_config,
            tls_available=c.tls_context is not None and not implicit_tls,
            tls_active=implicit_tls,
            xclient_allowed=upstream,
            auth_mechanisms=c.auth.mechanisms() if c.auth is not None and not upstream else (),
            auth_tls_only=c.auth_tls_only,
            require_tls=c.require_tls and not upstream,
            require_auth=c.require_auth and not upstream,
        )
        f.table.opened(self)
        limit = f.table.admission(self)
        if limit is not None:
            self.conn.send_greeting(limit)
            self._flush()
            return
        self.handler = c.handler_factory(self)
        self._session_timer = self.reactor.callLater(c.session_timeout, self._session_expired)
        self._reset_idle()
        greeting = self.handler.on_connect()
        if c.greet_wait and not upstream and self.peer_host not in c.greet_exempt:
            greeting = self._greet_wait(c, greeting)
        self._answer_later(greeting, self.conn.send_greeting)

    def _greet_wait(self, c: "ListenerConfig", greeting):
        """Postscreen's pregreet test: say the first line of a multi-line greeting
        ("220-"), wait ``greet_wait`` seconds, and only then the rest.  A real client
        waits for the whole greeting (RFC 5321 4.3.1); a spam engine that talks first
        is refused (dataReceived) before it costs anything more.  A client the connect
        checks vouch for (the handler's ``vouched_for``: a DNS allowlist) is greeted as
        soon as they have answered, as postscreen lets an allowlisted client skip it."""
        self._write(f"220-{c.server_config.hostname} ESMTP\r\n".encode())
        gate = self._greet_gate = defer.Deferred()
        self._greet_timer = self.reactor.callLater(c.greet_wait, gate.callback, None)
        self._greet_started = self.reactor.seconds()
        answer = defer.maybeDeferred(lambda: greeting).addCallback(self._vouched, gate)
        both = defer.gatherResults([answer, gate], consumeErrors=True)
        return both.addCallbacks(lambda results: results[0], lambda f: f.value.subFailure)

    def _vouched(self, answer, gate: defer.Deferred):
        """The connect checks' answer: for a client they greet and vouch for, the wait ends."""
        if answer is None and not gate.called and getattr(self.handler, "vouched_for", False):
            self._greet_timer.cancel()
            gate.callback(None)
        return answer

    def _pregreet(self, data: bytes) -> None:
        """The client talked before the greeting was over: refuse and close."""
        self._greet_timer.cancel()
        after = self.reactor.seconds() - self._greet_started
        first = data.split(b"\n", 1)[0][:60].decode("ascii", "backslashreplace").rstrip("\r")
        log.info("{peer}: pregreet: {n} octets after {after:.2f}s: {first}", peer=self.peer_host,
                 n=len(data), after=after, first=first)
        self._write(b"554 5.5.1 " + self.config.server_config.hostname.encode() +
                    b" Error: talked before the greeting\r\n")
        self._close()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._closed:
            return
        self._closed = True
        for t in (self._idle_timer, self._session_timer, self._grace_timer, self._greet_timer,
                  self._tarpit_timer):
            if t is not None and t.active():
                t.cancel()
        if self.handler is not None:
            try:
                self.handler.on_connection_closed(None)
            except Exception:
                log.failure("handler failed while closing the session")
        self.factory.table.closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.conn is None or self._closed or self._closing:
            return
        if self._greet_gate is not None and not self._greet_gate.called:
            self._pregreet(data)
            return
        self._reset_idle()
        n = self._piece()
        if self._unfed or (n is not None and len(data) > n):
            self._unfed += data
        else:
            self.conn.receive_data(data)
        self._pump()

    def _piece(self) -> int | None:
        """How much input the core may be given at once now (see Back-pressure):
        None (all of it) in DATA, else COMMAND_SLICE beyond the rest of a BDAT chunk."""
        if self.conn.state is State.DATA:
            return None
        return COMMAND_SLICE + self.conn.chunk_ahead

    def _feed(self) -> None:
        """Give the core the next piece of the input held back by dataReceived."""
        unfed = self._unfed
        n = self._piece()
        if n is None:
            n = len(unfed)
        self.conn.receive_data(bytes(unfed[:n]))
        del unfed[:n]

    # -- timers ---------------------------------------------------------------
    def _reset_idle(self) -> None:
        self.last_active = self.reactor.seconds()
        t = self.factory.table.command_timeout(self.config.command_timeout)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(t)
        else:
            self._idle_timer = self.reactor.callLater(t, self._idle_expired)

    def tighten_idle(self, timeout: float) -> None:
        """The tier came under stress: wait at most `timeout` more for the next command."""
        t = self._idle_timer
        if t is not None and t.active() and t.getTime() - self.reactor.seconds() > timeout:
            t.reset(timeout)

    @property
    def closing(self) -> bool:
        return self._closing or self._closed

    def _idle_expired(self) -> None:
        self.abort_session(Reply(421, "4.4.2", f"{self.config.server_config.hostname} Error: timeout exceeded"))

    def _session_expired(self) -> None:
        self.abort_session(Reply(421, "4.4.2", f"{self.config.server_config.hostname} Error: session too long"))

    def abort_session(self, reply: Reply) -> None:
        """Say `reply` (a 421) out of turn and close: timeouts and shutdown.

        The session ends when the transport has flushed the reply and really
        closed (connectionLost); see _close.
        """
        if self._closed or self._closing:
            return
        log.info("{peer}: disconnect: {reply}", peer=self.peer_host, reply=str(reply))
        self._write(self.conn.data_to_send() + reply.to_bytes())
        self._close()

    def _close(self) -> None:
        """Close once what was written is sent; nothing more is read or answered.

        A peer that does not read our last replies is cut off after ABORT_GRACE
        seconds, whoever decided to close.
        """
        if self._closing:
            return
        self._closing = True
        self.transport.unregisterProducer()     # Twisted closes only once no producer is registered
        self.transport.loseConnection()
        self._grace_timer = self.reactor.callLater(ABORT_GRACE, self._force_close)

    def _force_close(self) -> None:
        if not self._closed:
            self.transport.abortConnection()

    # -- pumping --------------------------------------------------------------
    def _pump(self) -> None:
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            while not (self._waiting or self._output_full or self._closed or self._closing
                       or self._tarpit_timer is not None):
                if self.conn.errors != self._errors_seen and self._tarpit():
                    break
                event = self.conn.next_event()
                if event is NEED_DATA:
                    if not self._unfed:
                        break
                    self._flush()     # the last slice's replies first: a full transport pauses us
                    if self._output_full:
                        break
                    self._feed()
                    continue
                if event is PAUSED:
                    break
                self._dispatch(event)
        except Exception:
            # A bug in the core or the handler: never a traceback to the peer.
            log.failure("internal error in SMTP session with {peer}", peer=self.peer_host)
            self.abort_session(Reply(421, "4.3.0", "Internal error, closing connection"))
            return
        finally:
            self._pumping = False
        self._flush()
        self._apply_backpressure()

    def _tarpit(self) -> bool:
        """After ``soft_error_limit`` errors, each further error reply waits
        ``error_sleep`` seconds before it is sent (as Postfix's smtpd_error_sleep_time):
        a client probing addresses or passwords gets slower at it, and pipelined
        commands behind the error wait too.  True when the pump must stop meanwhile."""
        errors, self._errors_seen = self.conn.errors, self.conn.errors
        c = self.config
        if self.upstream or not c.error_sleep or errors <= c.soft_error_limit or self.conn.closing:
            return False
        self._tarpit_timer = self.reactor.callLater(c.error_sleep, self._tarpit_over)
        self._apply_backpressure()
        return True

    def _tarpit_over(self) -> None:
        self._tarpit_timer = None
        self._pump()

    def _dispatch(self, event) -> None:
        method = getattr(self.handler, _HANDLER_NAMES[type(event)])
        if isinstance(event, ev.StartTLS):
            self._flush()        # the 220 must go out in plaintext before TLS starts
            self._unfed.clear()  # plaintext pipelined behind STARTTLS is dropped (the core's too)
            self.transport.startTLS(self.config.tls_context)
            self._output_full = False    # Twisted moved us to the TLS layer, unpaused
            self.conn.tls_started()
            method(event)
            return
        result = method(event)
        if event.needs_reply:
            self._answer_later(result, self.conn.respond)

    def _answer_later(self, result, respond) -> None:
        """Give the handler's answer to the core now or when its Deferred fires."""
        if not isinstance(result, defer.Deferred):
            self._give(result, respond)
            self._pump()          # flushes; a no-op when called from inside the pump
            return
        self._waiting = True

        def failed(failure: Failure):
            log.failure("session handler failed; answering tempfail", failure)
            return TEMPFAIL_CHECK

        def answered(answer):
            self._waiting = False
            if self._closed:
                return
            try:
                self._give(answer, respond)
            except Exception:
                log.failure("internal error answering {peer}", peer=self.peer_host)
                self.abort_session(Reply(421, "4.3.0", "Internal error, closing connection"))
                return
            self._pump()

        result.addErrback(failed).addCallback(answered)

    def _give(self, answer, respond) -> None:
        if isinstance(answer, CloseAfter):
            respond(answer.reply)
            self._flush()
            self._close()
            return
        respond(answer)

    def _flush(self) -> None:
        if self.conn.errors != self._errors_seen:
            self._tarpit()
        if self._tarpit_timer is not None and not self.conn.closing:
            return                     # held back until the tarpit's wait is over
        out = self.conn.data_to_send()
        if out:
            self._write(out)
        if self.conn.closing and not self._closed:
            self._close()

    # -- what the session handler may ask ---------------------------------------
    @property
    def in_transaction(self) -> bool:
        """Whether a mail transaction is open (a shutdown lets it finish)."""
        h = self.handler
        return h is not None and h.in_transaction

    @property
    def accepting(self) -> bool:
        """False once the tier is shutting down: answer, then close."""
        return self.factory.table.accepting

    def tls_text(self) -> str | None:
        """The TLS protocol and cipher of this connection ("TLSv1.3 TLS_AES_256_GCM_SHA384
        256/256 bits"), or None before TLS or its handshake."""
        if self.conn is None or not self.conn.tls_active:
            return None
        try:
            tls = self.transport.getHandle()
            version, cipher = tls.get_protocol_version_name(), tls.get_cipher_name()
            bits = tls.get_cipher_bits()
        except Exception:           # not an OpenSSL connection, or the handshake is not done
            return None
        if not version or not cipher or version == "Unknown":
            return None
        return f"{version} {cipher} {bits}/{bits} bits" if bits else f"{version} {cipher}"

    def tls_client_certificate(self) -> ClientCertificate | None:
        """The certificate the client presented in this connection's TLS handshake (its
        listener asked for one: ``tls_client_certificates``), or None."""
        if self.conn is None or not self.conn.tls_active:
            return None
        try:
            return client_certificate(self.transport.getHandle())
        except Exception:           # not an OpenSSL connection
            return None

    # -- back-pressure --------------------------------------------------------
    def _apply_backpressure(self) -> None:
        """Pause or resume reading for the three reasons (module docstring)."""
        if self._closed or self._closing:
            return
        waiting = self.conn.buffered + len(self._unfed)
        want_pause = (self._paused_by_handler or (self._output_full and waiting > 0)
                      or self._tarpit_timer is not None
                      or waiting > self.config.server_config.max_buffered_input)
        if want_pause and not self._paused_input:
            self._paused_input = True
            self.transport.pauseProducing()
        elif not want_pause and self._paused_input:
            self._paused_input = False
            self.transport.resumeProducing()

    def pause_input(self) -> None:
        """The handler's sink is full (e.g. a slow next hop): stop reading."""
        self._paused_by_handler = True
        self._apply_backpressure()

    def resume_input(self) -> None:
        self._paused_by_handler = False
        self._apply_backpressure()

    # -- IPushProducer: the transport's word on our output ------------------
    def pauseProducing(self) -> None:
        """The transport's buffer is full: answer nothing more until it drains."""
        self._output_full = True
        self._apply_backpressure()

    def resumeProducing(self) -> None:
        """The transport has sent what it held: answer what waits."""
        self._output_full = False
        self._pump()

    def stopProducing(self) -> None:
        """The connection is going (connectionLost follows): nothing more is answered."""
        self._closing = True


def upstream_config(config: ServerConfig) -> ServerConfig:
    """The limits for a session from an upstream tier of the pipeline.

    The limits the pipeline controls are enforced where mail enters it, at the
    edge, so that a message the edge accepted is never refused further in (by
    then it has been acknowledged, and a refusal would become a bounce):

    - size: a message grows on its way (each tier adds its Received header, the
      filter its verdict headers), so a tier behind the edge accepts, and
      advertises with SIZE, PIPELINE_ALLOWANCE octets more from its upstream
      tiers than from anyone else;
    - line length: checked by the edge, not again;
    - errors and junk commands: an upstream session carries many clients (kept
      connections, recipient verification probes), each counted at the edge.
    """
    size = config.max_message_size + PIPELINE_ALLOWANCE if config.max_message_size else 0
    return replace(config, max_message_size=size, max_data_line=0, hard_error_limit=0,
                   junk_command_limit=0)


@dataclass(frozen=True)
class ListenerConfig:
    """What one listener's new sessions get, as of the running configuration.

    The daemon makes a new one for every configuration it loads; a session keeps
    the one it started with (its timeouts, its TLS context, its handler's policy).
    """
    name: str
    server_config: ServerConfig
    handler_factory: Any                      # (SMTPServerProtocol) -> the session handler
    tls_context: Any = None                   # shared.transport.tls.ServerTLS: STARTTLS is offered when
                                              # set (not on implicit TLS)
    upstream_hosts: NetworkList = NetworkList(())
    allowed_clients: NetworkList | None = None
    command_timeout: float = 300
    session_timeout: float = 3600
    firewalls: tuple = ()                     # shared.firewall.Firewall: the listener's, then the global
    greet_wait: float = 0                     # seconds of the pregreet test (0: none)
    greet_exempt: NetworkList = NetworkList(())
    soft_error_limit: int = 10                # errors before each further one is answered late
    error_sleep: float = 1.0                  # seconds each such reply waits (0: no tarpit)
    auth: Any = None                          # shared.auth.Authenticator: AUTH is offered when set
    auth_tls_only: bool = True                # ... and then only over TLS (RFC 8314 4.1)
    require_tls: bool = False                 # MAIL needs STARTTLS first (530 5.7.0)
    require_auth: bool = False                # MAIL needs AUTH first (530 5.7.0)
    upstream_config: ServerConfig = field(init=False)

    def firewall_denies(self, address: str):
        """The deny decision of the first firewall with a matching rule, else None."""
        for firewall in self.firewalls:
            decision = firewall.decide(address)
            if decision is not None:
                return None if decision.allowed else decision
        return None

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream_config", upstream_config(self.server_config))


class SessionTable:
    """Every session of a tier, all listeners together: the connection limits, and the
    graceful shutdown.

    ``allowed_clients``, when a listener has it, is the only address space sessions
    are taken from (the inner tiers: their upstream tiers and ``mynetworks``); anyone
    else gets 554 5.7.1 instead of a greeting.

    Stress, as Postfix's: when the sessions reach ``STRESS_AT`` of ``max_connections``
    the tier is under stress until they fall below ``RELAXED_AT``, and says so in the
    log both times.  Under stress, idle sessions wait at most ``stress_command_timeout``
    for their next command (those already waiting get the shorter timeout at once), a
    client may hold at most ``stress_connections_per_client`` sessions, and at the limit
    a newcomer is let in by closing the session idle the longest (421), not refused:
    a thousand idle connections no longer lock everyone else out.
    """

    STRESS_AT = 0.8
    RELAXED_AT = 0.5

    def __init__(self, reactor, *, max_connections: int = 1000, max_connections_per_client: int = 50,
                 stress_command_timeout: float = 10, stress_connections_per_client: int = 5) -> None:
        self.reactor = reactor
        self.sessions: set[SMTPServerProtocol] = set()
        self._per_client: dict[str, int] = {}
        self.accepting = True
        self.stressed = False
        self._drained: defer.Deferred | None = None
        self.set_limits(max_connections=max_connections, max_connections_per_client=max_connections_per_client,
                        stress_command_timeout=stress_command_timeout,
                        stress_connections_per_client=stress_connections_per_client)

    def set_limits(self, *, max_connections: int, max_connections_per_client: int,
                   stress_command_timeout: float = 10, stress_connections_per_client: int = 5) -> None:
        """At start and on reload: the new limits hold for sessions that open from now on."""
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.stress_command_timeout = stress_command_timeout
        self.stress_connections_per_client = stress_connections_per_client

    def command_timeout(self, normal: float) -> float:
        """How long an idle session waits for its next command now."""
        return min(normal, self.stress_command_timeout) if self.stressed else normal

    def opened(self, p: SMTPServerProtocol) -> None:
        self.sessions.add(p)
        self._per_client[p.peer_host] = self._per_client.get(p.peer_host, 0) + 1
        if not self.stressed and len(self.sessions) >= self.STRESS_AT * self.max_connections:
            self.stressed = True
            log.warn("under stress: {n} of {m} sessions; idle sessions wait {t:g}s, at most {c} per client",
                     n=len(self.sessions), m=self.max_connections, t=self.stress_command_timeout,
                     c=self.stress_connections_per_client)
            for session in list(self.sessions):
                session.tighten_idle(self.stress_command_timeout)

    def closed(self, p: SMTPServerProtocol) -> None:
        self.sessions.discard(p)
        n = self._per_client.get(p.peer_host, 1) - 1
        if n:
            self._per_client[p.peer_host] = n
        else:
            self._per_client.pop(p.peer_host, None)
        if self.stressed and len(self.sessions) < self.RELAXED_AT * self.max_connections:
            self.stressed = False
            log.info("stress over: {n} of {m} sessions", n=len(self.sessions), m=self.max_connections)
        if self._drained is not None and not self.sessions:
            d, self._drained = self._drained, None
            d.callback(None)

    def admission(self, p: SMTPServerProtocol) -> Reply | None:
        """A refusal greeting when a limit is reached, else None."""
        c = p.config
        host = c.server_config.hostname
        if not self.accepting:
            return SHUTTING_DOWN
        if c.firewalls:
            denied = c.firewall_denies(p.peer_host)
            if denied is not None:
                log.info("firewall: deny [{addr}] on {listener} ({rule})", addr=p.peer_host,
                         listener=c.name, rule=str(denied))
                return Reply(554, "5.7.1", f"{host} Error: access denied for [{p.peer_host}]")
        if c.allowed_clients is not None and p.peer_host not in c.allowed_clients:
            return Reply(554, "5.7.1", f"{host} Error: access denied for [{p.peer_host}]: "
                                       "this tier takes mail only from its upstream tiers")
        per_client = self.max_connections_per_client
        if self.stressed:
            per_client = min(per_client, self.stress_connections_per_client)
        if (self._per_client.get(p.peer_host, 0) > per_client
                and not p.upstream):     # an upstream tier carries many clients
            return Reply(421, "4.7.0", f"{host} Error: too many connections from {p.peer_host}")
        if len(self.sessions) > self.max_connections and not self._make_room(p):
            return Reply(421, "4.7.0", f"{host} Error: too many connections")
        return None

    def _make_room(self, newcomer: SMTPServerProtocol) -> bool:
        """Close the session idle the longest (no transaction, not an upstream tier's) for
        `newcomer`; False when every other session is busy."""
        idle = [p for p in self.sessions
                if p is not newcomer and p.handler is not None and not p.in_transaction and not p.upstream
                and not p.closing]
        if not idle:
            return False
        victim = min(idle, key=lambda p: p.last_active)
        victim.abort_session(Reply(421, "4.7.0", f"{victim.config.server_config.hostname} Error: too many "
                                                 f"connections; closing an idle session"))
        return True

    def shutdown(self, grace: float) -> defer.Deferred:
        """Stop accepting; idle sessions get 421 now, the others `grace` seconds to finish."""
        self.accepting = False
        for p in list(self.sessions):
            if not p.in_transaction:
                p.abort_session(SHUTTING_DOWN)
        if not self.sessions:
            return defer.succeed(None)
        self._drained = defer.Deferred()

        def force():
            for p in list(self.sessions):
                p.abort_session(SHUTTING_DOWN)
        timer = self.reactor.callLater(grace, force)
        self._drained.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return self._drained


class SMTPServerFactory(protocol.ServerFactory):
    """One listener: its sessions take ``listener()`` (the running configuration's
    ListenerConfig) when they open, and are counted in the tier's SessionTable."""

    noisy = False

    def __init__(self, *, reactor, listener: Callable[[], ListenerConfig], table: SessionTable) -> None:
        self.reactor = reactor
        self.listener = listener
        self.table = table

    @classmethod
    def single(cls, *, reactor, server_config: ServerConfig, handler_factory, tls_context=None,
               upstream_hosts=(), command_timeout: float = 300, session_timeout: float = 3600,
               max_connections: int = 1000, max_connections_per_client: int = 50,
               allowed_clients: NetworkList | None = None, greet_wait: float = 0,
               soft_error_limit: int = 10, error_sleep: float = 0) -> "SMTPServerFactory":
        """A listener with a fixed configuration and a session table of its own (no tarpit
        unless `error_sleep` is given)."""
        config = ListenerConfig("smtp", server_config, handler_factory, tls_context=tls_context,
                                upstream_hosts=NetworkList(upstream_hosts), allowed_clients=allowed_clients,
                                command_timeout=command_timeout, session_timeout=session_timeout,
                                greet_wait=greet_wait, soft_error_limit=soft_error_limit,
                                error_sleep=error_sleep)
        table = SessionTable(reactor, max_connections=max_connections,
                             max_connections_per_client=max_connections_per_client)
        return cls(reactor=reactor, listener=lambda: config, table=table)

    def buildProtocol(self, addr):
        p = SMTPServerProtocol(self)
        p.factory = self
        return p

    @property
    def sessions(self) -> set:
        return self.table.sessions

    def shutdown(self, grace: float) -> defer.Deferred:
        return self.table.shutdown(grace)
