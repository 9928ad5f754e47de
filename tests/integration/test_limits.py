"""The edge's rate limits against real clients: connections, messages and recipients per
client, one log line naming the limit, another client's mail still flowing."""
from __future__ import annotations

from tests.integration.helpers import DOMAIN, Client, message, transaction


def test_a_flooding_client_is_held_to_its_limits_while_another_clients_mail_flows(make_pipeline):
    p = make_pipeline(edge={"rate_limits": {"connection_rate": 3, "message_rate": 2, "recipient_rate": 5}})
    flood = "127.0.0.7"
    with Client(p.edge.port, source=flood) as c:
        c.ehlo()
        for i in range(2):
            assert c.cmd("MAIL FROM:<s@example.net>").code == 250
            assert c.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250
            assert c.cmd("RSET").code == 250
        r = c.cmd("MAIL FROM:<s@example.net>")
        assert (r.code, r.enhanced, r.text) == (450, "4.7.1", f"Error: too much mail from {flood}"), r
    for _ in range(2):
        with Client(p.edge.port, source=flood) as c:
            c.ehlo()
    with Client(p.edge.port, source=flood) as c:      # the fourth connection in the minute
        g = c.greeting
        assert (g.code, g.enhanced) == (421, "4.7.0") and f"too many connections from {flood}" in g.text, g
        assert c.closed_by_server()
    p.edge.wait_log(rf"rate limit: connection_rate 3/60s exceeded by {flood.replace('.', '[.]')}")
    assert len(p.edge.log_lines("rate limit: message_rate")) == 1
    # a second client is not affected
    replies = transaction(p.edge.port, "other@example.net", [f"bob@{DOMAIN}"], message("still flows"))
    assert replies[-1].code == 250, replies
    p.wait_messages(f"bob@{DOMAIN}", 1)


def test_access_tables_answer_each_phase_and_ok_skips_the_limits(make_pipeline):
    p = make_pipeline(edge={"access": {"client": ["127.0.0.5 reject", "127.0.0.6 ok"],
                                       "sender": ["spam.example reject 550 5.7.1 no mail from you"],
                                       "helo": ["localhost tempfail"]},
                            "rate_limits": {"connection_rate": 1}})
    with Client(p.edge.port, source="127.0.0.5") as c:
        assert (c.greeting.code, c.greeting.enhanced) == (554, "5.7.1")
        assert c.greeting.text == "<127.0.0.5>: Client host rejected: Access denied"
    for _ in range(3):                                  # ok: the connection rate is not counted
        with Client(p.edge.port, source="127.0.0.6") as c:
            assert c.greeting.code == 220
    with Client(p.edge.port, source="127.0.0.7") as c:
        r = c.cmd("EHLO localhost")
        assert (r.code, r.enhanced) == (450, "4.7.1"), r
        c.ehlo("client.example.net")
        r = c.cmd("MAIL FROM:<x@spam.example>")
        assert (r.code, r.enhanced, r.text) == (550, "5.7.1", "no mail from you"), r
        assert c.cmd("MAIL FROM:<x@fine.example>").code == 250
