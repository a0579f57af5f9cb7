"""The base of every expected failure: one line for people, shown by the CLI as
``meshmail: <line>`` and exit status 2. A message never carries the program's name."""

from __future__ import annotations


class MeshmailError(Exception):
    """An expected failure an operator can act on; str() is one line without a prefix."""
