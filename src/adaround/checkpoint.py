"""Resumable reconstruction: after each layer or block, the state so far goes to one file.

`quantize(..., checkpoint_dir=DIR)` writes DIR/progress.pt atomically after every unit: the
quantized model's buffers (codes, grids, activation steps), each QuantLayer's mode, the
state of the one torch.Generator the loop draws from, the units done and their report lines,
with a fingerprint of the run (config, model weights, calibration data). A run started again
with the same arguments restores that state and continues with the next unit; since the
later units see exactly the codes, steps and random stream they would have seen, the result
is identical to an uninterrupted run. A fingerprint that differs is refused.

Inside a process group (torchrun) every process holds the whole quantized model after each
unit, so process 0 alone writes the file (`writer`) and every process restores from it: the
folder must be one folder on storage all processes reach (adaround.distributed checks that
they all see the same progress). The fingerprint holds nothing of the process layout, and the
number of processes may change between runs: the codes do not depend on it (the batches are
drawn as global sample indices, the moments are sums over all data).

The file holds pickled report objects: load checkpoints only from folders you wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaround.config import QuantConfig
from adaround.errors import CheckpointError
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

FILE = "progress.pt"
VERSION = 1
# options that change how fast a run goes, never what it computes
_NEUTRAL = ("memory_budget_mb",)


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (also the saved file's)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module, x: Tensor | dict[str, Tensor], cfg: QuantConfig,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run's result depends on: config, weights, data (a tensor, or named tensors such
    as a transformer's batches) and `options` beyond the config (quantize_hf's HFOptions)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in _NEUTRAL}
    data = x if isinstance(x, dict) else {"x": x}
    return {"version": VERSION, "config": config, "model": tensor_digest(model.state_dict()),
            "data": tensor_digest(data), "options": options}


_WHAT = {"config": "options (QuantConfig)", "model": "model weights",
         "data": "calibration data", "options": "options (HFOptions)",
         "version": "checkpoint format"}


class Checkpoint:
    """The progress of one run; `Checkpoint(None, ...)` records nothing."""

    def __init__(self, folder: str | os.PathLike[str] | None, model: nn.Module,
                 x: Tensor | dict[str, Tensor], cfg: QuantConfig, writer: bool = True,
                 processes: int = 1, options: dict[str, Any] | None = None) -> None:
        self.path = None if folder is None else Path(folder) / FILE
        self.writer, self.processes = writer, processes
        self.done: list[str] = []
        self.state: dict[str, Any] | None = None
        if self.path is None:
            return
        self.fingerprint = fingerprint(model, x, cfg, options)
        if self.path.exists():
            self.state = self._read()
            self.done = list(self.state["done"])

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            saved = state["fingerprint"]
        except Exception as exc:
            raise CheckpointError(f"{self.path} is not a readable checkpoint ({exc}): delete it "
                                  "to start over") from exc
        for key, what in _WHAT.items():
            if saved.get(key) != self.fingerprint[key]:
                raise CheckpointError(
                    f"the checkpoint in {self.path.parent} belongs to a run with other {what}: "
                    "run again with the same model, data and options to resume, or pass another "
                    "checkpoint folder (or delete this one) to start over")
        return state

    def restore(self, qmodel: nn.Module, generator: torch.Generator) -> list[Any]:
        """Put the saved state into `qmodel` and `generator`; the report of the units done."""
        if self.state is None:
            return []
        buffers = dict(qmodel.named_buffers())
        with torch.no_grad():
            for name, value in self.state["buffers"].items():
                buffers[name].copy_(value)
        for name, mode in self.state["modes"].items():
            qmodel.get_submodule(name).mode = mode
        generator.set_state(self.state["generator"])
        level = logging.INFO if self.writer else logging.DEBUG  # said once in a process group
        log.log(level, "resuming from %s: %d units done (%s)", self.path, len(self.done),
                ", ".join(self.done[-3:]))
        before = self.state.get("processes", 1)
        if before != self.processes:
            log.log(level, "the checkpoint was written by a run on %d process(es), this one "
                    "runs on %d: the codes do not depend on it", before, self.processes)
        return list(self.state["report"])

    def record(self, names: list[str], qmodel: nn.Module, generator: torch.Generator,
               report: list[Any]) -> None:
        """Units `names` are done: write the state after them (atomically; in a process group,
        process 0 alone writes, every process holds the same state)."""
        if self.path is None:
            return
        from adaround.io import atomic_write

        self.done.extend(names)
        if not self.writer:
            return
        state = {
            "fingerprint": self.fingerprint, "done": self.done, "report": list(report),
            "buffers": {k: v.detach().cpu().clone() for k, v in qmodel.named_buffers()},
            "modes": {n: m.mode for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)},
            "generator": generator.get_state(), "processes": self.processes,
        }
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def remove(folder: str | os.PathLike[str]) -> None:
    """Delete a run's progress file (and the folder, when that leaves it empty)."""
    path = Path(folder) / FILE
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def save_then_remove(qmodel: nn.Module, output: str | os.PathLike[str],
                     folder: str | os.PathLike[str] | None) -> None:
    """Write the quantized model to `output` (atomically), then delete the run's progress in
    `folder` (if any): once the output is safe, the progress file has served."""
    from adaround.io import save

    save(qmodel, output)
    if folder:
        remove(folder)
