"""`meshmail run`: check a config, or run its node in the foreground until a signal."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

from ..config import load
from ..core.address import format_address
from .local import config_path

NO_NODE_HINT = "make one with meshmail init or join, or pass --data-dir DIR or --config FILE"


def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard one: every client connection of the
    proxies holds a descriptor or two, and 1,024 (a common default) runs out early."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            logging.getLogger("meshmail.node").warning("cannot raise the open files limit from %d: %s", soft, exc)


def freeze_startup_objects() -> None:
    """Exempt the objects made while starting from the cycle collector, for good.

    hypercorn leaves each closed connection in a reference cycle (server <-> protocol) that
    holds its TLS object, some 20-40 KB of OpenSSL memory. A full collection runs only once
    the objects awaiting one exceed a quarter of the long-lived ones; with the startup objects
    frozen that quarter is small, and a full collection is weighed at every middle one rather
    than every tenth, so dead connections are freed before they pile up.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.collect()  # counts the long-lived objects again: none but the frozen ones, which do not count
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1)


def run(args: argparse.Namespace) -> int:
    path = config_path(args, NO_NODE_HINT)
    config = load(path)
    from ..node import preflight  # loads trio: after the config, which needs none of it

    preflight(config)
    if args.check:
        print(f"meshmail: {path}: config ok (node {config.node.name}, cluster {config.gossip.cluster})")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The format names no source line, thread or process: skip looking them up for every record
    # (the logging HOWTO's "Optimization"; a proxied login logs two lines).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    raise_fd_limit()
    import trio

    from ..core.files import atomic_write
    from ..node import serve

    async def run_node() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve, config, leave_on_signals=True))
            freeze_startup_objects()
            if args.ready_file:
                document = {name: format_address(address) for name, address in bound.items()}
                atomic_write(args.ready_file, [json.dumps(document).encode() + b"\n"], mode=0o644)

    try:
        trio.run(run_node)
    except KeyboardInterrupt:
        # Only before the signal handler is installed; after it, SIGINT means leave.
        return 130
    finally:
        if args.ready_file:
            Path(args.ready_file).unlink(missing_ok=True)
    return 0
