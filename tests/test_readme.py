"""README.md as a newcomer runs it: every ```sh block runs as written, from the repository
root, with bash -e. (Blocks that show a production machine are ```text: they need systemd,
/var/lib and real addresses.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```sh\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_readme_has_runnable_blocks():
    assert BLOCKS, "README.md has no ```sh block: the newcomer's path is not tested"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs_as_written(block):
    # The venv the suite runs from is the one the README makes (.venv at the root), so its
    # `python3 -m venv .venv && pip install -e .` line finds everything installed already.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
