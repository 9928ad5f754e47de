"""The embedded user store: its file, argon2id verification, CRAM-MD5 secrets, edits
that are atomic and owned right, and the mechanisms run over it."""
from __future__ import annotations

import hmac
import os
import stat

import pytest
from twisted.internet import task

from shared.auth.local import FileBackend
from shared.auth.sasl import Challenge, ClientContext, Failure, Success
from shared.auth.service import AuthSettings, FailureGuard
from shared.auth.store import StoreError, UserStore, editing, make_user, parse
from shared.blocking import InlinePool
from shared.counters import LocalCounters
from shared.netlist import NetworkList

CLIENT = ClientContext("192.0.2.1", 40000, secured=True)


@pytest.fixture
def users_file(tmp_path):
    path = str(tmp_path / "users")
    with editing(path) as users:
        users["alice@example.test"] = make_user("alice@example.test", "s3cret", cram_md5=True)
        users["bob@example.test"] = make_user("bob@example.test", "hunter2", cram_md5=False)
    return path


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the exchange did not answer"
    return out[0]


def backend(path, **kw) -> FileBackend:
    return FileBackend(UserStore(path), InlinePool(), "edge.test", **kw)


def test_the_file_is_written_atomically_mode_0600_and_reads_back(users_file):
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    store = UserStore(users_file)
    assert set(store.refresh()) == {"alice@example.test", "bob@example.test"}
    assert store.has_cram
    assert store.verify("ALICE@example.test", "s3cret") == "alice@example.test"    # names: any case
    assert store.verify("alice@example.test", "S3cret") is None
    assert store.verify("nobody@example.test", "s3cret") is None
    assert not [n for n in os.listdir(os.path.dirname(users_file)) if n.startswith(".users.")]


def test_hashes_are_argon2id_and_the_password_is_not_in_the_file(users_file):
    text = open(users_file).read()
    assert "$argon2id$" in text and "hunter2" not in text


def test_a_change_is_seen_without_a_reload(users_file):
    store = UserStore(users_file)
    assert store.verify("bob@example.test", "hunter2")
    with editing(users_file) as users:
        users["bob@example.test"] = make_user("bob@example.test", "new-one", cram_md5=False)
    assert store.verify("bob@example.test", "hunter2") is None
    assert store.verify("bob@example.test", "new-one") == "bob@example.test"


@pytest.mark.parametrize("line, problem", [
    ("alice", "expected NAME:ARGON2ID-HASH"),
    ("alice:$2y$10$abcdefghijkl", "not argon2id"),
    ("alice:$argon2id$v=19$m=1,t=1,p=1$x$y:cram=00", "cram-md5=HEX"),
    ("alice:$argon2id$v=19$m=1,t=1,p=1$x$y:cram-md5=zz", "cram-md5=HEX"),
])
def test_bad_lines_are_named(line, problem):
    with pytest.raises(StoreError) as e:
        parse("# users\n\n" + line + "\n", "/etc/users")
    assert str(e.value).startswith("/etc/users: line 3") and problem in str(e.value)


def test_a_name_twice_is_refused():
    h = make_user("a", "x", False).hash
    with pytest.raises(StoreError, match="listed twice"):
        parse(f"a:{h}\nA:{h}\n", "/f")


def test_plain_login_and_cram_md5(users_file):
    b = backend(users_file)
    assert b.mechanisms() == ("PLAIN", "LOGIN")           # CRAM-MD5 once the file is read
    b.store.refresh()
    assert b.mechanisms() == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert result(b.start("PLAIN", CLIENT).step(b"\0alice@example.test\0s3cret")) == Success("alice@example.test")
    assert result(b.start("PLAIN", CLIENT).step(b"alice@example.test\0alice@example.test\0s3cret")) \
        == Success("alice@example.test")
    wrong = result(b.start("PLAIN", CLIENT).step(b"\0alice@example.test\0nope"))
    assert isinstance(wrong, Failure) and not wrong.temporary and wrong.user == "alice@example.test"
    # acting as someone else is refused whatever the password
    other = result(b.start("PLAIN", CLIENT).step(b"bob@example.test\0alice@example.test\0s3cret"))
    assert isinstance(other, Failure)
    login = b.start("LOGIN", CLIENT)
    assert result(login.step(None)) == Challenge(b"Username:")
    assert result(login.step(b"bob@example.test")) == Challenge(b"Password:")
    assert result(login.step(b"hunter2")) == Success("bob@example.test")
    cram = b.start("CRAM-MD5", CLIENT)
    ch = result(cram.step(None))
    assert ch.data.startswith(b"<") and ch.data.endswith(b"@edge.test>")
    digest = hmac.new(b"s3cret", ch.data, "md5").hexdigest()
    assert result(cram.step(b"alice@example.test " + digest.encode())) == Success("alice@example.test")


