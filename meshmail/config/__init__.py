"""meshmail's TOML configuration, loaded strictly into frozen attrs records.

Each section is a record whose fields declare their key once (sections.py); the loader
(loader.py), its one-line errors (``FILE: KEY: problem``) and the documented template that
init, join and deploy/meshmail.toml hold (template.py) are derived from those records.
This package reads files and checks values; it starts nothing.
"""

from .loader import DEFAULT_PATH, ConfigError, load, loads
from .sections import (
    SOURCE_TYPES,
    Config,
    EndpointConfig,
    GossipSection,
    HttpSection,
    NodeSection,
    SlaveSection,
    SourceConfig,
    TlsSection,
)

__all__ = [
    "DEFAULT_PATH",
    "SOURCE_TYPES",
    "Config",
    "ConfigError",
    "EndpointConfig",
    "GossipSection",
    "HttpSection",
    "NodeSection",
    "SlaveSection",
    "SourceConfig",
    "TlsSection",
    "load",
    "loads",
]
