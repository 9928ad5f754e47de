"""The edge's dnsbl check against a real DNS server and real clients on loopback addresses.

The edge's ``[dns] nameservers`` is the test DNS server; clients connect from
127.0.0.2 and 127.0.0.7 (every 127/8 address is the loopback interface's, so the
client socket can be bound to it): the first is listed in both zones and is
refused at connect, the second in neither and is greeted.
"""
from __future__ import annotations

import pytest

from tests.dnsserver import start_dns_server
from tests.integration.helpers import Client, smarthost

pytestmark = pytest.mark.slow

ZONES = {"zen.example": [("2.0.0.127", "A", "127.0.0.2")],
         "bl.example": [("2.0.0.127", "A", "127.0.0.4")]}


def test_a_listed_client_gets_554_at_connect_and_an_unlisted_one_is_greeted(tmp_path, make_pipeline):
    dns = start_dns_server(tmp_path / "dns", ZONES)
    try:
        p = make_pipeline(start=(), edge={"dns": {"nameservers": [f"{dns.host}:{dns.port}"], "timeout": 3},
                                          "dnsbl": {"zones": ["zen.example*2", "bl.example=127.0.0.[2..11]"],
                                                    "threshold": 3}})
        out = smarthost("check-config", str(p.edge.config_path))
        assert out.returncode == 0, out.stderr
        assert "connect      3. dnsbl (timeout 4s): " in out.stdout
        assert "zones zen.example*2, bl.example=127.0.0.[2..11]; threshold 3;" in out.stdout
        p.start(("edge",))
        with Client(p.edge.port, source="127.0.0.2") as c:
            g = c.greeting
            assert (g.code, g.enhanced) == (554, "5.7.1"), g
            assert g.text == "edge.example.test: client [127.0.0.2] is listed by zen.example, bl.example"
            assert c.closed_by_server()
        p.edge.wait_log(r"dnsbl: score 3 for \[127\.0\.0\.2\]:\d+ \(threshold 3; zen\.example\*2, "
                        r"bl\.example=127\.0\.0\.\[2\.\.11\]\): refused with 554 5\.7\.1")
        with Client(p.edge.port, source="127.0.0.7") as c:
            assert c.greeting.code == 220, c.greeting
            c.ehlo()
        assert len(p.edge.log_lines("dnsbl: ")) == 1
    finally:
        dns.stop()
