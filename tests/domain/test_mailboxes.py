"""A mailbox path never leaves the maildir root, whatever the directories hold."""
import os

import pytest

from domain.maildir import MailboxOutsideRoot, Mailboxes, MaildirSink
from shared.blocking import InlinePool


def boxes(root, users=("alice@example.org",)) -> Mailboxes:
    return Mailboxes(str(root), ["example.org"], list(users), {})


@pytest.mark.parametrize("user", ["../../../tmp/x@example.org", "a/b@example.org", "..@example.org",
                                  ".hidden@example.org", "a\x00b@example.org", "alice@../example.org"])
def test_a_user_that_is_not_one_directory_name_is_refused(tmp_path, user):
    with pytest.raises(ValueError):
        boxes(tmp_path, [user])


def test_maildir_is_below_the_root(tmp_path):
    assert boxes(tmp_path).maildir("alice@example.org") == f"{tmp_path}/example.org/alice/Maildir"


def test_check_inside_root(tmp_path):
    root = tmp_path / "mail"
    outside = tmp_path / "elsewhere"
    (root / "example.org").mkdir(parents=True)
    outside.mkdir()
    b = boxes(root)
    b.check_inside_root(b.maildir("alice@example.org") + "/new")          # not made yet: fine
    (root / "example.org" / "alice").symlink_to(outside)
    with pytest.raises(MailboxOutsideRoot) as e:
        b.check_inside_root(b.maildir("alice@example.org") + "/new")
    assert isinstance(e.value, OSError) and str(outside) in str(e.value)
    for path in (root, root / "..", root / "example.org" / ".." / ".."):
        with pytest.raises(MailboxOutsideRoot):
            b.check_inside_root(str(path))


def test_a_root_reached_through_a_link_is_still_the_root(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    b = boxes(tmp_path / "link")
    b.check_inside_root(b.maildir("alice@example.org"))


@pytest.mark.parametrize("planted", ["alice", "alice/Maildir", "alice/Maildir/new", "alice/Maildir/tmp"])
def test_the_sink_refuses_a_mailbox_that_a_link_carries_out_of_the_root(tmp_path, planted):
    root, outside = tmp_path / "mail", tmp_path / "elsewhere"
    outside.mkdir()
    sink = MaildirSink(boxes(root), pool=InlinePool(), hostname="mx.example.org")
    mbox = sink.mailboxes.maildir("alice@example.org")
    link = root / "example.org" / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    if planted.count("/") == 2:                 # a link in place of new/ or tmp/: the others are there
        for sub in {"tmp", "new", "cur"} - {os.path.basename(planted)}:
            (link.parent / sub).mkdir()
    link.symlink_to(outside)
    fd, tmp = sink.reserve.take()
    with pytest.raises(MailboxOutsideRoot):
        sink.deliver(tmp, fd, b"Subject: x\r\n\r\nhi\r\n", 19, [mbox])
    assert os.listdir(outside) == []
    assert not os.path.exists(tmp)
    sink.close()
