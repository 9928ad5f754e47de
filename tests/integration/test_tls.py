"""TLS as administrators expect, judged against real clients (Python's ssl, openssl
s_client): TLS 1.2 and 1.3 only by default, forward-secret ciphers only, both
configurable; certificates chosen by SNI, per listener, read again on SIGHUP; client
certificates asked for and judged by fingerprint for relaying; new TLS sessions per
client and time unit limited."""
from __future__ import annotations

import hashlib
import re
import signal
import ssl
import subprocess
from pathlib import Path

import pytest

from shared.smtp.reply import Reply
from tests.integration.helpers import (DOMAIN, OTHER_DOMAIN, Client, free_port, message, self_signed,
                                       smarthost)


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


# -- certificates chosen by SNI ---------------------------------------------------------------

def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def fingerprint(cert: Path) -> str:
    """The SHA-256 fingerprint as the TLS log line writes it."""
    digest = hashlib.sha256(der(cert)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))


def sni(pairs: dict[str, tuple[Path, Path]]) -> list[str]:
    return [f"{name} {cert} {key}" for name, (cert, key) in pairs.items()]


def served(port: int, name: str | None, *, implicit: bool = False) -> bytes:
    """The certificate the listener presents to a client asking for `name` (None: no SNI)."""
    with Client(port, implicit_tls=implicit, server_name=name) as c:
        if not implicit:
            c.ehlo()
            assert c.cmd("STARTTLS").code == 220
            c.starttls(server_name=name)
        return c.server_certificate()


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("sni")
    return {name: self_signed(root / name.replace("*", "star"), name)
            for name in ("mail.example.org", "smtp.example.net", "*.example.org", "other.example.org")}


def with_listeners(p, **more) -> dict:
    """[listeners.mx] on the edge's port, plus `more`, each {"port": N, key: value...}."""
    tables = {"mx": {"endpoint": f"tcp:port={p.edge.port}:interface=127.0.0.1"}}
    for name, keys in more.items():
        keys = dict(keys)
        tables[name] = {"endpoint": f"tcp:port={keys.pop('port')}:interface=127.0.0.1", **keys}
    return {"server": {"listen": None}, "listeners": tables}


def test_sni_picks_the_certificate_by_name_and_each_listener_may_have_its_own(make_pipeline, names, edge_tls):
    p = make_pipeline(start=())
    implicit, own = free_port(), free_port()
    wanted = {n: names[n] for n in ("mail.example.org", "smtp.example.net", "*.example.org")}
    p.edge.write_config({**with_listeners(p, smtps={"port": implicit, "tls": "implicit"},
                                          special={"port": own, "tls_sni": sni({"mail.example.org":
                                                                               names["other.example.org"]})}),
                         "server": {"listen": None, "tls_sni": sni(wanted)}})
    p.start()
    default = der(edge_tls[0])
    for port, implicit_tls in ((p.edge.port, False), (implicit, True)):     # STARTTLS and port 465 alike
        assert served(port, "mail.example.org", implicit=implicit_tls) == der(names["mail.example.org"][0])
        assert served(port, "MAIL.example.ORG", implicit=implicit_tls) == der(names["mail.example.org"][0])
        assert served(port, "smtp.example.net", implicit=implicit_tls) == der(names["smtp.example.net"][0])
        assert served(port, "relay.example.org", implicit=implicit_tls) == der(names["*.example.org"][0])
        assert served(port, "a.relay.example.org", implicit=implicit_tls) == default   # one label only
        assert served(port, "example.org", implicit=implicit_tls) == default
        assert served(port, "unknown.example.com", implicit=implicit_tls) == default
        assert served(port, None, implicit=implicit_tls) == default                   # no SNI at all
    # the listener with tls_sni of its own: its list replaces the global one
    assert served(own, "mail.example.org") == der(names["other.example.org"][0])
    assert served(own, "relay.example.org") == default
    # and the session goes on over the chosen certificate's TLS
    with Client(p.edge.port) as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
        c.starttls(server_name="smtp.example.net")
        assert c.ehlo().code == 250
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert c.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250


