"""Cached activations within a memory budget: what does not fit goes to files on disk.

A spilled tensor is written once to its own file and read back through a memory map that
lives only while it is read, so its pages do not stay resident (and do not count against the
budget) between uses. `Spilled` supports what the reconstruction does with its data: whole
reads, row gathers (random batches), row slices and `split`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adaround.leftovers import make_spill_folder

log = logging.getLogger(__name__)


class Spilled:
    """Rows [start, stop) of a tensor stored in a file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype,
                 start: int = 0, stop: int | None = None) -> None:
        self.path, self.full_shape, self.dtype = path, shape, dtype
        self.start, self.stop = start, shape[0] if stop is None else stop

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, *self.full_shape[1:]))

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def __len__(self) -> int:
        return self.stop - self.start

    def _map(self) -> np.memmap:
        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        return np.memmap(self.path, dtype=np_dtype, mode="r", shape=self.full_shape)

    def load(self) -> Tensor:
        """The whole tensor, read into memory."""
        mapped = self._map()
        out = torch.from_numpy(np.array(mapped[self.start:self.stop]))
        del mapped  # unmap: the pages leave this process's resident set
        return out

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("spilled tensors are sliced with step 1 only")
            return Spilled(self.path, self.full_shape, self.dtype, self.start + start,
                           self.start + max(start, stop))
        rows = torch.as_tensor(index).reshape(-1).cpu().numpy() + self.start
        mapped = self._map()
        out = torch.from_numpy(np.array(mapped[rows]))
        del mapped
        return out

    def split(self, size: int) -> Iterator[Tensor]:
        for begin in range(0, len(self), size):
            yield self[begin:begin + size].load()


def materialize(value: Any) -> Any:
    return value.load() if isinstance(value, Spilled) else value


def nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, Tensor) else 0


class SpillStore:
    """Files for spilled tensors in one temporary directory, removed by `close`."""

    def __init__(self, budget_bytes: int, directory: str | None = None) -> None:
        self.budget = budget_bytes
        self.dir = make_spill_folder(directory)
        self.count = 0
        self.spilled_bytes = 0

    def put(self, tensor: Tensor) -> Spilled:
        """Write `tensor` to a new file and return its handle."""
        self.count += 1
        path = self.dir / f"{self.count}.bin"
        data = tensor.detach().cpu().contiguous()
        data.numpy().tofile(path)
        self.spilled_bytes += data.nbytes
        return Spilled(path, tuple(data.shape), data.dtype)

    def write_rows(self, chunks: Iterable[Tensor]) -> Spilled:
        """Concatenate `chunks` along dim 0 straight into a file, one chunk in memory at once."""
        self.count += 1
        path = self.dir / f"{self.count}.bin"
        rows, tail, dtype = 0, None, None
        with path.open("wb") as fh:
            for chunk in chunks:
                data = chunk.detach().cpu().contiguous()
                fh.write(data.numpy().tobytes())
                rows, tail, dtype = rows + data.shape[0], tuple(data.shape[1:]), data.dtype
        if dtype is None or tail is None:
            raise ValueError("no rows to write")
        self.spilled_bytes += path.stat().st_size
        return Spilled(path, (rows, *tail), dtype)

    def fit(self, envs: list[dict[Any, Any]], keys: Any = None, reserve: int = 0) -> None:
        """Spill the largest resident values of `envs` (those whose key passes `keys`) until
        they and `reserve` bytes fit the budget."""
        resident = [(nbytes(v), env, key) for env in envs for key, v in env.items()
                    if isinstance(v, Tensor) and v.dim() > 0 and (keys is None or keys(key))]
        total = sum(size for size, _, _ in resident) + reserve
        for size, env, key in sorted(resident, key=lambda item: -item[0]):
            if total <= self.budget:
                break
            env[key] = self.put(env[key])
            total -= size

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.spilled_bytes:
            log.info("spilled %.0f MB of cached activations to disk", self.spilled_bytes / 2**20)


@contextmanager
def budget_store(budget_mb: float | None) -> Iterator[SpillStore | None]:
    """A spill store for `budget_mb` megabytes (None: no budget, no store), removed on exit."""
    store = SpillStore(int(budget_mb * 2**20)) if budget_mb is not None else None
    try:
        yield store
    finally:
        if store is not None:
            store.close()
