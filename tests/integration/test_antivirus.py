"""A virus through the three tiers: refused to the original client at end of data, nothing queued;
clamd stopped: 451 and nothing accepted is lost."""
from __future__ import annotations

import time

from tests.clamd import clamd  # noqa: F401  (the fixture)
from tests.clamd import EICAR, TEST_VIRUS
from tests.filter.mailauth import attachment, message
from tests.integration.helpers import DOMAIN, transaction


def test_eicar_is_refused_at_the_edge_client_and_clean_mail_delivered(make_pipeline, clamd):
    av = clamd()
    p = make_pipeline(filter={"antivirus": {"servers": [av.address], "timeout": 5}})
    bob = f"bob@{DOMAIN}"
    final = transaction(p.edge.port, "a@example.net", [bob], attachment(EICAR, "eicar.com"))[-1]
    assert (final.code, final.enhanced) == (554, "5.7.1") and "Eicar-Test-Signature" in final.text, final
    p.filter.wait_log(r"reject: END-OF-MESSAGE: 554 5\.7\.1 Virus found: Eicar-Test-Signature.*antivirus=infected")
    assert "a@example.net" not in p.filter.queue("list").stdout
    final = transaction(p.edge.port, "a@example.net", [bob], message(sender="a@example.net", to=bob))[-1]
    assert final.code == 250, final
    p.wait_messages(bob, 1)
    av.stop()
    final = transaction(p.edge.port, "a@example.net", [bob], message(sender="a@example.net", to=bob))[-1]
    assert (final.code, final.enhanced) == (451, "4.7.1"), final
    time.sleep(0.5)
    assert len(p.messages(bob)) == 1


def test_every_shape_of_attachment_is_refused_at_the_edge_client(make_pipeline, clamd):
    """EICAR as base64, in a nested multipart, in a zip (clamd unpacks it), and our own test
    signature inside a text attachment: 554 5.7.1 naming the signature to the edge's client,
    in one pipeline, nothing delivered."""
    from tests.filter.test_antivirus import zipped
    av = clamd()
    p = make_pipeline(filter={"antivirus": {"servers": [av.address], "timeout": 5}})
    bob = f"bob@{DOMAIN}"
    shapes = {"base64": (attachment(EICAR, "eicar.com"), "Eicar-Test-Signature"),
              "nested": (attachment(EICAR, "eicar.com", nested=True), "Eicar-Test-Signature"),
              "zip": (attachment(zipped(EICAR), "eicar.zip"), "Eicar-Test-Signature"),
              "own": (attachment(b"text before " + TEST_VIRUS + b" and after", "note.txt"),
                      "Smarthost-Test-Signature")}
    for shape, (data, name) in shapes.items():
        final = transaction(p.edge.port, "a@example.net", [bob], data)[-1]
        assert (final.code, final.enhanced) == (554, "5.7.1") and name in final.text, (shape, final)
    time.sleep(0.5)
    assert p.messages(bob) == []