def test_sni_certificates_are_read_again_on_sighup_and_open_sessions_keep_theirs(make_pipeline, tmp_path):
    p = make_pipeline(start=())
    directory = tmp_path / "mail"
    cert, key = self_signed(directory, "mail.example.org")
    p.edge.write_config({"server": {"tls_sni": [f"mail.example.org {cert} {key}"]}})
    p.start()
    old = der(cert)
    held = Client(p.edge.port)
    held.ehlo()
    assert held.cmd("STARTTLS").code == 220
    held.starttls(server_name="mail.example.org")
    assert held.server_certificate() == old
    assert held.ehlo().code == 250
    self_signed(directory, "mail.example.org")          # renewed in place, as certbot does
    new = der(cert)
    assert new != old
    mark = p.edge.log_size()
    p.edge.signal(signal.SIGHUP)
    p.edge.wait_log(r"configuration reloaded from ", since=mark)
    assert served(p.edge.port, "mail.example.org") == new
    # the session opened before the reload goes on, over its own handshake's certificate
    with held:
        assert held.server_certificate() == old
        assert held.cmd("MAIL FROM:<sender@example.net>").code == 250
        assert held.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250
        assert held.cmd("DATA").code == 354
        held.send(message("across a reload") + b".\r\n")
        assert held.reply().code == 250
    # a pair that does not go together: the reload is refused, the running certificates stay
    other = self_signed(tmp_path / "other", "mail.example.org")
    p.edge.write_config({"server": {"tls_sni": [f"mail.example.org {cert} {other[1]}"]}})
    mark = p.edge.log_size()
    p.edge.signal(signal.SIGHUP)
    p.edge.wait_log(rf"reload refused, keeping the running configuration: {re.escape(str(p.edge.config_path))}: "
                    rf"server\.tls_sni: mail\.example\.org: {re.escape(str(other[1]))} does not go with "
                    rf"certificate {re.escape(str(cert))}", since=mark)
    assert served(p.edge.port, "mail.example.org") == new


@pytest.mark.parametrize("entry, reason", [
    ("mail.example.org {cert} {other_key}", "server.tls_sni: mail.example.org: {other_key} does not go with "
                                            "certificate {cert}"),
    ("mail.example.org {cert} {missing}", "server.tls_sni: mail.example.org: {missing} does not exist"),
    ("mail.example.org {key} {key}", "server.tls_sni: mail.example.org: no PEM certificate in {key}"),
    ("mail.example.org {cert}", "server.tls_sni: 'mail.example.org {cert}' is not 'NAME CERT KEY'"),
    ("*.org {cert} {key}", "server.tls_sni: '*.org {cert} {key}': '*.org' is not a server name"),
])
def test_a_bad_sni_entry_is_refused_naming_the_key(make_pipeline, tmp_path, entry, reason):
    p = make_pipeline(start=())
    cert, key = self_signed(tmp_path / "a", "mail.example.org")
    paths = {"cert": cert, "key": key, "other_key": self_signed(tmp_path / "b", "mail.example.org")[1],
             "missing": tmp_path / "missing.pem"}
    p.edge.write_config({"server": {"tls_sni": [entry.format(**paths)]}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 2
    assert f"smarthost check-config: {p.edge.config_path}: {reason.format(**paths)}" in out.stderr, out.stderr
    p.edge.start(wait=False)                            # the daemon refuses it as check-config does
    assert p.edge.wait_exit() == 2
    assert reason.format(**paths) in p.edge.output_text()


# -- client certificates ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("clients")
    ca = self_signed(root / "ca", "Test Client CA", ca=True)
    return {"ca": ca, "listed": self_signed(root / "listed", "listed.example.net"),
            "unlisted": self_signed(root / "unlisted", "unlisted.example.net"),
            "issued": self_signed(root / "issued", "issued.example.net", issuer=ca)}


def s_client(port: int) -> str:
    """What openssl s_client tells of the handshake after STARTTLS (no client certificate)."""
    out = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
                          "-servername", "mail.example.org"], input="QUIT\n", capture_output=True, text=True,
                         timeout=30)
    assert "-----BEGIN CERTIFICATE-----" in out.stdout, out.stdout + out.stderr
    return out.stdout


