"""The demo's configuration files: valid TOML whatever the directory is called."""
from pathlib import Path

from shared.config import load
from shared.demo import write_configs


def test_demo_configs_load_from_a_directory_with_quotes_and_backslashes(tmp_path):
    root = tmp_path / 'odd "name" \\ here'
    paths = write_configs(root, 3525)
    for tier, path in paths.items():
        settings = load(tier, path)
        assert settings.log.file == str(root / "log" / f"{tier}.log")
    assert load("filter", paths["filter"]).queue.directory == str(root / "spool" / "filter")
    assert load("domain", paths["domain"]).mailboxes.maildir_root == str(root / "mail")
    assert Path(load("edge", paths["edge"]).server.tls_cert).is_file()
