"""Stress, as Postfix's: near the connection limit idle sessions get a short timeout, each
client fewer sessions, and a newcomer at the limit is let in by closing the session idle
the longest; both the stress and its end are logged."""
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from shared.smtp.server import ServerConfig
from shared.transport.server import SMTPServerFactory
from tests.shared.transport.test_pipeline_limits import Handler, connect


def lose(proto, t):
    t.loseConnection()
    proto.connectionLost()


def test_idle_sessions_get_the_short_timeout_and_room_is_made_for_newcomers():
    clock = Clock()
    factory = SMTPServerFactory.single(reactor=clock, server_config=ServerConfig(hostname="mx.test"),
                                       handler_factory=Handler, command_timeout=300, max_connections=10,
                                       max_connections_per_client=50)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        idle = [connect(factory, f"192.0.2.{i}") for i in range(1, 8)]     # 7: not yet 80 %
        assert not factory.table.stressed
        clock.advance(1)
        idle.append(connect(factory, "192.0.2.8"))                           # 8 of 10: stress
        assert factory.table.stressed
        assert [(e["n"], e["m"]) for e in seen if e.get("log_format", "").startswith("under stress")] == [(8, 10)]
        clock.advance(10.5)                                  # the short timeout, not 300 s
        for proto, t in idle:
            assert t.value().endswith(b"421 4.4.2 mx.test Error: timeout exceeded\r\n"), t.value()
            lose(proto, t)
        assert not factory.table.stressed                    # back below 50 %: over
        assert any(e.get("log_format", "").startswith("stress over") for e in seen)
    finally:
        globalLogPublisher.removeObserver(seen.append)


def test_at_the_limit_the_longest_idle_session_makes_room_and_clients_are_held_to_fewer():
    clock = Clock()
    factory = SMTPServerFactory.single(reactor=clock, server_config=ServerConfig(hostname="mx.test"),
                                       handler_factory=Handler, max_connections=10, max_connections_per_client=50)
    sessions = []
    for i in range(11):
        sessions.append(connect(factory, f"198.51.100.{i}"))
        clock.advance(0.1)
    oldest, t0 = sessions[0]
    assert t0.value().endswith(b"421 4.7.0 mx.test Error: too many connections; closing an idle session\r\n")
    newest, t11 = sessions[-1]
    assert t11.value().startswith(b"220 ")                   # the newcomer is served
    lose(oldest, t0)
    # under stress a client may hold only 5 sessions
    for _ in range(4):
        lose(*sessions.pop(1))
    mine = [connect(factory, "203.0.113.1") for _ in range(6)]
    assert [t.value()[:3] for _, t in mine] == [b"220"] * 5 + [b"421"]
    assert b"too many connections from 203.0.113.1" in mine[-1][1].value()