def relay_as(port: int, certificate, *, tls: bool = True) -> tuple[Reply, Reply | None]:
    """RCPT to a domain the edge does not host, with `certificate` presented (or none):
    the RCPT reply, and the reply to the message if it was accepted."""
    with Client(port) as c:
        c.ehlo()
        if tls:
            assert c.cmd("STARTTLS").code == 220
            c.starttls(certificate=certificate)
            c.ehlo()
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        r = c.cmd(f"RCPT TO:<{CAROL}>")
        if r.code != 250:
            return r, None
        assert c.cmd("DATA").code == 354
        c.send(message("by certificate", to=CAROL) + b".\r\n")
        return r, c.reply()


CAROL = f"carol@{OTHER_DOMAIN}"       # the domain tier has her; the edge relays to her only when permitted


def test_a_listed_client_certificate_permits_relaying_and_others_do_not(make_pipeline, clients):
    p = make_pipeline(filter={"relay": {"relay_domains": [DOMAIN, OTHER_DOMAIN]}}, start=())
    plain, with_ca = free_port(), free_port()
    listed = fingerprint(clients["listed"][0])
    p.edge.write_config({**with_listeners(p, plain={"port": plain, "tls_client_certificates": "none"},
                                          verified={"port": with_ca, "tls_client_ca": str(clients["ca"][0])}),
                         "server": {"listen": None, "tls_client_certificates": "ask"},
                         "relay": {"client_certificates": [listed.replace(":", "").lower(),
                                                           fingerprint(clients["issued"][0])]},
                         "policies": {"default": {"relay": ["relay_domains", "mynetworks", "authenticated",
                                                            "client_certificate"]}}})
    p.start()
    # asked for on an "ask" listener (any CA: none named), not on the one that does not ask
    asked = s_client(p.edge.port)
    assert "No client certificate CA names sent" in asked and "Requested Signature Algorithms" in asked
    assert "Requested Signature Algorithms" not in s_client(plain)
    assert "Acceptable client certificate CA names\nCN = Test Client CA\n" in s_client(with_ca)
    # listed: relayed, end to end
    rcpt, done = relay_as(p.edge.port, clients["listed"])
    assert (rcpt.code, done.code) == (250, 250), (rcpt, done)
    p.edge.wait_log(rf"TLS connection from unknown\[127\.0\.0\.1\]: TLSv1\.3 \S+ \d+/\d+ bits; client certificate "
                    rf"SHA256 {listed} \(unverified\)")
    assert "by certificate" in p.wait_messages(CAROL, 1)[0].read_text()
    # unlisted, none, no TLS, or not asked for: no relay
    for port, certificate, tls in ((p.edge.port, clients["unlisted"], True), (p.edge.port, None, True),
                                   (p.edge.port, None, False), (plain, clients["listed"], True)):
        rcpt, _ = relay_as(port, certificate, tls=tls)
        assert (rcpt.code, rcpt.enhanced) == (554, "5.7.1"), (port, certificate, rcpt)
    p.edge.wait_log(rf"client certificate SHA256 {fingerprint(clients['unlisted'][0])} \(unverified\)")
    # with tls_client_ca: what chains to it counts; a listed certificate that does not is ignored
    rcpt, done = relay_as(with_ca, clients["issued"])
    assert (rcpt.code, done.code) == (250, 250), (rcpt, done)
    p.edge.wait_log(rf"client certificate SHA256 {fingerprint(clients['issued'][0])} \(verified\)")
    rcpt, _ = relay_as(with_ca, clients["listed"])
    assert (rcpt.code, rcpt.enhanced) == (554, "5.7.1"), rcpt
    p.edge.wait_log(rf"client certificate SHA256 {listed} \(does not verify against tls_client_ca: ignored\)")
    assert "Traceback" not in p.edge.log_text()


