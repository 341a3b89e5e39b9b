"""`python -m adaround ...`: the same as the `adaround` command."""

import sys

from adaround.cli import main

sys.exit(main())
