"""A tier that cannot start says why and exits: it never lingers half-started.

An init system or the demo restarts or reports a tier that exits; one that
stays alive without a listener is an outage nobody is told about.
"""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import PYTHON, REPO, child_env, free_port, write_pipeline_configs

pytestmark = pytest.mark.slow


def run_tier(tier: str, config: Path, timeout: float = 10) -> int | None:
    """Run a tier; its exit status, or None when it was still running after `timeout` (then killed)."""
    p = subprocess.Popen([PYTHON, "-m", "shared.cli", tier, "--config", str(config)], cwd=REPO,
                         env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


def test_invalid_configuration_exits_2_naming_the_key(tmp_path):
    listen = {t: ("127.0.0.1", free_port()) for t in ("edge", "filter", "domain")}
    configs = write_pipeline_configs(tmp_path, listen)
    bad = tmp_path / "bad.toml"
    bad.write_text(configs["domain"].read_text().replace("[log]", "[log]\nlevle = \"debug\""))
    r = subprocess.run([PYTHON, "-m", "shared.cli", "domain", "--config", str(bad)], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert "log.levle" in r.stderr and str(bad) in r.stderr, r.stderr


def test_tier_whose_listen_address_is_taken_exits(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        listen = {"edge": ("127.0.0.1", free_port()), "filter": ("127.0.0.1", free_port()),
                  "domain": ("127.0.0.1", taken)}
        configs = write_pipeline_configs(tmp_path, listen)
        status = run_tier("domain", configs["domain"])
    log = (tmp_path / "log" / "domain.log").read_text(errors="replace")
    assert str(taken) in log, log
    assert status is not None, f"the domain tier could not listen on {taken} yet kept running:\n{log}"
    assert status != 0, log
