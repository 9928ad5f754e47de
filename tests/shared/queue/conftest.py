"""Fixtures for the queue tests.

The ``spool`` fixture runs blocking jobs synchronously and, to keep the suite
fast, without fsync (``fsync=False``); the tests about durability and group
commit build their own spool with fsync on.
"""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from shared.queue.store import Spool
from tests.shared.queue.helpers import T0, sync_runner


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def root(tmp_path):
    return tmp_path / "spool"


@pytest.fixture
def spool(root, clock) -> Spool:
    return Spool(root, reactor=clock, fsync=False, runner=sync_runner)
