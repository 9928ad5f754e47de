"""TLS as administrators expect: TLS 1.2 and 1.3 only by default, forward-secret ciphers
only, both configurable, judged against real clients on STARTTLS."""
from __future__ import annotations

import ssl

import pytest

from tests.integration.helpers import Client


def handshake(port: int, *, maximum=None, minimum=None, ciphers=None) -> ssl.SSLSocket:
    c = Client(port)
    c.ehlo()
    assert c.cmd("STARTTLS").code == 220
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers)
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    return ctx.wrap_socket(c.sock)


def refused(port: int, **kw) -> ssl.SSLError:
    with pytest.raises(ssl.SSLError) as e:
        handshake(port, **kw).close()
    # the server refused it: an alert from it, not a client that could not even try
    assert "NO_PROTOCOLS_AVAILABLE" not in str(e.value) and "NO_CIPHERS_AVAILABLE" not in str(e.value), e.value
    return e.value


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")   # the old client, on purpose
def test_defaults_take_tls_1_2_and_1_3_with_forward_secrecy_only(shared_pipeline):
    port = shared_pipeline.edge.port
    with handshake(port) as s:
        assert s.version() == "TLSv1.3"
    with handshake(port, maximum=ssl.TLSVersion.TLSv1_2) as s:
        assert s.version() == "TLSv1.2" and s.cipher()[0].startswith(("ECDHE-", "DHE-")), s.cipher()
    refused(port, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")
    refused(port, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256:AES256-SHA")   # RSA key exchange


def test_the_floor_and_the_ciphers_are_configurable(make_pipeline):
    p = make_pipeline(edge={"server": {"tls_min_version": "TLSv1.3"}})
    refused(p.edge.port, maximum=ssl.TLSVersion.TLSv1_2)
    with handshake(p.edge.port) as s:
        assert s.version() == "TLSv1.3"
