"""A pytest plugin that fails the session when a test password shows up in a log, plain or in
base64. Tests register the passwords they use (`register`; the kit's Dovecot registers its
users, Cluster.init the admin password); at the end of the session every log file under the
session's base temporary folder (*.log, *.out, *.err: the nodes' output, Dovecot's and Postfix's
logs) and every logging record of the session (written to RECORDS there by a handler on the
root logger at DEBUG) is searched. A hit is listed in the terminal summary and fails the session.

Only passwords of at least MIN_LENGTH characters are registered: shorter ones ("wrong", "x")
turn up in unrelated text. Found passwords are named by their number and the test that
registered them, never shown.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import pytest

MIN_LENGTH = 6
#: What a log file is called.
LOG_PATTERNS = ("*.log", "*.out", "*.err")
#: Files that hold passwords by design, so are no logs whatever their name: Dovecot's
#: passwd-file as tests/helpers/mailkit.py writes it.
NOT_LOGS = frozenset({"users", "users.new", "passwd"})
#: Where the session's logging records go, under the base temporary folder.
RECORDS = "logging-records.log"


@attrs.frozen
class Password:
    """A registered password: `name` says which (its number and the test that registered it)."""

    name: str
    secret: str = attrs.field(repr=False)


@attrs.frozen
class Finding:
    path: Path
    name: str
    form: str  # "plain" or "base64"


@attrs.define
class Registry:
    """The passwords registered so far, each once."""

    passwords: dict[str, Password] = attrs.field(factory=dict)

    def register(self, secret: str, origin: str = "") -> bool:
        """Adds `secret` if it is at least MIN_LENGTH characters long and new; returns whether
        it is registered now."""
        if len(secret) < MIN_LENGTH:
            return False
        if secret not in self.passwords:
            name = f"password {len(self.passwords) + 1}" + (f" (registered by {origin})" if origin else "")
            self.passwords[secret] = Password(name, secret)
        return True


#: The session's registry.
REGISTRY = Registry()


def register(secret: str) -> bool:
    """Registers a password the running test uses, to be searched for in the logs at the end of
    the session; returns False (and does nothing) for one shorter than MIN_LENGTH."""
    return REGISTRY.register(secret, os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0])


def base64_forms(secret: bytes) -> list[bytes]:
    """The base64 text found wherever `secret` is encoded, whatever comes before or after it in
    the encoded data: for each of the three places it can start in a 3-byte group, the characters
    that encode nothing but its bytes. That covers base64(secret) and SASL PLAIN's
    base64(authzid NUL user NUL secret) alike."""
    forms = []
    for offset in range(3):
        text = base64.b64encode(b"\0" * offset + secret)
        first = -(-8 * offset // 6)  # the first character whose 6 bits are all the secret's
        end = 8 * (offset + len(secret)) // 6
        forms.append(text[first:end])
    return forms


def log_files(root: Path) -> Iterator[Path]:
    """The log files under `root`, by name (LOG_PATTERNS), less NOT_LOGS."""
    for pattern in LOG_PATTERNS:
        for path in sorted(root.rglob(pattern)):
            if path.is_file() and not path.is_symlink() and path.name not in NOT_LOGS:
                yield path


def scan(paths: Iterable[Path], passwords: Iterable[Password]) -> list[Finding]:
    """Each (file, password, form) where a password appears in a file, plain (UTF-8) or in
    base64 (base64_forms)."""
    needles = []
    for password in passwords:
        secret = password.secret.encode()
        needles.append((secret, password.name, "plain"))
        needles += [(form, password.name, "base64") for form in base64_forms(secret)]
    findings = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed while the session ended
        found = {(name, form) for needle, name, form in needles if needle in data}
        findings += [Finding(path, name, form) for name, form in sorted(found)]
    return findings


# --- the plugin (tests/conftest.py loads this module as one) -------------------------------

_scanned: dict[str, Path] = {}
_findings: list[Finding] = []


@pytest.fixture(scope="session", autouse=True)
def _log_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Writes every logging record of the session to RECORDS in the base temporary folder."""
    basetemp = tmp_path_factory.getbasetemp()
    _scanned["basetemp"] = basetemp
    handler = logging.FileHandler(basetemp / RECORDS, encoding="utf-8", errors="backslashreplace")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
        handler.close()


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin may remove the folder
def pytest_sessionfinish(session: pytest.Session) -> None:
    basetemp = _scanned.get("basetemp")
    if basetemp is None or not REGISTRY.passwords:
        return
    _findings[:] = scan(log_files(basetemp), REGISTRY.passwords.values())
    if _findings and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _findings:
        terminalreporter.write_sep("=", "test passwords found in logs", red=True)
        for finding in _findings:
            terminalreporter.write_line(f"{finding.path}: {finding.name}, {finding.form}")
