"""Listeners: several per tier, each a Twisted endpoint description with its own policy;
implicit TLS and the PROXY protocol; connection limits across all listeners; the client's
TLS on the log line, in the Received field and downstream in XCLIENT."""
from __future__ import annotations

import socket
import ssl

from tests.integration.helpers import (DOMAIN, Client, free_port, message, smarthost, transaction,
                                       wait_until)


def listeners(edge_port: int, **more) -> dict:
    """Edge overrides: server.listen replaced by [listeners.mx] on the tier's port, plus `more`."""
    return {"server": {"listen": None},
            "listeners": {"mx": {"endpoint": f"tcp:port={edge_port}:interface=127.0.0.1"}, **more}}


def test_each_listener_follows_its_own_policy(make_pipeline):
    p = make_pipeline(start=())
    strict = free_port()
    p.edge.write_config({**listeners(p.edge.port, strict={"endpoint": f"tcp:port={strict}:interface=127.0.0.1",
                                                          "policy": "strict"}),
                         "policies": {"strict": {"helo": ["helo_name"]}}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 0, out.stderr
    assert f"#   listener strict: tcp:port={strict}:interface=127.0.0.1 (mx; tls starttls; auth off), policy strict" \
        in out.stdout
    assert "#   policy strict:\n#     connect      1. access (off): " in out.stdout
    assert "\n#     connect      2. rate_limits (off): " in out.stdout
    assert "\n#     connect      3. dnsbl (off): " in out.stdout
    assert "\n#     helo         1. helo_name (timeout 30s): " in out.stdout
    p.start()
    with Client(strict) as c:
        r = c.cmd("EHLO localhost")
        assert (r.code, r.enhanced) == (504, "5.5.2") and "need fully-qualified hostname" in r.text, r
        assert c.cmd("EHLO client.example.net").code == 250
    with Client(p.edge.port) as c:
        assert c.cmd("EHLO localhost").code == 250           # the default policy has no HELO check
    p.edge.wait_log(r"listening on 127\.0\.0\.1:%d \(strict: mx, policy strict, tls starttls, auth off\)" % strict)


def test_a_proxy_protocol_listener_sees_the_balancers_client(make_pipeline):
    p = make_pipeline(start=())
    proxied = free_port()
    p.edge.write_config(listeners(p.edge.port, lb={"endpoint": f"haproxy:tcp:port={proxied}:interface=127.0.0.1", "proxy_hosts": ["127.0.0.1"], "proxy_hosts": ["127.0.0.1"]}))
    p.start()
    with socket.create_connection(("127.0.0.1", proxied), timeout=10) as s:
        s.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40123 25\r\n")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.example.net\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"QUIT\r\n")
    p.edge.wait_log(r"connect from unknown\[203\.0\.113\.9\]")
    # from anyone but the balancer, the header is not believed: disconnected at once
    with socket.create_connection(("127.0.0.1", proxied), timeout=10, source_address=("127.0.0.8", 0)) as s:
        s.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 40123 25\r\n")
        try:
            assert s.recv(100) == b""                   # no greeting: closed
        except ConnectionResetError:                    # (or reset: it had sent what was unread)
            pass
    p.edge.wait_log(r"127\.0\.0\.8: PROXY protocol listener: not one of its proxy_hosts; closed")


def test_connection_limits_count_all_listeners_together(make_pipeline):
    p = make_pipeline(start=())
    second = free_port()
    p.edge.write_config({**listeners(p.edge.port, second={"endpoint": f"tcp:port={second}:interface=127.0.0.1"}),
                         "server": {"listen": None, "max_connections_per_client": 1}})
    p.start()

    def greeted(port) -> bool:
        with Client(port) as c:
            return c.greeting.code == 220

    def held(port) -> Client | None:
        c = Client(port)
        if c.greeting.code == 220:
            return c
        c.close()
        return None
    first = wait_until(lambda: held(p.edge.port), 5, "the start-up probes' sessions to end")
    with first:
        with Client(second) as other:
            assert (other.greeting.code, other.greeting.enhanced) == (421, "4.7.0"), other.greeting
            assert "too many connections from 127.0.0.1" in other.greeting.text
    wait_until(lambda: greeted(second), 5, "the second listener to take a session again")


def _implicit_tls_session(port: int) -> tuple[ssl.SSLSocket, object]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    return s, s.makefile("rb")


def test_implicit_tls_listener_and_the_clients_tls_travels_downstream(make_pipeline):
    p = make_pipeline(start=())
    submissions = free_port()
    p.edge.write_config(listeners(p.edge.port, submissions={
        "endpoint": f"tcp:port={submissions}:interface=127.0.0.1", "tls": "implicit"}))
    p.start()
    s, f = _implicit_tls_session(submissions)
    with s:
        assert f.readline().startswith(b"220 "), "greeting over TLS from the first byte"
        s.sendall(b"EHLO client.example.net\r\n")
        ehlo = []
        while not (line := f.readline()).startswith(b"250 "):
            ehlo.append(line)
        assert not any(b"STARTTLS" in ln for ln in ehlo)          # TLS already
        version = s.version()
        for cmd in (b"MAIL FROM:<sender@example.net>", f"RCPT TO:<alice@{DOMAIN}>".encode(), b"DATA"):
            s.sendall(cmd + b"\r\n")
            assert f.readline()[:1] in (b"2", b"3")
        s.sendall(message("implicit tls") + b".\r\n")
        assert f.readline().startswith(b"250 ")
        s.sendall(b"QUIT\r\n")
    p.edge.wait_log(rf"TLS connection from unknown\[127\.0\.0\.1\]: {version} ")
    p.filter.wait_log(rf"xclient from 127\.0\.0\.1: client=unknown\[127\.0\.0\.1\] helo=client\.example\.net "
                      rf"tls={version} ")
    mail = p.wait_messages(f"alice@{DOMAIN}", 1)[0].read_text()
    assert f"(using {version} with cipher " in mail
    assert mail.count("(using ") == 2        # the edge's Received and the filter's (the original client's TLS)


def test_a_plain_listener_never_claims_tls(pipeline):
    replies = transaction(pipeline.edge.port, "sender@example.net", [f"alice@{DOMAIN}"], message("plain"))
    assert replies[-1].code == 250, replies
    mail = pipeline.wait_messages(f"alice@{DOMAIN}", 1)[0].read_text()
    assert "(using " not in mail and "with ESMTPS" not in mail
    pipeline.filter.wait_log(r"xclient from 127\.0\.0\.1: client=\S+ helo=client\.example\.net tls=none")


def test_firewall_rules_refuse_at_connect_and_files_are_read_again_on_reload(make_pipeline):
    p = make_pipeline(start=())
    feed = p.root / "drop.txt"
    feed.write_text("# a blocklist feed\n127.0.0.3/32\n")
    proxied = free_port()
    p.edge.write_config({**listeners(p.edge.port, lb={"endpoint": f"haproxy:tcp:port={proxied}:interface=127.0.0.1", "proxy_hosts": ["127.0.0.1"],
                                                      "firewall": ["deny 203.0.113.0/24"]}),
                         "server": {"listen": None, "pid_file": str(p.root / "edge.pid")},
                         "firewall": {"rules": ["allow 127.0.0.4", "deny 127.0.0.0/29", f"deny file:{feed}"]}})
    p.start()
    for source, code in (("127.0.0.2", 554), ("127.0.0.3", 554), ("127.0.0.4", 220), ("127.0.0.9", 220)):
        with Client(p.edge.port, source=source) as c:
            assert c.greeting.code == code, (source, c.greeting)
            if code == 554:
                assert c.greeting.enhanced == "5.7.1" and f"access denied for [{source}]" in c.greeting.text
                assert c.closed_by_server()
    p.edge.wait_log(r"firewall: deny \[127\.0\.0\.2\] on mx \(deny 127\.0\.0\.0/29\)")
    # the balancer's client is the one judged, by the listener's own rules
    with socket.create_connection(("127.0.0.1", proxied), timeout=10) as s:
        s.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40123 25\r\n")
        assert s.makefile("rb").readline().startswith(b"554 5.7.1 ")
    # the file changes; a reload reads it again
    p.edge.write_config({"firewall": {"rules": ["allow 127.0.0.4", f"deny file:{feed}"]}})
    feed.write_text("127.0.0.4/32\n")
    assert smarthost("reload", "--config", str(p.edge.config_path)).returncode == 0
    with Client(p.edge.port, source="127.0.0.2") as c:
        assert c.greeting.code == 220
    with Client(p.edge.port, source="127.0.0.4") as c:
        assert c.greeting.code == 220                # allowed by the earlier rule, whatever the file says


def test_pregreet_a_client_that_talks_before_the_greeting_is_refused(make_pipeline):
    p = make_pipeline(start=())
    p.edge.write_config({"server": {"listen": None},
                         "listeners": {"mx": {"endpoint": f"tcp:port={p.edge.port}:interface=127.0.0.1",
                                              "greet_wait": 1}},
                         "relay": {"mynetworks": ["127.0.0.9/32"]}})
    p.start()
    with socket.create_connection(("127.0.0.1", p.edge.port), timeout=10, source_address=("127.0.0.5", 0)) as s:
        f = s.makefile("rb")
        assert f.readline() == b"220-edge.example.test ESMTP\r\n"
        s.sendall(b"EHLO spam.example\r\n")                 # before the rest of the greeting
        assert f.readline().startswith(b"554 5.5.1 ")
        assert f.readline() == b""                          # disconnected
    p.edge.wait_log(r"127\.0\.0\.5: pregreet: 19 octets after 0\.\d\ds: EHLO spam\.example")
    with socket.create_connection(("127.0.0.1", p.edge.port), timeout=10, source_address=("127.0.0.6", 0)) as s:
        f = s.makefile("rb")
        assert f.readline() == b"220-edge.example.test ESMTP\r\n"
        assert f.readline().startswith(b"220 edge.example.test")      # after the wait: the whole greeting
        s.sendall(b"EHLO patient.example\r\n")
        assert f.readline().startswith(b"250-")
    with Client(p.edge.port, source="127.0.0.9") as c:     # mynetworks: no wait
        assert c.greeting.code == 220 and len(c.greeting.text.splitlines()) == 1
