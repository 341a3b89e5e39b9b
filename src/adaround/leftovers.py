"""Temporary files and folders named after the process that made them, so that the next run
can tell the leftovers of a killed run (its process is gone) from those of a live one.

A SIGKILL leaves what no `finally` could remove: a full-size `.tmp` beside an output (killed
between write and rename) or a spill folder in the temporary directory. `sweep` removes those
whose process no longer exists; names without a process id (older versions) go once they are
a day old.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SPILL_PREFIX = "adaround-spill-"
OLD_AGE_S = 24 * 3600


def tagged(prefix: str) -> str:
    """`prefix` with this process's id, e.g. "adaround-spill-p1234-"."""
    return f"{prefix}p{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(path: Path, rest: str) -> bool:
    match = re.match(r"p(\d+)[-.]", rest)
    if match:
        return not _alive(int(match.group(1)))
    try:
        return time.time() - path.lstat().st_mtime > OLD_AGE_S
    except OSError:
        return False


def sweep(folder: Path, prefix: str, suffix: str = "") -> int:
    """Remove entries of `folder` named prefix...suffix left by dead processes; their count."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for path in entries:
        name = path.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        if not _stale(path, name[len(prefix):]):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed += 1
        log.warning("removed %s, left by an interrupted run", path)
    return removed


def sweep_spill_folders(parent: str | os.PathLike[str] | None = None) -> int:
    """Remove spill folders of killed runs from the temporary directory (or `parent`)."""
    return sweep(Path(parent or tempfile.gettempdir()), SPILL_PREFIX)


def make_spill_folder(parent: str | os.PathLike[str] | None = None) -> Path:
    """A new spill folder tagged with this process, after sweeping dead runs' folders."""
    sweep_spill_folders(parent)
    return Path(tempfile.mkdtemp(prefix=tagged(SPILL_PREFIX), dir=parent))
