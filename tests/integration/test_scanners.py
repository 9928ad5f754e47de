"""clamd, spamd and rspamd killed in the middle of a load through the three tiers: every
message the edge's clients sent got 250 or the declared 451, and every 250 was delivered, once.

The model for any outside component a check asks at end of data: senders in
threads keep the pipeline busy, the daemon is SIGKILLed (children and all) once a third of
the replies are in, and the load runs on.  Then each message's final reply is held against
the mailbox: a 250 must be there exactly once (nothing acknowledged is lost), anything else
must be the mode's 4xx and absent; and the mode must have been seen at work after the kill.
"""
from __future__ import annotations

import threading

from tests.integration.helpers import DOMAIN, message, parse_mail, transaction
from tests.integration.helpers import test_nameserver as nameserver
from tests.clamd import clamd  # noqa: F401  (the fixture)
from tests.rspamd import rspamd  # noqa: F401  (the fixture)
from tests.spamd import spamd  # noqa: F401  (the fixture)

MESSAGES = 30
SENDERS = 3
BOB = f"bob@{DOMAIN}"


def load(port: int, kill, messages: int = MESSAGES, senders: int = SENDERS) -> dict[str, object]:
    """`messages` transactions from `senders` threads; `kill()` once a third have their reply.
    Each subject's final reply (or the exception its client met)."""
    replies: dict[str, object] = {}
    lock = threading.Lock()
    killed = threading.Event()
    subjects = iter(f"load-{i:03d}" for i in range(messages))

    def sender() -> None:
        while True:
            with lock:
                subject = next(subjects, None)
            if subject is None:
                return
            try:
                final = transaction(port, "sender@example.net", [BOB],
                                    message(subject, to=BOB))[-1]
            except Exception as e:            # the client's own trouble: recorded, judged below
                final = e
            with lock:
                replies[subject] = final
                due = len(replies) >= messages // 3 and not killed.is_set()
                if due:
                    killed.set()
            if due:
                kill()

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert killed.is_set() and len(replies) == messages, replies
    return replies


def delivered(p, user: str) -> dict[str, list[str]]:
    """Subject -> the X-Spam-Status field of each copy in `user`'s mailbox."""
    out: dict[str, list[str]] = {}
    for path in p.messages(user):
        mail = parse_mail(path)
        out.setdefault(str(mail["Subject"]), []).append(" ".join(str(mail.get("X-Spam-Status", "")).split()))
    return out


def check_nothing_lost(p, replies, tempfail_ok: bool) -> dict[str, list[str]]:
    accepted = sorted(s for s, r in replies.items() if getattr(r, "code", None) == 250)
    refused = {s: r for s, r in replies.items() if s not in accepted}
    for subject, r in refused.items():
        assert tempfail_ok and (r.code, r.enhanced) == (451, "4.7.1"), (subject, r)
    p.wait_messages(BOB, len(accepted), timeout=60)
    mailbox = delivered(p, BOB)
    assert sorted(mailbox) == accepted, (sorted(mailbox), accepted)        # each 250 there, nothing else
    assert all(len(copies) == 1 for copies in mailbox.values()), mailbox   # and once
    return mailbox


def test_spamd_killed_mid_load_tempfails_and_loses_nothing(make_pipeline, spamd):
    server = spamd()
    p = make_pipeline(filter={"spamd": {"servers": [server.address], "timeout": 5, "on_failure": "tempfail"}})
    replies = load(p.edge.port, server.kill)
    mailbox = check_nothing_lost(p, replies, tempfail_ok=True)
    assert any("SPAMD(" in status for copies in mailbox.values() for status in copies), mailbox
    assert any(getattr(r, "code", None) == 451 for r in replies.values()), replies   # the mode, after the kill
    p.filter.wait_log(r"spamd=-?[0-9.]+/5 \(")                     # a scanned message's log line
    p.filter.wait_log(r"spamd: no server answered .*; tempfail")


def test_rspamd_killed_mid_load_fails_open_and_loses_nothing(make_pipeline, rspamd):
    server = rspamd(int(nameserver().rsplit(":", 1)[1]))
    p = make_pipeline(filter={"rspamd": {"servers": [server.address], "timeout": 5}})
    replies = load(p.edge.port, server.kill)
    assert all(getattr(r, "code", None) == 250 for r in replies.values()), replies
    mailbox = check_nothing_lost(p, replies, tempfail_ok=False)
    statuses = [status for copies in mailbox.values() for status in copies]
    assert any("RSPAMD(" in s for s in statuses) and any("RSPAMD_FAIL(" in s for s in statuses), statuses
    p.filter.wait_log(r"rspamd: no server answered .*; accepted unscanned")


def test_clamd_killed_mid_load_tempfails_and_loses_nothing(make_pipeline, clamd):
    server = clamd()
    p = make_pipeline(filter={"antivirus": {"servers": [server.address], "timeout": 5}})
    replies = load(p.edge.port, server.kill)
    mailbox = check_nothing_lost(p, replies, tempfail_ok=True)
    assert mailbox and any(getattr(r, "code", None) == 451 for r in replies.values()), replies
    p.filter.wait_log(r"antivirus: no clamd answered .*; tempfail")
