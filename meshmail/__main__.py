"""`python -m meshmail` is the `meshmail` command."""

import sys

from .cli import main

sys.exit(main())
