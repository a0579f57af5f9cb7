"""The node of this host: which data dir and config a command means (--config, --data-dir,
$MESHMAIL_DATA_DIR or the default data dir), and one line when there is none."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.nodes import DEFAULT_DATA_DIR
from ..security.files import CONFIG
from . import DATA_DIR_ENV, CommandError


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR


def data_dir(args: argparse.Namespace) -> str:
    """--data-dir, else the default data dir."""
    return args.data_dir or default_data_dir()


def config_path(args: argparse.Namespace, hint: str) -> str:
    """The config --config names, else the one in the data dir. With neither option and no
    config in the default data dir, raises CommandError saying so, then `hint`."""
    if args.config:
        return args.config
    path = Path(data_dir(args)) / CONFIG
    if not args.data_dir:
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise CommandError(f"no node found in {path.parent} (no {CONFIG} there); {hint}") from None
        except OSError:
            pass  # unreadable, not absent: loading it says why
    return str(path)


def load_config(args: argparse.Namespace, hint: str):
    """The Config of config_path(args, hint); raises MeshmailError."""
    from ..config import (
        load,  # here, not above: the parser imports this module, and --help needs no config
    )

    return load(config_path(args, hint))