def test_client_certificate_keys_are_checked_at_load(make_pipeline):
    p = make_pipeline(start=())
    p.edge.write_config({"relay": {"client_certificates": ["AB:CD"]}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 2
    assert f"{p.edge.config_path}: relay.client_certificates: 'AB:CD' is not a SHA-256 fingerprint" in out.stderr
    p.filter.write_config({"relay": {"client_certificates": ["AB" * 32]}})
    out = smarthost("check-config", str(p.filter.config_path))
    assert out.returncode == 2
    assert f"{p.filter.config_path}: relay.client_certificates: the edge's: the filter tier never sees" \
        in out.stderr
    p.filter.write_config({"relay": {"client_certificates": None},
                           "policies": {"default": {"relay": ["relay_domains", "client_certificate"]}}})
    out = smarthost("check-config", str(p.filter.config_path))
    assert out.returncode == 2 and "unknown relay permit rule 'client_certificate'" in out.stderr
    p.edge.write_config({"relay": {"client_certificates": ["AB" * 32]},
                         "policies": {"default": {"relay": ["relay_domains", "client_certificate"]}}})
    out = smarthost("check-config", str(p.edge.config_path))
    assert out.returncode == 0, out.stderr
    assert "policies.default.relay: client_certificate permits nobody: no listener of this policy asks" \
        in out.stderr
    assert f'client_certificates = ["{":".join(["AB"] * 32)}"]' in out.stdout


# -- new TLS sessions per time unit ---------------------------------------------------------------

def test_tls_rate_refuses_starttls_454_and_closes_implicit_tls_421(make_pipeline):
    p = make_pipeline(start=())
    implicit = free_port()
    p.edge.write_config({**with_listeners(p, smtps={"port": implicit, "tls": "implicit"}),
                         "rate_limits": {"tls_rate": 2, "time_unit": 60}})
    p.start()
    for _ in range(2):
        with Client(p.edge.port, source="127.0.0.2") as c:
            c.ehlo()
            assert c.cmd("STARTTLS").code == 220
            c.starttls()
            assert c.ehlo().code == 250
    with Client(p.edge.port, source="127.0.0.2") as c:
        c.ehlo()
        r = c.cmd("STARTTLS")
        assert (r.code, r.enhanced, r.text) == (454, "4.7.0", "Error: too many new TLS sessions from 127.0.0.2")
        assert c.cmd("NOOP").code == 250                     # the session goes on, in plaintext
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
    p.edge.wait_log(r"rate limit: tls_rate 2/60s exceeded by 127\.0\.0\.2: 454 4\.7\.0 Error: too many new TLS "
                    r"sessions from 127\.0\.0\.2")
    p.edge.wait_log(r"reject: STARTTLS from unknown\[127\.0\.0\.2\]: 454 4\.7\.0 ")
    # port 465: every connection is a new TLS session, counted with the STARTTLS ones
    for _ in range(2):
        with Client(implicit, source="127.0.0.3", implicit_tls=True) as c:
            assert c.greeting.code == 220
    with Client(implicit, source="127.0.0.3", implicit_tls=True) as c:
        g = c.greeting
        assert (g.code, g.enhanced, g.text) == (421, "4.7.0", "edge.example.test Error: too many new TLS "
                                                              "sessions from 127.0.0.3")
        assert c.closed_by_server()
    with Client(p.edge.port, source="127.0.0.3") as c:
        c.ehlo()
        assert c.cmd("STARTTLS").code == 454
    with Client(p.edge.port, source="127.0.0.4") as c:    # another client: its own count
        c.ehlo()
        assert c.cmd("STARTTLS").code == 220
