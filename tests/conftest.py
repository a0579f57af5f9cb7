"""Fixtures shared by the tests; the helpers they use live in tests/helpers/."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from helpers.config import DATA_DIRS, minimal_config
from helpers.served import ENDPOINTS, Served, start

from meshmail.config import loads

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
