"""A real ClusterState and Replication (no memberlist attached) for the security tests."""

from __future__ import annotations

import pytest
from helpers.security import Clock

from meshmail.replication import Replication
from meshmail.state.replica import ClusterState


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replication(tmp_path, clock):
    state = ClusterState.open(tmp_path / "state", "m1", clock, fsync=False)
    yield Replication(state, clock)
    state.close()
