"""Tier configuration: TOML files validated when loaded (see :mod:`shared.config.schema`)."""
from shared.config.schema import ConfigError, Settings, check_host, dump, load, parse, render  # noqa: F401
