"""Reading meshmail.toml: TOML text -> Config, or one ConfigError naming the file and key."""

from __future__ import annotations

import tomllib

import attrs

from ..core.errors import MeshmailError
from .schema import BadValue, read_table
from .sections import Config

DEFAULT_PATH = "/etc/meshmail/meshmail.toml"


class ConfigError(MeshmailError):
    """A configuration that cannot be used. str() is one line: ``FILE: KEY: problem``."""


def load(path: str) -> Config:
    """Read and check the TOML file at `path`. Raises ConfigError."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return loads(text, path)


def loads(text: str, path: str = "<config>") -> Config:
    """Check the TOML document `text`; `path` names it in errors. Raises ConfigError."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        config = read_table(Config, document, path=path)
    except BadValue as exc:
        raise ConfigError(f"{path}: {exc.describe()}") from None
    if config.tls is not None:
        config = attrs.evolve(config, tls=config.tls.under(config.node.data_dir))
    return config
