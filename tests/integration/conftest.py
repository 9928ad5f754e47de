"""Fixtures of the integration tests: the three tiers as processes on loopback.

``make_pipeline(edge=..., filter=..., domain=..., start=TIERS)`` writes the
three configurations (defaults of :func:`helpers.default_sections` with the
overrides merged in) and starts the named tiers, downstream first; ``pipeline``
is a default pipeline, all three tiers running.  Every process a test started
is stopped by pid in a finalizer (SIGTERM, then SIGKILL), pass or fail, and the
logs' tails are printed so that pytest shows them with a failure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pytest

from tests.integration.helpers import HOSTNAMES, TIERS, Overrides, Pipeline, self_signed


class PipelineFactory:
    def __init__(self, root: Path, tls: tuple[Path, Path]) -> None:
        self.root = root
        self.tls = tls
        self.made: list[Pipeline] = []

    def __call__(self, *, edge: Overrides = None, filter: Overrides = None, domain: Overrides = None,
                 start: Iterable[str] = TIERS) -> Pipeline:
        p = Pipeline(self.root / f"pipeline{len(self.made)}", self.tls, edge=edge, filter=filter, domain=domain)
        self.made.append(p)
        p.start(tuple(start))
        return p

    def close(self) -> None:
        for p in self.made:
            for tier in p.tiers.values():
                if tier.proc is not None and tier.proc.poll() is None:
                    tier.stop(timeout=10)
            print(p.describe())


@pytest.fixture(scope="session")
def edge_tls(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), HOSTNAMES["edge"])


@pytest.fixture
def make_pipeline(tmp_path: Path, edge_tls):
    factory = PipelineFactory(tmp_path, edge_tls)
    yield factory
    factory.close()


@pytest.fixture
def pipeline(make_pipeline) -> Pipeline:
    return make_pipeline()


@pytest.fixture(scope="module")
def shared_pipeline(tmp_path_factory, edge_tls) -> Pipeline:
    """One default pipeline for the tests of a module that change no state but mail."""
    factory = PipelineFactory(tmp_path_factory.mktemp("shared"), edge_tls)
    yield factory()
    factory.close()
