"""The edge's forward-confirmed reverse name, against a real DNS server.

The edge asks the test DNS server (never the machine's resolver) for the PTR of
127.0.0.1 and the A record of that name; a name that resolves back is the
client's name in the edge's log, in its Received header and, through XCLIENT,
in the filter's.
"""
from __future__ import annotations

import pytest

from tests.dnsserver import start_dns_server
from tests.integration.helpers import DOMAIN, message, received_by, transaction

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


@pytest.mark.parametrize("forward, expected", [("127.0.0.1", "relay-client.test"),    # verified
                                               ("127.0.0.99", "unknown")])             # PTR lies
def test_edge_names_the_client_by_its_verified_reverse_name(tmp_path, make_pipeline, forward, expected):
    dns = start_dns_server(tmp_path / "dns", {
        "0.0.127.in-addr.arpa": [("1", "PTR", "relay-client.test.")],
        "test": [("relay-client", "A", forward)],
    })
    try:
        p = make_pipeline(edge={"server": {"reverse_lookup": True},
                                "dns": {"nameservers": [f"{dns.host}:{dns.port}"], "timeout": 3}})
        replies = transaction(p.edge.port, "sender@example.net", [ALICE], message("rdns"), helo="helo.example")
        assert replies[-1].code == 250, replies
        path = p.wait_messages(ALICE, 1)[-1]
        assert received_by(path, "edge").startswith(f"from helo.example ({expected} [127.0.0.1])")
        assert received_by(path, "filter").startswith(f"from helo.example ({expected} [127.0.0.1])")
        assert p.edge.log_lines(f"connect from {expected}[127.0.0.1]")
        if expected == "unknown":
            assert p.edge.log_lines("reverse name of 127.0.0.1: unverified (ptr relay-client.test)")
    finally:
        dns.stop()
