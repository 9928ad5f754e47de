"""The `smarthost` command line: version and help."""
import re

import pytest

from shared.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"smarthost \d+\.\d+\.\d+\n", capsys.readouterr().out)


@pytest.mark.parametrize("tier", ["edge", "filter", "domain"])
def test_a_tiers_help_describes_the_command(tier, capsys):
    with pytest.raises(SystemExit):
        main([tier, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("in the foreground", "SIGTERM", "SIGHUP: reload FILE", "Exit 2 for a configuration error"):
        assert words in text, words


def _must_not_signal(pid_file, timeout=10.0):
    raise AssertionError(f"signalled the tier of {pid_file}")


def test_reload_refuses_a_file_that_does_not_validate_without_signalling(tmp_path, capsys, monkeypatch):
    from shared import control
    monkeypatch.setattr(control, "signal_reload", _must_not_signal)
    cfg = tmp_path / "edge.toml"
    cfg.write_text('tier = "edge"\n[next_hop]\nhosts = ["127.0.0.1:10025"]\n[server]\nlisen = []\n')
    assert main(["reload", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == f"smarthost reload: {cfg}: server.lisen: unknown key\n"


def test_reload_without_a_pid_file_cannot_find_the_tier(tmp_path, capsys, monkeypatch):
    from shared import control
    monkeypatch.setattr(control, "signal_reload", _must_not_signal)
    cfg = tmp_path / "edge.toml"
    cfg.write_text('tier = "edge"\n[next_hop]\nhosts = ["127.0.0.1:10025"]\n')
    assert main(["reload", "--config", str(cfg)]) == 1
    assert capsys.readouterr().err == (f"smarthost reload: {cfg}: server.pid_file is not set: "
                                       "cannot find the running tier\n")


def test_reload_prints_the_tiers_answer_and_exits_with_its_code(tmp_path, capsys, monkeypatch):
    from shared import cli, control
    calls = []

    def answer(pid_file, timeout=10.0):
        calls.append((pid_file, timeout))
        return 0, "reloaded: configuration reloaded\nrestart needed for: server.listen"
    monkeypatch.setattr(control, "signal_reload", answer)
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'tier = "edge"\n[server]\npid_file = "{tmp_path / "edge.pid"}"\n'
                   '[next_hop]\nhosts = ["127.0.0.1:10025"]\n')
    assert main(["reload", "--config", str(cfg), "--timeout", "2.5"]) == 0
    assert calls == [(str(tmp_path / "edge.pid"), 2.5)]
    assert capsys.readouterr().out == "reloaded: configuration reloaded\nrestart needed for: server.listen\n"


def test_reloads_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["reload", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("Validate FILE first", "not signalled", "SIGHUP", "wait for its answer",
                  "new configuration is in use", "need a restart"):
        assert words in text, words
