"""Fixtures of the end-to-end tests: whole tiers as processes, stopped in finalizers.

Whatever a test leaves running is stopped by pid when the test ends, pass or
fail; the tiers' log tails are printed then, so pytest shows them with a failure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Pipeline, free_port, self_signed, write_pipeline_configs


@pytest.fixture
def loopback_pipeline(tmp_path: Path):
    """Factory: start edge, filter and domain on free 127.0.0.1 ports; returns the Pipeline."""
    made: list[Pipeline] = []

    def make(*, queue: dict[str, Any] | None = None, tls: bool = True) -> Pipeline:
        root = tmp_path / f"pipeline{len(made)}"
        listen = {t: ("127.0.0.1", free_port()) for t in ("edge", "filter", "domain")}
        cert = self_signed(root / "tls", "edge.example.test", ["127.0.0.1"]) if tls else None
        configs = write_pipeline_configs(root, listen, tls=cert, queue=queue)
        p = Pipeline(root, listen, configs)
        made.append(p)
        p.start()
        return p

    yield make
    for p in made:
        p.stop()
        print(p.describe())
