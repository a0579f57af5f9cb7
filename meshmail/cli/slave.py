"""`meshmail slave domains`: what a slave publishes, from which sources, and its services."""

from __future__ import annotations

import argparse

from .client import call
from .render import format_slave, show


def domains(args: argparse.Namespace) -> int:
    document = call(args, "GET", "/slave")
    show(args, document, lambda: format_slave(document))
    return 0
