"""The real `meshmail` command in a subprocess, and checks of what an operator sees."""

from __future__ import annotations

import socket
import subprocess

from helpers.config import MESHMAIL


def meshmail(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*MESHMAIL, *args], capture_output=True, text=True, timeout=timeout)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*MESHMAIL, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, f"meshmail {' '.join(args)} -> {result.returncode}: {result.stderr}"
    return result.stdout


def refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """A one-line failure with exit status 2 that says `words`."""
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshmail: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshmail: ")
    for word in words:
        assert word in lines[0]


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released by us)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
