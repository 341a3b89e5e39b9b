"""Solvers for the rounding QUBO: greedy local search, simulated annealing, exhaustive search.

All work on choices shaped [R, m] (the rows of a :class:`Qubo`) and treat the rows as
independent problems, batched. The inner loops run in NumPy float64: at a few hundred
variables per problem a single flip costs microseconds there, tens of them in torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from adaround.analysis.grid import RoundingGrid
from adaround.analysis.qubo import Qubo
from adaround.config import QuantConfig
from adaround.errors import ModelError
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.loop import optimise_rounding

log = logging.getLogger(__name__)

EXHAUSTIVE_MAX = 22  # 4M choices per row
_CHUNK = 1 << 16


class _State:
    """Choice b, error e = offset + step * b and field y = K e of every row, kept in sync."""

    def __init__(self, qubo: Qubo, init: Tensor) -> None:
        self.kernel = qubo.kernel.detach().cpu().double().numpy()
        self.shared = self.kernel.shape[0] == 1
        self.step = qubo.step.detach().cpu().double().numpy()
        self.offset = qubo.offset.detach().cpu().double().numpy()
        self.factor = float(qubo.factor)
        self.b = init.reshape(qubo.rows, qubo.size).cpu().numpy().astype(bool).copy()
        self.e = self.offset + self.step * self.b
        self.diag = np.diagonal(self.kernel, axis1=1, axis2=2) * np.ones_like(self.step)
        self.y = (self.e @ self.kernel[0]) if self.shared else np.einsum(
            "rmn,rn->rm", self.kernel, self.e)

    def values(self) -> np.ndarray:
        return self.factor * (self.e * self.y).sum(1)

    def deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """(de, df): error change and objective change of flipping each variable."""
        de = np.where(self.b, -self.step, self.step)
        return de, self.factor * (2.0 * de * self.y + de * de * self.diag)

    def flip(self, rows: np.ndarray, cols: np.ndarray, de: np.ndarray) -> None:
        columns = self.kernel[0][cols] if self.shared else self.kernel[rows, cols]
        self.y[rows] += de[:, None] * columns
        self.e[rows, cols] += de
        self.b[rows, cols] ^= True


def _tolerance(state: _State) -> float:
    scale = state.factor * float(np.max(state.diag * state.step**2, initial=0.0))
    return 1e-12 * max(scale, 1e-300)


def _descend(state: _State, max_steps: int) -> None:
    """Best-improvement single flips in every row until none lowers that row's objective."""
    tol = _tolerance(state)
    all_rows = np.arange(state.b.shape[0])
    for _ in range(max_steps):
        de, df = state.deltas()
        cols = df.argmin(1)
        gain = df[all_rows, cols]
        active = gain < -tol
        if not active.any():
            return
        rows = all_rows[active]
        state.flip(rows, cols[active], de[rows, cols[active]])
    log.warning("local search stopped after %d steps before converging", max_steps)


def local_search(qubo: Qubo, init: Tensor) -> Tensor:
    """Greedy descent from `init`: a choice no single flip can improve ([R, m] bool)."""
    state = _State(qubo, init)
    _descend(state, max_steps=20 * qubo.size + 100)
    return torch.from_numpy(state.b.copy())


def anneal(qubo: Qubo, init: Tensor, sweeps: int, generator: torch.Generator,
           final_ratio: float = 1e-2) -> Tensor:
    """Simulated annealing from `init`, then greedy descent from the best choice seen.

    Each sweep proposes every variable once (random order) with Metropolis acceptance; the
    temperature falls geometrically from the median single-flip change at `init` to
    `final_ratio` times that. Rows keep their best choice, so the result is never worse than
    the greedy descent from `init`.
    """
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    state = _State(qubo, init)
    _descend(state, max_steps=20 * qubo.size + 100)
    best_b, best_f = state.b.copy(), state.values()
    rows, m = state.b.shape
    _, df = state.deltas()
    t0 = np.median(np.abs(df), axis=1)
    t0 = np.where(t0 > 0, t0, 1e-300)
    all_rows = np.arange(rows)
    for sweep in range(sweeps):
        temp = t0 * final_ratio ** (sweep / max(sweeps - 1, 1))
        uniform = rng.random((m, rows))
        for k, i in enumerate(rng.permutation(m)):
            de = np.where(state.b[:, i], -state.step[:, i], state.step[:, i])
            d = state.factor * (2.0 * de * state.y[:, i] + de * de * state.diag[:, i])
            accept = (d <= 0) | (uniform[k] < np.exp(-np.maximum(d, 0) / temp))
            if accept.any():
                sel = all_rows[accept]
                state.flip(sel, np.full(sel.shape, i), de[accept])
        current = state.values()
        better = current < best_f
        best_b[better], best_f[better] = state.b[better], current[better]
    final = _State(qubo, torch.from_numpy(best_b))
    _descend(final, max_steps=20 * qubo.size + 100)
    return torch.from_numpy(final.b.copy())


def exhaustive(qubo: Qubo, max_size: int = EXHAUSTIVE_MAX) -> Tensor:
    """The optimum of every row by enumerating all 2^m choices (toy sizes only)."""
    m = qubo.size
    if m > max_size:
        raise ModelError(f"exhaustive search over 2^{m} choices per row is too slow: use it for "
                         f"rows of at most {max_size} variables, and anneal() beyond")
    bits = 1 << torch.arange(m)
    best = torch.zeros(qubo.rows, m, dtype=torch.bool)
    for r in range(qubo.rows):
        row = Qubo(qubo.kernel[r if qubo.kernel.shape[0] > 1 else 0][None],
                   qubo.offset[r: r + 1], qubo.step[r: r + 1], qubo.factor)
        best_value = float("inf")
        for start in range(0, 1 << m, _CHUNK):
            codes = torch.arange(start, min(start + _CHUNK, 1 << m))
            choices = (codes[:, None] & bits) > 0
            values = row.values(choices[:, None, :])
            k = int(values.argmin())
            if float(values[k]) < best_value:
                best_value, best[r] = float(values[k]), choices[k]
    return best


def relaxation(qlayer: QuantLayer, x: Tensor, target: Tensor,
               activation: Callable[[Tensor], Tensor] | None, cfg: QuantConfig,
               generator: torch.Generator) -> Tensor:
    """The AdaRound continuous relaxation (the core's optimisation), as a choice."""
    codes = optimise_rounding(qlayer, x, target, activation, cfg, generator)
    return RoundingGrid.of(qlayer).choice_of(codes)
