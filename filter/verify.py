"""Recipient verification: ask the next tier before answering RCPT.

The filter queues what it accepts, so an unknown user must be refused while
the original client is still connected, not bounced later (bounces to forged
senders are backscatter).  For each recipient not in the cache, a probe session
to the next tier sends ``MAIL FROM:<>``, ``RCPT TO:<addr>``, ``RSET``: a 5xx
there becomes the same 5xx here, a 4xx or an unreachable next tier a 450
4.1.1 tempfail.  Results are cached (positive and negative lifetimes apart);
probe sessions are reused, at most `max_sessions` at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from shared.checks.core import CONTINUE, Action, Request, Verdict
from shared.checks.registry import CheckType
from shared.config.schema import TTL, Section, setting
from shared.smtp.reply import Reply

log = Logger(namespace="smarthost.verify")


@dataclass(frozen=True)
class VerifySettings:
    """recipient verification at RCPT (the check `verify`)"""
    recipients: bool = setting(True, "filter: ask the next hop about each recipient before answering RCPT")
    positive_ttl: float = setting(3600, "seconds a recipient the next hop accepted stays known "
                                          "(at most 1 week)", TTL, kind=(int, float))
    negative_ttl: float = setting(300, "seconds a recipient the next hop rejected stays known "
                                         "(at most 1 week)", TTL, kind=(int, float))


def _build(own: VerifySettings, ctx):
    """One verifier per configuration, closed (its probe sessions and their slots) when
    the configuration is replaced."""
    if not own.recipients:
        return None
    verifier = RecipientVerifier(ctx.next_hop, reactor=ctx.reactor, positive_ttl=own.positive_ttl,
                                 negative_ttl=own.negative_ttl)
    ctx.on_retire(verifier.close)
    from shared.engine.nexthop import route
    served = route(ctx.settings)
    if served is None:
        return verifier

    def verify(request: Request):
        # The next hop is asked only about what it serves: an authenticated user's
        # mail for another domain (route permits it) is not the next hop's to judge.
        if not served(request.recipient or ""):
            return CONTINUE
        return verifier(request)
    return verify


VERIFY = CheckType("verify", phases=("rcpt",), build=_build, section=Section.of("verify", VerifySettings),
                   active=lambda own, settings: own.recipients,
                   timeout=lambda settings: settings.next_hop.command_timeout + 5,
                   doc="ask the next hop whether it accepts the recipient (cached); its 5xx is ours")


class RecipientVerifier:
    name = "verify"

    def __init__(self, relay_client, *, reactor, positive_ttl: float = 3600, negative_ttl: float = 300,
                 max_sessions: int = 4, cache_size: int = 100_000) -> None:
        self.relay_client = relay_client
        self.reactor = reactor
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.max_sessions = max_sessions
        self.cache_size = cache_size
        self.cache: dict[str, tuple[float, Reply | None]] = {}
        self.idle: list = []
        self.open_count = 0              # sessions open: idle, in use, or being opened
        self.busy: set = set()           # sessions probing now
        self.stale: set = set()          # busy when close() was called: closed on release
        self.waiters: deque[defer.Deferred] = deque()
        self.pending: dict[str, defer.Deferred] = {}

    def __call__(self, request: Request):
        key = (request.recipient or "").lower()
        hit = self.cache.get(key)
        now = self.reactor.seconds()
        if hit is not None and hit[0] > now:
            return self._verdict(hit[1])
        if key in self.pending:      # one probe per address at a time
            d = defer.Deferred()
            self.pending[key].addBoth(lambda r: (d.callback(r), r)[1])
            return d.addCallback(self._verdict)
        probe = self._probe(request.recipient or "")
        self.pending[key] = probe

        def done(result):
            self.pending.pop(key, None)
            return result
        probe.addBoth(done)
        d = defer.Deferred()
        probe.addBoth(lambda r: (d.callback(r), r)[1])
        return d.addCallback(self._verdict)

    @staticmethod
    def _verdict(reply: Reply | None) -> Verdict:
        if reply is None:
            return CONTINUE
        action = Action.REJECT if reply.permanent else Action.TEMPFAIL
        return Verdict(action, reply)

    def _remember(self, key: str, reply: Reply | None, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self.cache) >= self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = (self.reactor.seconds() + ttl, reply)

    @defer.inlineCallbacks
    def _probe(self, address: str):
        key = address.lower()
        try:
            session = yield self._acquire()
        except Exception as e:
            log.warn("verify <{addr}>: next hop not reachable: {err}", addr=address, err=str(e))
            return Reply(450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address: "
                                       f"next hop not reachable")
        self.busy.add(session)
        try:
            mail = yield session.mail("")
            if not mail.positive:
                raise RuntimeError(f"MAIL FROM:<> refused: {mail}")
            reply = yield session.rcpt(address)
            yield session.rset()
        except Exception as e:
            log.warn("verify <{addr}>: probe failed: {err}", addr=address, err=str(e))
            self._release(session, broken=True)
            return Reply(450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address")
        self._release(session)
        if reply.positive:
            self._remember(key, None, self.positive_ttl)
            return None
        if reply.permanent:       # the next tier's own words reach the client
            self._remember(key, reply, self.negative_ttl)
            return reply
        return Reply(450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address: {reply.text}")

    def _acquire(self):
        while self.idle:
            s = self.idle.pop()
            if s.usable:
                return defer.succeed(s)
            self.open_count -= 1
        if self.open_count < self.max_sessions:
            self.open_count += 1
            d = self.relay_client.open_session(None)

            def failed(f):
                self.open_count -= 1
                self._wake()
                return f
            return d.addErrback(failed)
        d = defer.Deferred()
        self.waiters.append(d)
        return d

    def _release(self, session, broken: bool = False) -> None:
        self.busy.discard(session)
        if broken or not session.usable:
            if session.protocol.transport is not None:
                session.protocol.transport.abortConnection()
            self.open_count -= 1
        elif session in self.stale:               # opened for the configuration before a reload
            session.close()
            self.open_count -= 1
        else:
            self.idle.append(session)
        self.stale.discard(session)
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            self._acquire().chainDeferred(w)
            break

    def close(self) -> None:
        """Close the idle probe sessions (at shutdown, or before a reload gives a new
        next hop); the busy ones are closed when their probe ends.  Each one closed
        gives its slot back, so no reload can shrink the pool."""
        for s in self.idle:
            s.close()
        self.open_count -= len(self.idle)
        self.idle.clear()
        self.stale.update(self.busy)
