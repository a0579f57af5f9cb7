"""Fixtures shared by the tests: gossip keys and config files to start from."""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

#: The `meshmail` command as a subprocess argv prefix, for tests of the real CLI.
MESHMAIL = [sys.executable, "-m", "meshmail"]


def new_key_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


#: Data folders minimal_config made; removed when the test session ends.
_DATA_DIRS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _remove_data_dirs():
    yield
    for path in _DATA_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def minimal_config(name: str = "m1", *, key: str | None = None, extra: str = "", data_dir: str | None = None) -> str:
    """A valid config for one node on 127.0.0.1 with ports chosen by the kernel, its data
    in `data_dir` (a fresh temporary folder by default)."""
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="meshmail-test-")
        _DATA_DIRS.append(data_dir)
    return f"""
[node]
name = "{name}"
data_dir = "{data_dir}"

[gossip]
bind = "127.0.0.1:0"
cluster = "test"
keys = ["{key or new_key_b64()}"]
profile = "local"

[http]
bind = "127.0.0.1:0"
{extra}
"""


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write TOML text to a fresh file and return its path."""
    counter = iter(range(1_000_000))

    def write(text: str) -> Path:
        path = tmp_path / f"meshmail-{next(counter)}.toml"
        path.write_text(text)
        return path

    return write
