"""Checks of what enters the public functions, made before any work: a config, a model, a path.

Each refuses with an `AdaRoundError` subclass whose message names the value and the fix, so a
wrong argument never surfaces as a raw AttributeError from deep inside a run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from adaround.config import QuantConfig
from adaround.errors import ConfigError, ModelError, OutputPathError


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def check_config(config: Any) -> QuantConfig:
    """`config` as a QuantConfig (None: the defaults)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    fix = ("QuantConfig.from_dict(d)" if isinstance(config, dict)
           else "adaround.QuantConfig(...)")
    raise ConfigError(f"config is {_kind(config)}, not a QuantConfig: pass {fix}")


def check_model(model: Any, what: str = "model") -> nn.Module:
    """Refuse anything but a torch.nn.Module where a network belongs."""
    if isinstance(model, nn.Module):
        return model
    hint = (" (a state dict? build the network, call load_state_dict on it and pass the module)"
            if isinstance(model, dict) else "")
    raise ModelError(f"{what} is {_kind(model)}, not a torch.nn.Module{hint}: pass the network "
                     "itself")


def check_path(path: Any, what: str = "path") -> Path:
    """A str or os.PathLike, not empty."""
    if isinstance(path, (str, os.PathLike)) and str(os.fspath(path)):
        return Path(os.fspath(path))
    raise ConfigError(f"{what} is {_kind(path)}: pass a file name (str or pathlib.Path)")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_path(path: Any, what: str = "output") -> Path:
    """Refuse an output path that cannot be written, before the work that produces it: a
    directory, a path under a regular file, a folder that is read-only or on a read-only file
    system. Missing folders are fine (they are created when the file is written)."""
    target = check_path(path, what)
    if target.is_dir():
        raise OutputPathError(f"{what} {target} is a directory: pass a file name inside it, e.g. "
                              f"{target / 'model.pt'}")
    folder = _nearest_existing(target.parent.absolute())
    if not folder.is_dir():
        raise OutputPathError(f"{what} {target} lies under {folder}, which is a file, not a "
                              "folder: choose another path")
    if folder == target.parent.absolute():
        try:  # the real test: access() says yes to root on a read-only bind mount
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise OutputPathError(f"cannot write {what} {target}: {folder} is not writable "
                                  f"({exc.strerror}); choose a writable folder") from exc
    elif not os.access(folder, os.W_OK):
        raise OutputPathError(f"cannot create the folders of {what} {target}: {folder} is not "
                              "writable; choose a writable folder")
    return target
