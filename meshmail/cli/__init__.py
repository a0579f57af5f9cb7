"""The `meshmail` command: run a node, show a running node's view, bootstrap a cluster, and
manage its domains, join tokens, gossip keys and admins.

parser.py declares the commands; each command group's handlers live in a module of their
own, imported only when one of them runs, so `meshmail --help` or `meshmail status` does not
load the node. Expected failures (MeshmailError: a bad config, an address in use, a node
that does not answer) print one line ``meshmail: ...`` on stderr and exit with status 2;
tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..core.errors import MeshmailError

#: Exit status for failures the operator can fix (argparse uses 2 for usage errors too).
EXIT_FAILURE = 2
#: Names the data dir of commands given no --data-dir, in place of DEFAULT_DATA_DIR.
DATA_DIR_ENV = "MESHMAIL_DATA_DIR"
#: The API token of commands given --url and no --token.
TOKEN_ENV = "MESHMAIL_TOKEN"


class CommandError(MeshmailError):
    """A failure to report as one line; str() is the line without the ``meshmail:`` prefix."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from .parser import (  # here: its modules import CommandError from this one
        build_parser,
        load_handler,
    )

    args = build_parser().parse_args(argv)
    try:
        return load_handler(args.handler)(args)
    except BaseException as exc:
        problem = _expected_problem(exc)
        if problem is None:
            raise
        print(f"meshmail: {problem}", file=sys.stderr)
        return EXIT_FAILURE


def _expected_problem(exc: BaseException) -> str | None:
    """The one-line text of an expected failure (possibly inside exception groups), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) if isinstance(exc, MeshmailError) else None
