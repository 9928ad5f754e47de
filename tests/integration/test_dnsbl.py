"""The edge's dnsbl check against a real DNS server and real clients on loopback addresses.

The edge's ``[dns] nameservers`` is the test DNS server; clients connect from
127.0.0.2 and 127.0.0.7 (every 127/8 address is the loopback interface's, so the
client socket can be bound to it): the first is listed in both zones and is
refused at connect, the second in neither and is greeted.  A client an allowlist
vouches for is greeted without the pregreet wait of its listener.
"""
from __future__ import annotations

import socket
import time

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



def test_an_allowlisted_client_skips_the_pregreet_wait(tmp_path, make_pipeline):
    dns = start_dns_server(tmp_path / "dns", {"wl.example": [("6.0.0.127", "A", "127.0.10.2")]})
    try:
        p = make_pipeline(start=())
        p.edge.write_config({
            "server": {"listen": None},
            "listeners": {"mx": {"endpoint": f"tcp:port={p.edge.port}:interface=127.0.0.1", "greet_wait": 3}},
            "dns": {"nameservers": [f"{dns.host}:{dns.port}"], "timeout": 2},
            "dnsbl": {"zones": ["wl.example=127.0.[0..255].[1..3]*-5"], "allowlist_threshold": -1}})
        p.start(("edge",))
        for client, waits in (("127.0.0.6", False), ("127.0.0.7", True)):
            with socket.create_connection(("127.0.0.1", p.edge.port), timeout=10, source_address=(client, 0)) as s:
                f = s.makefile("rb")
                assert f.readline() == b"220-edge.example.test ESMTP\r\n"
                start = time.monotonic()
                assert f.readline().startswith(b"220 edge.example.test")
                assert (time.monotonic() - start > 2.5) is waits, client
                s.sendall(b"EHLO client.example.net\r\n")
                assert f.readline().startswith(b"250-")
        p.edge.wait_log(r"dnsbl: score -5 for \[127\.0\.0\.6\]:\d+ \(allowlist threshold -1; "
                        r"wl\.example=127\.0\.\[0\.\.255\]\.\[1\.\.3\]\*-5\): allowlisted")
    finally:
        dns.stop()
