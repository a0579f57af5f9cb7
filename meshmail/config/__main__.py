"""python -m meshmail.config --template: print the documented example config, which is
deploy/meshmail.toml."""

from __future__ import annotations

import argparse
import sys

from .template import example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshmail.config", description=__doc__.split(":")[0])
    parser.add_argument("--template", action="store_true", required=True, help="print deploy/meshmail.toml")
    parser.parse_args(argv)
    sys.stdout.write(example())
    return 0


if __name__ == "__main__":
    sys.exit(main())
