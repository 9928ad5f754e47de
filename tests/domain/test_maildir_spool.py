"""The domain tier's own spool, MAILDIR_ROOT/.tmp/HOST: the reply when no message
file can be made there is the mailbox's, not the filter queue's."""
from __future__ import annotations

from domain.maildir import CANNOT_WRITE, Mailboxes, MaildirSink
from shared.blocking import InlinePool
from shared.envelope import Envelope, Recipient


class Txn:
    queue_id = "Q1"
    envelope = Envelope(sender="s@example.net", recipients=[])


def test_no_message_file_in_the_spool_is_451_cannot_write_to_mailbox(tmp_path):
    sink = MaildirSink(Mailboxes(str(tmp_path / "mail"), ["example.org"], ["alice@example.org"], {}),
                       pool=InlinePool(), hostname="mx.example.org")
    sink.reserve.close()                      # no file made ahead: data_start creates one in place
    sink.spool.rmdir()                        # and it cannot
    session = sink.session(None)
    session.begin(Txn)
    assert session.rcpt(Txn, Recipient("alice@example.org")) is None
    reply = session.data_start(Txn)
    assert reply == CANNOT_WRITE
    assert str(reply) == "451 4.3.0 Error: cannot write to mailbox, try again later"
