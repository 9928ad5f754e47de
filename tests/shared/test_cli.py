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