def test_cram_md5_only_for_users_with_a_secret_and_only_while_one_has_it(users_file):
    b = backend(users_file)
    cram = b.start("CRAM-MD5", CLIENT)
    ch = result(cram.step(None))
    digest = hmac.new(b"hunter2", ch.data, "md5").hexdigest()
    assert isinstance(result(cram.step(b"bob@example.test " + digest.encode())), Failure)
    with editing(users_file) as users:
        del users["alice@example.test"]
    b.store.refresh()
    assert b.mechanisms() == ("PLAIN", "LOGIN")


def test_a_replayed_cram_md5_answer_fails_on_a_new_challenge(users_file):
    b = backend(users_file)
    first = b.start("CRAM-MD5", CLIENT)
    ch = result(first.step(None))
    answer = b"alice@example.test " + hmac.new(b"s3cret", ch.data, "md5").hexdigest().encode()
    second = b.start("CRAM-MD5", CLIENT)
    result(second.step(None))
    assert isinstance(result(second.step(answer)), Failure)


def test_malformed_answers_fail_cleanly(users_file):
    b = backend(users_file)
    for mech, data in (("PLAIN", b"no nuls"), ("PLAIN", b"\0\xff\xfe\0x"), ("PLAIN", b"\0a\0b\0c")):
        assert isinstance(result(b.start(mech, CLIENT).step(data)), Failure)
    cram = b.start("CRAM-MD5", CLIENT)
    result(cram.step(None))
    assert isinstance(result(cram.step("alice@example.test é".encode() * 3)), Failure)


def test_a_full_hash_queue_is_a_temporary_failure(users_file):
    b = backend(users_file, max_pending=1)
    b.pending = 1                           # one verification already waits for a thread
    step = result(b.start("PLAIN", CLIENT).step(b"\0alice@example.test\0s3cret"))
    assert isinstance(step, Failure) and step.temporary


def test_an_unreadable_file_is_a_temporary_failure(tmp_path):
    path = tmp_path / "users"
    path.write_text("garbage\n")
    step = result(backend(str(path)).start("PLAIN", CLIENT).step(b"\0a\0b"))
    assert isinstance(step, Failure) and step.temporary


def test_failure_guard_blocks_a_client_then_forgets(users_file):
    clock = task.Clock()
    own = AuthSettings(users_file=users_file, client_failure_limit=3, user_failure_limit=0,
                       failure_time_unit=60, block_time=120)
    g = FailureGuard(own, NetworkList(["10.0.0.0/8"]), LocalCounters(clock))
    assert [g.failed("192.0.2.1", "x") for _ in range(3)] == [None, None, "client"]
    assert g.blocked("192.0.2.1") == "client"
    assert g.blocked("192.0.2.2") is None
    for _ in range(10):                                  # mynetworks are exempt
        assert g.failed("10.1.2.3", "x") is None
    assert g.blocked("10.1.2.3") is None
    clock.advance(121)
    assert g.blocked("192.0.2.1") is None


def test_failure_guard_groups_ipv6_by_prefix_and_blocks_a_user_name(users_file):
    clock = task.Clock()
    own = AuthSettings(users_file=users_file, client_failure_limit=2, user_failure_limit=3)
    g = FailureGuard(own, NetworkList([]), LocalCounters(clock))
    g.failed("2001:db8::1", None)
    assert g.failed("2001:db8::ffff", None) == "client"           # the same /64
    assert g.blocked("2001:db8::5") == "client"
    outcomes = [g.failed(f"198.51.100.{i}", "Alice") for i in range(3)]
    assert outcomes[-1] == "user"
    assert g.blocked("203.0.113.9", "alice") == "user"          # from anywhere, any case
