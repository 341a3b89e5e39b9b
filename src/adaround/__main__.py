"""`python -m adaround ...`: the same as the `adaround` command."""

import sys

try:  # importing torch takes seconds: Ctrl-C then ends without a traceback
    from adaround.cli import main
except KeyboardInterrupt:
    sys.exit(130)

sys.exit(main())
