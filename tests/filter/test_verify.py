"""Recipient verification: caching, one probe per address, bounded sessions, fail safe."""
from twisted.internet import defer
from twisted.internet.task import Clock

from filter.verify import RecipientVerifier
from shared.checks import Request
from shared.checks.core import Action
from shared.smtp.reply import Reply
from shared.transport.pool import NextHopUnavailable

OK = Reply(250, "2.1.5", "Ok")


class FakeSession:
    def __init__(self, client):
        self.client = client
        self.usable = True
        self.protocol = self

    @property
    def transport(self):
        return self

    def abortConnection(self):
        self.usable = False
        self.client.aborted += 1

    def mail(self, sender):
        return defer.succeed(Reply(250, "2.1.0", "Ok"))

    def rcpt(self, address):
        self.client.probes.append(address)
        d = defer.Deferred()
        self.client.answers.append((address, d))
        return d

    def rset(self):
        return defer.succeed(Reply(250, "2.0.0", "Ok"))

    def close(self):
        self.usable = False


class FakeRelayClient:
    def __init__(self, reachable=True):
        self.reachable = reachable
        self.opened = 0
        self.aborted = 0
        self.probes = []
        self.answers = []

    def open_session(self, client_info):
        if not self.reachable:
            return defer.fail(NextHopUnavailable(Reply(451, "4.4.1", "connect to x: refused")))
        self.opened += 1
        return defer.succeed(FakeSession(self))

    def answer(self, reply):
        address, d = self.answers.pop(0)
        d.callback(reply)


def req(rcpt):
    return Request(phase="rcpt", client_address="192.0.2.1", recipient=rcpt)


def outcome(d):
    out = []
    d.addBoth(out.append) if isinstance(d, defer.Deferred) else out.append(d)
    return out[0] if out else None


def test_unknown_user_passes_the_next_tiers_reply_and_is_cached():
    clock, client = Clock(), FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock, negative_ttl=300)
    d = v(req("carol@example.org"))
    client.answer(Reply(550, "5.1.1", "<carol@example.org>: User unknown"))
    verdict = outcome(d)
    assert verdict.action is Action.REJECT and verdict.reply.text == "<carol@example.org>: User unknown"
    again = outcome(v(req("Carol@Example.org")))
    assert again.action is Action.REJECT and client.probes == ["carol@example.org"]
    clock.advance(301)
    v(req("carol@example.org"))
    assert len(client.probes) == 2          # negative entry expired


def test_known_user_continues_and_concurrent_probes_are_shared():
    clock, client = Clock(), FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock)
    d1, d2 = v(req("alice@example.org")), v(req("alice@example.org"))
    assert client.probes == ["alice@example.org"]
    client.answer(OK)
    assert not outcome(d1).final and not outcome(d2).final
    assert not outcome(v(req("alice@example.org"))).final and len(client.probes) == 1


def test_tempfail_when_next_tier_is_down_or_says_4xx():
    clock = Clock()
    v = RecipientVerifier(FakeRelayClient(reachable=False), reactor=clock)
    verdict = outcome(v(req("alice@example.org")))
    assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.enhanced) == (450, "4.1.1")
    client = FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock)
    d = v(req("bob@example.org"))
    client.answer(Reply(451, "4.3.0", "try later"))
    assert outcome(d).action is Action.TEMPFAIL
    v(req("bob@example.org"))
    assert len(client.probes) == 2          # a tempfail is never cached


def test_sessions_are_bounded_and_reused():
    clock, client = Clock(), FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock, max_sessions=2)
    ds = [v(req(f"u{i}@example.org")) for i in range(5)]
    assert client.opened == 2 and len(client.probes) == 2
    for _ in range(5):
        client.answer(OK)
    assert all(not outcome(d).final for d in ds)
    assert client.opened == 2 and len(client.probes) == 5


def test_broken_probe_session_is_dropped():
    clock, client = Clock(), FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock, max_sessions=1)
    d = v(req("a@example.org"))
    _, pending = client.answers.pop(0)
    pending.errback(ConnectionError("lost"))
    assert outcome(d).action is Action.TEMPFAIL and client.aborted == 1
    d = v(req("b@example.org"))
    client.answer(OK)
    assert not outcome(d).final and client.opened == 2


def test_reloads_give_every_slot_back():
    """close() (each SIGHUP) used to drop the idle sessions but keep counting them: after
    max_sessions reloads every probe waited for a slot that never came."""
    clock, client = Clock(), FakeRelayClient()
    v = RecipientVerifier(client, reactor=clock, max_sessions=2)
    for i in range(5):                        # probe (a session goes idle), then reload
        d = v(req(f"u{i}@example.org"))
        client.answer(OK)
        assert not outcome(d).final
        v.close()
    assert v.open_count == 0
    busy = v(req("busy@example.org"))         # in use across a reload: closed when it ends
    v.close()
    client.answer(OK)
    assert not outcome(busy).final and v.open_count == 0 and v.idle == []
    ds = [v(req(f"w{i}@example.org")) for i in range(2)]
    assert len(client.answers) == 2           # both slots free: two probes at once
    for _ in ds:
        client.answer(OK)
    assert all(not outcome(d).final for d in ds)
