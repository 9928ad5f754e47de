"""DSN parameters (RFC 3461) travel edge -> filter -> next hop unchanged.

The filter's next hop here is a recording SMTP server (a real socket server in
this test process), so the exact MAIL and RCPT lines the filter sends can be read.
"""
from __future__ import annotations

import smtplib
import socketserver
import threading

import pytest

from tests.integration.helpers import DOMAIN, message, wait_until

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"


class Recorder(socketserver.StreamRequestHandler):
    """Answers like a DSN-capable MTA and records every command line."""

    def handle(self):
        w = self.wfile.write
        w(b"220 recorder ESMTP\r\n")
        while line := self.rfile.readline():
            cmd = line.rstrip(b"\r\n")
            self.server.lines.append(cmd)
            verb = cmd.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                w(b"250-recorder\r\n250-PIPELINING\r\n250-DSN\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"DATA":
                w(b"354 go ahead\r\n")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                w(b"250 2.0.0 Ok: queued as REC1\r\n")
            elif verb == b"QUIT":
                w(b"221 2.0.0 Bye\r\n")
                return
            else:
                w(b"250 2.0.0 Ok\r\n")


@pytest.fixture
def recorder():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    server.lines = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_dsn_parameters_reach_the_next_hop(make_pipeline, recorder):
    port = recorder.server_address[1]
    p = make_pipeline(filter={"next_hop": {"hosts": [f"127.0.0.1:{port}"]}, "verify": {"recipients": False}},
                      start=("filter", "edge"))
    with smtplib.SMTP("127.0.0.1", p.edge.port) as s:
        s.ehlo("dsn.example")
        assert s.has_extn("dsn")
        code, _ = s.mail("sender@example.net", ["RET=HDRS", "ENVID=env+2Bid-42"])
        assert code == 250
        code, _ = s.rcpt(ALICE, ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig+2Buser@example.org"])
        assert code == 250
        code, _ = s.data(message("dsn"))
        assert code == 250
    wait_until(lambda: any(ln.startswith(b"RCPT") for ln in recorder.lines), 10, "the filter's delivery")
    mail = next(ln for ln in recorder.lines if ln.startswith(b"MAIL"))
    rcpt = next(ln for ln in recorder.lines if ln.startswith(b"RCPT"))
    assert mail.startswith(b"MAIL FROM:<sender@example.net>")
    assert b" RET=HDRS" in mail and b" ENVID=env+2Bid-42" in mail
    assert rcpt.startswith(f"RCPT TO:<{ALICE}>".encode())
    assert b" NOTIFY=SUCCESS,FAILURE" in rcpt and b" ORCPT=rfc822;orig+2Buser@example.org" in rcpt
