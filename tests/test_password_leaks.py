"""The search for test passwords in logs (tests/helpers/passwords.py): plain and base64 forms
are found in log files, wherever the base64 starts; files that are no logs are left alone."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import passwords

#: Not registered with the session: this module's files must not fail the suite.
SECRET = "planted-Xq7!pw"


@pytest.fixture
def registry() -> passwords.Registry:
    registry = passwords.Registry()
    registry.register("unrelated-1")
    assert registry.register(SECRET, "here")
    return registry


def found(tmp_path, registry: passwords.Registry) -> set[tuple[str, str, str]]:
    findings = passwords.scan(passwords.log_files(tmp_path), registry.passwords.values())
    return {(f.path.name, f.name, f.form) for f in findings}


def test_a_plain_password_in_a_log_is_reported(tmp_path, registry):
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "n1.log").write_text(f"INFO login 'ann' with {SECRET!r}\n")
    (tmp_path / "clean.log").write_text("INFO nothing to see\n")
    assert found(tmp_path, registry) == {("n1.log", "password 2 (registered by here)", "plain")}


@pytest.mark.parametrize(
    "encoded",
    [
        base64.b64encode(SECRET.encode()),
        base64.b64encode(b"\0ann@one.example\0" + SECRET.encode()),
        base64.b64encode(b"ann\0ann@one.example\0" + SECRET.encode()),
        base64.b64encode(b"\0" + SECRET.encode() + b"\0tail"),
    ],
    ids=["password", "plain-response", "plain-response-with-authzid", "inside"],
)
def test_only_its_base64_in_a_log_is_reported(tmp_path, registry, encoded):
    (tmp_path / "dovecot.out").write_bytes(b"C: AUTHENTICATE PLAIN " + encoded + b"\r\n")
    assert SECRET.encode() not in (tmp_path / "dovecot.out").read_bytes()
    assert found(tmp_path, registry) == {("dovecot.out", "password 2 (registered by here)", "base64")}


def test_password_files_and_other_files_are_no_logs(tmp_path, registry):
    (tmp_path / "users").write_text(f"ann@one.example:{{PLAIN}}{SECRET}::::::\n")
    (tmp_path / "notes.txt").write_text(SECRET)
    (tmp_path / "run.err").write_text("no secret here\n")
    assert found(tmp_path, registry) == set()


def test_short_passwords_are_not_registered():
    registry = passwords.Registry()
    assert not registry.register("12345")
    assert registry.register("123456") and registry.register("123456")
    assert [p.name for p in registry.passwords.values()] == ["password 1"]
    assert "123456" not in repr(registry.passwords["123456"])


def test_a_session_whose_logs_hold_a_registered_password_fails(tmp_path):
    """The plugin end to end, in a pytest run of its own: a test that logs its password."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["helpers.passwords"]\n')
    (tmp_path / "test_leak.py").write_text(
        "import logging\nfrom helpers import passwords\n\n"
        "def test_leak():\n"
        f"    passwords.register({SECRET!r})\n"
        f"    logging.getLogger('meshmail.proxy').debug('password %s', {SECRET!r})\n\n"
        "def test_quiet():\n"
        "    passwords.register('quiet-secret-2')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base"),
         "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(passwords.__file__).parents[1])},
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    assert "logging-records.log: password 1 (registered by test_leak.py::test_leak), plain" in run.stdout
    assert "password 2" not in run.stdout and SECRET not in run.stdout
