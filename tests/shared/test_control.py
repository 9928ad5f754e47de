"""Control files against real files and real processes: the pid file, the status file,
and `signal_reload` talking to a child that answers SIGHUP (or does not)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from shared.control import ControlError, ControlFiles, signal_reload, status_path

REPO = Path(__file__).resolve().parents[2]

# argv: pid_file, mode ("ok", "refuse" or "ignore").  Claims the files, reports its
# start, then answers each SIGHUP with the next generation, as the daemon will.
CHILD = textwrap.dedent("""
    import signal, sys, time
    from shared.control import ControlFiles

    control = ControlFiles(sys.argv[1])
    mode = sys.argv[2]
    control.claim()
    state = {"generation": 0}
    control.report(0, True, "started")

    def on_hup(signum, frame):
        state["generation"] += 1
        if mode == "ok":
            control.report(state["generation"], True, "configuration reloaded from /etc/x.toml",
                           ["server.listen", "queue.directory"])
        else:
            control.report(state["generation"], False, "/etc/x.toml: server.listen: not host:port")

    signal.signal(signal.SIGHUP, signal.SIG_IGN if mode == "ignore" else on_hup)
    print("READY", flush=True)
    while True:
        time.sleep(1)
""")


@pytest.fixture
def tier(tmp_path):
    """start(mode) -> pid file of a running child tier; every child is killed afterwards."""
    children = []

    def start(mode: str) -> str:
        pid_file = str(tmp_path / "edge.pid")
        child = subprocess.Popen([sys.executable, "-c", CHILD, pid_file, mode], stdout=subprocess.PIPE,
                                 env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, text=True)
        children.append(child)
        assert child.stdout.readline() == "READY\n"
        return pid_file

    yield start
    for child in children:
        child.kill()
        child.wait(10)
        child.stdout.close()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    return child.pid


def test_claim_writes_our_pid_and_an_empty_status_file_and_release_removes_both(tmp_path):
    control = ControlFiles(str(tmp_path / "edge.pid"))
    control.claim()
    assert (tmp_path / "edge.pid").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "edge.pid.status").read_text() == ""
    assert control.status_file == status_path(control.pid_file) == str(tmp_path / "edge.pid.status")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.pid", "edge.pid.status"]   # no temporaries
    assert control.release() is None
    assert list(tmp_path.iterdir()) == []


def test_a_stale_or_garbage_pid_file_is_replaced(tmp_path):
    pid_file = tmp_path / "edge.pid"
    for old in (f"{dead_pid()}\n", "not a pid\n", ""):
        pid_file.write_text(old)
        ControlFiles(str(pid_file)).claim()
        assert pid_file.read_text() == f"{os.getpid()}\n"


def test_a_live_process_in_the_pid_file_is_refused_naming_file_and_pid(tmp_path):
    pid_file = tmp_path / "edge.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file.write_text(f"{other.pid}\n")
        with pytest.raises(ControlError) as e:
            ControlFiles(str(pid_file)).claim()
        assert str(e.value).startswith(f"{pid_file}: process {other.pid} is running with this pid file")
        assert pid_file.read_text() == f"{other.pid}\n"
        assert not (tmp_path / "edge.pid.status").exists()
    finally:
        other.kill()
        other.wait(10)


def test_release_leaves_files_another_process_has_claimed_since(tmp_path):
    control = ControlFiles(str(tmp_path / "edge.pid"))
    control.claim()
    (tmp_path / "edge.pid").write_text("1\n")
    assert control.release() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.pid", "edge.pid.status"]


def test_claim_names_the_file_it_cannot_write(tmp_path):
    pid_file = tmp_path / "missing-dir" / "edge.pid"
    with pytest.raises(ControlError) as e:
        ControlFiles(str(pid_file)).claim()
    assert str(e.value) == f"{pid_file}: cannot write the pid file: No such file or directory"


def test_report_writes_one_json_object_atomically(tmp_path):
    control = ControlFiles(str(tmp_path / "edge.pid"))
    control.claim()
    inode = os.stat(control.status_file).st_ino
    assert control.report(3, False, "x.toml: server.listen: not host:port", ["server.listen"]) is None
    data = json.loads(Path(control.status_file).read_text())
    assert data.pop("time").endswith("Z")
    assert data == {"pid": os.getpid(), "generation": 3, "ok": False,
                    "message": "x.toml: server.listen: not host:port", "restart_needed": ["server.listen"]}
    assert os.stat(control.status_file).st_ino != inode                       # renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.pid", "edge.pid.status"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root: claims as root, reports as nobody")
def test_after_the_privilege_drop_the_status_file_is_rewritten_in_place():
    """As the daemon does: claim as root in a directory only root may write, hand the
    status file to an unprivileged user, become that user, report."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    run = tempfile.mkdtemp(prefix="smarthost-control-")          # /tmp: nobody may enter, not write
    try:
        os.chmod(run, 0o755)
        pid_file = os.path.join(run, "edge.pid")
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import os, sys
            from shared.control import ControlFiles
            control = ControlFiles({pid_file!r})
            control.claim(uid={nobody.pw_uid}, gid={nobody.pw_gid})
            before = os.stat(control.status_file).st_ino
            os.setgroups([])
            os.setgid({nobody.pw_gid})
            os.setuid({nobody.pw_uid})
            assert control.report(0, True, "started") is None
            assert os.stat(control.status_file).st_ino == before
            print(control.release())
            """)], env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True,
            timeout=30)
        assert child.returncode == 0, child.stderr
        status = os.stat(status_path(pid_file))
        assert (status.st_uid, status.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert json.loads(Path(status_path(pid_file)).read_text())["message"] == "started"
        assert sorted(os.listdir(run)) == ["edge.pid", "edge.pid.status"]       # no temporary left
        assert child.stdout == (f"{pid_file}: cannot remove: Permission denied; "
                                f"{status_path(pid_file)}: cannot remove: Permission denied\n")
    finally:
        shutil.rmtree(run)


def test_signal_reload_ok_names_the_settings_that_need_a_restart(tier):
    pid_file = tier("ok")
    assert signal_reload(pid_file, timeout=10) == (
        0, "reloaded: configuration reloaded from /etc/x.toml\nrestart needed for: server.listen, queue.directory")
    assert json.loads(Path(status_path(pid_file)).read_text())["generation"] == 1
    assert signal_reload(pid_file, timeout=10)[0] == 0                       # the next one waits for 2
    assert json.loads(Path(status_path(pid_file)).read_text())["generation"] == 2


def test_signal_reload_refused(tier):
    assert signal_reload(tier("refuse"), timeout=10) == (
        1, "reload refused: /etc/x.toml: server.listen: not host:port")


def test_signal_reload_gives_up_after_the_timeout(tier):
    pid_file = tier("ignore")
    began = time.monotonic()
    assert signal_reload(pid_file, timeout=0.3) == (
        1, f"no answer within 0.3 s from process {Path(pid_file).read_text().strip()} "
           f"({status_path(pid_file)} unchanged)")
    assert 0.3 <= time.monotonic() - began < 5


def test_signal_reload_explains_why_there_is_no_tier_to_ask(tmp_path):
    pid_file = tmp_path / "edge.pid"
    assert signal_reload(str(pid_file)) == (
        1, f"no running tier: {pid_file} not found (is server.pid_file the running tier's?)")
    pid_file.write_text("garbage\n")
    assert signal_reload(str(pid_file)) == (1, f"{pid_file} does not hold a process id (it holds 'garbage')")
    gone = dead_pid()
    pid_file.write_text(f"{gone}\n")
    assert signal_reload(str(pid_file)) == (
        1, f"no running tier: process {gone} named in {pid_file} is gone (a stale pid file)")


def test_signal_reload_does_not_signal_a_process_that_never_reported(tmp_path):
    """A live pid without a report of its own (a tier still starting, a stale status file
    left by an earlier run, a pid reused by some other program) is not sent SIGHUP."""
    pid_file = tmp_path / "edge.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # SIGHUP would kill it
    try:
        pid_file.write_text(f"{other.pid}\n")
        status = Path(status_path(str(pid_file)))
        status.write_text(json.dumps({"pid": other.pid + 1, "generation": 4, "ok": True}))
        code, text = signal_reload(str(pid_file))
        assert (code, text) == (1, f"process {other.pid} named in {pid_file} has not reported its start in "
                                   f"{status}: still starting, or not a smarthost tier")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)
