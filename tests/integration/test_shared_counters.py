"""Two edge daemons sharing one real redis-server hold a client to one connection rate;
redis-server killed under load: mail still flows, each node holds the limits by itself,
one log line when Redis goes and one when it is back, and the counts are shared again."""
from __future__ import annotations

import threading

import pytest

from tests.integration.helpers import DOMAIN, Client, dot_stuff, message, wait_until
from tests.redisserver import redis_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

LIMITS = {"connection_rate": 10, "message_rate": 10_000}      # every MAIL is counted, none refused


def connect(port: int, source: str) -> int:
    """One connection from `source`: the greeting's code (421 when the rate is exceeded)."""
    with Client(port, source=source) as c:
        code = c.greeting.code
        if code == 220:
            c.cmd("QUIT")
        return code


class Load(threading.Thread):
    """One session from 127.0.0.9 sending message after message until stopped: every reply
    to MAIL and to the end of data is kept."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.name = port, name
        self.stopping = threading.Event()
        self.replies: list[tuple[int, int]] = []      # (MAIL, end of data)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.port, source="127.0.0.9") as c:
                c.ehlo()
                while not self.stopping.is_set():
                    mail = c.cmd("MAIL FROM:<load@example.net>").code
                    c.cmd(f"RCPT TO:<bob@{DOMAIN}>")
                    c.cmd("DATA")
                    c.send(dot_stuff(message(f"load {self.name} {len(self.replies)}", to=f"bob@{DOMAIN}")) + b".\r\n")
                    self.replies.append((mail, c.reply().code))
        except BaseException as e:
            self.error = e

    def stop(self) -> list[tuple[int, int]]:
        self.stopping.set()
        self.join(30)
        assert self.error is None, f"load on {self.name}: {self.error!r}"
        return self.replies


def test_two_edges_share_the_connection_rate_and_keep_limits_through_a_redis_outage(make_pipeline, redis_server):
    server = redis_server()
    p = make_pipeline(edge={"rate_limits": LIMITS, "redis": {"servers": [server.address]}})
    a, b = p.edge, p.add_edge("edge-b")
    b.start()
    flood = "127.0.0.7"
    codes = [connect(a.port, flood) for _ in range(6)] + [connect(b.port, flood) for _ in range(5)]
    assert codes == [220] * 10 + [421]                          # the eleventh, on the node that saw five
    b.wait_log(r"rate limit: connection_rate 10/60s exceeded by 127\.0\.0\.7")
    assert connect(a.port, flood) == 421

    loads = [Load(a.port, "a"), Load(b.port, "b")]
    for load in loads:
        load.start()
    wait_until(lambda: all(len(load.replies) >= 5 for load in loads), 30, "mail through both edges")
    server.kill()
    down = r"redis unavailable at 127\.0\.0\.1:\d+ \(.*\): counting locally"
    for edge in (a, b):
        edge.wait_log(down)
    counted = [len(load.replies) for load in loads]
    wait_until(lambda: all(len(load.replies) >= n + 5 for load, n in zip(loads, counted)), 30,
               "mail through both edges without Redis")
    # Each node now holds clients to the limits by itself: a new client gets ten connections
    # to a node, and the client counted before keeps a's own share of its window (6 + 1).
    assert [connect(a.port, "127.0.0.8") for _ in range(11)] == [220] * 10 + [421]
    assert [connect(a.port, flood) for _ in range(4)] == [220, 220, 220, 421]

    server.start()                                               # the same port, empty
    back = r"redis at 127\.0\.0\.1:\d+ answers again after [0-9.]+s: counting in redis"
    for edge in (a, b):
        edge.wait_log(back, timeout=40)                          # the next probe, after a back-off
    replies = [r for load in loads for r in load.stop()]
    assert replies and all(r == (250, 250) for r in replies), [r for r in replies if r != (250, 250)]
    p.wait_messages(f"bob@{DOMAIN}", len(replies), timeout=30)
    for edge in (a, b):
        assert len(edge.log_lines("redis unavailable at")) == 1
        assert len(edge.log_lines("answers again after")) == 1
    # shared again: five and five, and the eleventh is refused
    fresh = "127.0.0.10"
    codes = [connect(a.port, fresh) for _ in range(5)] + [connect(b.port, fresh) for _ in range(5)]
    assert codes + [connect(a.port, fresh)] == [220] * 10 + [421]
    assert (a.stop(), b.stop()) == (0, 0)                        # the Redis links closed, the tiers ended
