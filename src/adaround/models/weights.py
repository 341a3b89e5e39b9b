"""Loading pretrained weights into a model, with clear errors on mismatches."""

from __future__ import annotations

import logging
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_weights", "read_state_dict"]

logger = logging.getLogger(__name__)

#: Keys under which training scripts commonly nest the state dict of a checkpoint.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
#: Prefixes added by ``nn.DataParallel`` / ``DistributedDataParallel`` and ``torch.compile``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_KEYS_SHOWN = 5
_FIX = "pass the weights file that matches this architecture"


def _torch_load(path: Path) -> Any:
    """``torch.load`` on CPU: ``weights_only=True`` first, the legacy pickle loader if needed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise ValueError(f"cannot read weights file {path}: {err}") from err
        first_error = err
    except Exception as err:  # corrupt zip, truncated file, not a torch file at all, ...
        raise ValueError(f"cannot read weights file {path}: {err}") from err

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(first_error))
    reason = f"it pickles {found.group(1)}" if found else "it holds more than tensors"
    logger.warning(
        "%s cannot be read with torch.load(weights_only=True) (%s); falling back to the legacy "
        "pickle loader (weights_only=False), which can run arbitrary code: use trusted files only",
        path,
        reason,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read weights file {path}: {err}") from err


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like every other bad file
            f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors, "
            f"possibly nested under one of {list(_NESTED_KEYS)}); {_FIX}"
        )
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return inner.state_dict()
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            return inner
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = ", ".join(repr(k) for k in list(obj)[:10])
    raise ValueError(
        f"{path} does not hold a state dict: expected a dict of tensors or a checkpoint with one "
        f"under {list(_NESTED_KEYS)}; top-level keys found: {keys or '(none)'}"
    )


def _unprefix(key: str, prefix: str) -> str:
    """``"module.conv1"`` -> ``"conv1"``; the wrapper's own metadata key ``"module"`` -> ``""``."""
    if key.startswith(prefix):
        return key[len(prefix) :]
    return "" if key == prefix.rstrip(".") else key


def _strip_prefixes(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)  # per-module versions, keyed like the modules
    changed = True
    while changed and out:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = OrderedDict((_unprefix(k, prefix), v) for k, v in out.items())
                if metadata is not None:
                    metadata = OrderedDict((_unprefix(k, prefix), v) for k, v in metadata.items())
                changed = True
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]  # keeps BatchNorm versioning intact
    return out


def _describe(keys: list[str], shapes: Mapping[str, Any]) -> str:
    shown = [f"{k} {tuple(shapes[k].shape)}" for k in keys[:_MAX_KEYS_SHOWN]]
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return ", ".join(shown) + more


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Read the state dict stored in ``path`` (a plain state dict or a training checkpoint).

    A common ``module.`` prefix (``nn.DataParallel``) or ``_orig_mod.`` (``torch.compile``) is
    removed. Raises ``FileNotFoundError`` if the file does not exist and ``ValueError`` if it
    cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = _torch_load(path)
    return _strip_prefixes(_extract_state_dict(obj, path))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly and return ``model``.

    ``path`` may hold a plain state dict or a checkpoint dict that carries one under
    ``'state_dict'``, ``'model_state_dict'`` or ``'model'``; a common ``module.`` prefix is
    stripped. The file is read with ``torch.load(weights_only=True)``; legacy pickled
    checkpoints that need ``weights_only=False`` are still accepted, with a logged warning.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable, holds no state dict, or its keys or shapes do not
            match ``model`` (the model is left unchanged then).
    """
    path = Path(path)
    state = read_state_dict(path)
    expected = model.state_dict()

    # BatchNorm checkpoints from before PyTorch 0.4.1 carry no ``num_batches_tracked``: keep the
    # model's own counter instead of calling that a mismatch.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        k
        for k in expected
        if k in state
        and isinstance(state[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_describe(missing, expected)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected, state)}")
        if mismatched:
            shown = [
                f"{k} file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in mismatched[:_MAX_KEYS_SHOWN]
            ]
            more = (
                f" (+{len(mismatched) - _MAX_KEYS_SHOWN} more)"
                if len(mismatched) > _MAX_KEYS_SHOWN
                else ""
            )
            problems.append(f"{len(mismatched)} shape mismatch(es): {', '.join(shown)}{more}")
        raise ValueError(
            f"weights file {path} does not match {type(model).__name__}: "
            + "; ".join(problems)
            + f". Fix: {_FIX}."
        )

    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s into %s", len(state), path, type(model).__name__)
    return model
