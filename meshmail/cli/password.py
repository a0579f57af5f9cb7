"""Reading a new admin password: the first line of a file, or typed twice at the terminal."""

from __future__ import annotations

import getpass
import sys

from . import CommandError


def read_password(path: str | None, prompt: str, option: str) -> str:
    """The password in the file at `path`, else asked on the terminal; `option` is the flag
    that names such a file, for the error when there is no terminal. Raises CommandError."""
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                return file.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CommandError(f"cannot read the password from {path}: {reason}") from None
    if not sys.stdin.isatty():
        raise CommandError(f"no terminal to ask the password on; pass {option} FILE (its first line is the password)")
    first = getpass.getpass(prompt)
    if first != getpass.getpass("Again: "):
        raise CommandError("the passwords differ")
    return first
