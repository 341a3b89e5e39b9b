"""The cached block inputs of the two streams, in memory up to a budget and on disk beyond it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import Tensor

from adaround.leftovers import make_spill_folder

log = logging.getLogger(__name__)


class Budget:
    """Bytes of cached tensors held in memory, shared by every store; the rest spills to files
    in one temporary folder, removed by `close`."""

    def __init__(self, limit_mb: float | None = None, spill_dir: str | None = None) -> None:
        self.limit = None if limit_mb is None else int(limit_mb * 2**20)
        self.parent = spill_dir
        self.folder: Path | None = None
        self.in_memory = 0
        self.peak_in_memory = 0
        self.spilled = 0  # bytes written to disk, all told
        self.files = 0

    def admits(self, nbytes: int) -> bool:
        return self.limit is None or self.in_memory + nbytes <= self.limit

    def take(self, nbytes: int) -> None:
        self.in_memory += nbytes
        self.peak_in_memory = max(self.peak_in_memory, self.in_memory)

    def new_file(self) -> Path:
        if self.folder is None:
            self.folder = make_spill_folder(self.parent)
            log.info("cached activations over the %.0f MB budget spill to %s",
                     (self.limit or 0) / 2**20, self.folder)
        self.files += 1
        return self.folder / f"{self.files}.pt"

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class BatchStore:
    """One stream's tensor per calibration batch (e.g. a block's input hidden states)."""

    def __init__(self, budget: Budget, device: torch.device | None = None) -> None:
        self.budget = budget
        self.device = device  # where kept tensors live (CPU under offload)
        self.items: list[Tensor | Path] = []
        self.held = 0

    def append(self, t: Tensor) -> None:
        t = t.detach()
        if self.device is not None:
            t = t.to(self.device)
        nbytes = t.numel() * t.element_size()
        if self.budget.admits(nbytes):
            self.budget.take(nbytes)
            self.held += nbytes
            self.items.append(t)
            return
        path = self.budget.new_file()
        torch.save(t.cpu(), path)
        self.budget.spilled += nbytes
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tensor:
        item = self.items[index]
        if isinstance(item, Path):
            t = torch.load(item, map_location="cpu", weights_only=True)
            return t.to(self.device) if self.device is not None else t
        return item

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.budget.in_memory -= self.held
        self.items, self.held = [], 0
