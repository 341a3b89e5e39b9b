"""`python -m adaround ...`: the same as the `adaround` command."""

import sys


def run() -> int:
    """The `adaround` command: Ctrl-C while torch is still importing ends quietly (130)."""
    try:
        from adaround.cli import main
    except KeyboardInterrupt:
        print("adaround: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
