"""The domain tier: hosted domains, users, aliases, delivery into Maildir.

Trusts: XCLIENT/XFORWARD only from ``server.upstream_hosts`` (the filter
tier).  Exposes: an SMTP listener that accepts mail for hosted domains only,
rejects unknown users with 550 5.1.1 at RCPT, and answers 250 only after the
message is fsynced in every recipient's Maildir.
"""
from __future__ import annotations

from domain.maildir import MAILBOXES, Mailboxes, MaildirSink
from shared.checks.helo import HELO_NAME
from shared.config.schema import TierSpec
from shared.daemon import writable_directory
from shared.tier import Component, Configured


def mailboxes(settings) -> Mailboxes:
    mb = settings.mailboxes
    return Mailboxes(mb.maildir_root, mb.domains, mb.users, mb.aliases)


class Domain(Component):
    """The Maildir sink (its spool of messages being received) lives as long as the
    process; the mailboxes (domains, users, aliases) change on reload."""

    def __init__(self, settings, reactor, pool) -> None:
        with writable_directory(settings, "mailboxes", "maildir_root"):
            self.sink = MaildirSink(mailboxes(settings), pool=pool, hostname=settings.hostname,
                                    fsync=settings.mailboxes.fsync)

    def configure(self, settings, ctx) -> Configured:
        return Configured(sink=self.sink.with_mailboxes(mailboxes(settings)))

    def stop(self):
        self.sink.close()


TIER = TierSpec("domain", sections=(MAILBOXES,), checks=(HELO_NAME,), component=Domain)
