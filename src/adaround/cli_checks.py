"""Command-line arguments checked before any work, and SIGTERM handled like Ctrl-C.

`check_args` runs before a command loads a model or data: counts out of range and output
paths that cannot be written are refused in one line (exit 2) instead of after a long run.
"""

from __future__ import annotations

import argparse
import inspect
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adaround.checks import check_output_path
from adaround.errors import AdaRoundError

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's convention


class UsageError(AdaRoundError):
    """A command-line argument that cannot be used as given."""


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, its sibling
    """SIGTERM arrived: unwinds like KeyboardInterrupt so that every `finally` cleans up."""


# option -> (smallest value, what it counts)
_AT_LEAST = {
    "threads": (1, "torch CPU threads"),
    "num_calib": (1, "calibration samples"),
    "calib_offset": (0, "samples to skip"),
    "limit": (1, "samples to evaluate"),
    "num_eval": (1, "evaluation samples"),
    "iters": (1, "iterations"),
    "image_size": (1, "pixels"),
    "resize": (1, "pixels"),
    "samples": (1, "stochastic roundings"),
}

# (command, option) -> what the file is
_OUTPUTS = {"output": "--output", "json": "--json", "float_onnx": "--float-onnx"}


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts out of range and unwritable outputs before the command starts."""
    for name, (low, what) in _AT_LEAST.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and value < low:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {value}: the number of {what} must be at least {low}; "
                             f"pass {flag} {max(low, 1)} or more (or leave it out for the "
                             "default)")
    for name, flag in _OUTPUTS.items():
        value = getattr(args, name, None)
        if value:
            check_output_path(value, flag)
    for name in ("checkpoint", "plot_dir"):
        folder = getattr(args, name, None)
        if folder:
            check_output_path(f"{folder}/.probe", f"--{name.replace('_', '-')} folder")


def call_factory(factory: Any, ref: str) -> Any:
    """Call a model factory that must need no arguments; say so where it does."""
    if not callable(factory):
        return factory
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: just call
        params = []
    required = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise UsageError(f"{ref} needs arguments ({', '.join(required)}): point the reference "
                         "at a function that builds the model without arguments (write a "
                         "small wrapper that fixes them)")
    return factory()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread for the duration, then is restored."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
