"""Fixtures shared by the tests; the helpers they use live in tests/helpers/."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from helpers.config import DATA_DIRS, minimal_config
from helpers.served import ENDPOINTS, Served, start

from meshmail.config import loads

if TYPE_CHECKING:
    from helpers.cluster import Cluster

pytest_plugins = ["helpers.passwords"]  # fails the session when a test password is in a log


@pytest.fixture(scope="session", autouse=True)
def _remove_data_dirs():
    """Remove the data folders helpers.config.minimal_config made, when the session ends."""
    yield
    for path in DATA_DIRS:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write TOML text to a fresh file and return its path."""
    counter = iter(range(1_000_000))

    def write(text: str) -> Path:
        path = tmp_path / f"meshmail-{next(counter)}.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
async def node(nursery: trio.Nursery) -> Served:
    """A node served in the test's trio loop: "solo", with an IMAP endpoint and a tag."""
    return await start(nursery, loads(minimal_config("solo", extra=ENDPOINTS), "test.toml"))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Cluster]:
    """An empty Cluster under tmp_path/nodes; every process it started is killed at the end
    and the logs are printed (pytest shows them for a failed test)."""
    from helpers.cluster import (
        Cluster,  # here: it imports helpers.passwords, a plugin pytest loads first
    )

    (tmp_path / "nodes").mkdir()
    fleet = Cluster(tmp_path / "nodes")
    try:
        yield fleet
    finally:
        fleet.close()
        print(fleet.logs())
