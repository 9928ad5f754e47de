"""The domain tier: hosted domains, users, aliases, delivery into Maildir.

Trusts: XCLIENT/XFORWARD only from ``server.upstream_hosts`` (the filter
tier).  Exposes: an SMTP listener that accepts mail for hosted domains only,
rejects unknown users with 550 5.1.1 at RCPT, and answers 250 only after the
message is fsynced in every recipient's Maildir.
"""
from __future__ import annotations

from domain.maildir import Mailboxes, MaildirSink
from shared.daemon import TierParts, writable_directory


def mailboxes(settings) -> Mailboxes:
    mb = settings["mailboxes"]
    return Mailboxes(mb["maildir_root"], mb["domains"], mb["users"], mb["aliases"])


def build(settings, reactor, pool, dry_run: bool = False) -> TierParts:
    if dry_run:
        return TierParts(sink=None, checks=[])
    with writable_directory(settings, "mailboxes", "maildir_root"):
        sink = MaildirSink(mailboxes(settings), pool=pool, hostname=settings.hostname,
                           fsync=settings["queue"]["fsync"])

    def reload(new) -> None:
        sink.mailboxes = mailboxes(new)

    return TierParts(sink=sink, checks=[], reload=reload, stop=sink.close)
