"""Settings of the paper's first-layer ablation, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adaround.analysis.hessian import HESSIANS
from adaround.analysis.qubo import MAX_DENSE
from adaround.config import QuantConfig, _check_choice, _check_int_range
from adaround.errors import ConfigError


@dataclass(frozen=True)
class AnalysisConfig:
    """How to run the rounding ablation on one layer of a network.

    The defaults follow the paper's ablation (4-bit symmetric per-tensor weights, MSE grid,
    100 stochastic samples) except the relaxation's iterations (paper: 10k).

    Example:
        >>> cfg = AnalysisConfig(bits=(4, 3), samples=32, iters=1000)
        >>> cfg.quant_config(4).weight_bits
        4
    """

    layer: str | None = None  # None: the first layer in execution order
    bits: tuple[int, ...] = (4,)
    per_channel: bool = False
    samples: int = 100  # stochastic rounding samples
    hessian: str = "gauss_newton"
    hessian_samples: int = 512  # calibration samples behind the task-loss Hessian
    max_classes: int | None = None  # Gauss-Newton: each sample's most probable classes only
    task_samples: int | None = None  # calibration samples for the task loss (None: all)
    sweeps: int = 200  # simulated-annealing sweeps of the QUBO solver
    iters: int = 2000  # relaxation iterations per layer
    lr: float | None = None  # Adam's lr for the relaxation (None: the core's 1e-3)
    batch_size: int = 32
    eval_batch_size: int = 32  # forward batches when scoring (small ones stay in cache)
    all_layers: bool = True  # also quantize every layer with local MSE and the relaxation
    all_layers_iters: int | None = None  # relaxation iterations there (None: iters)
    all_layers_sweeps: int = 20
    max_dense: int = MAX_DENSE
    seed: int = 0

    def __post_init__(self) -> None:
        bits = (self.bits,) if isinstance(self.bits, int) else tuple(self.bits)
        if not bits:
            raise ConfigError("bits is empty: give at least one bit width, e.g. bits=(4,)")
        for b in bits:
            _check_int_range("bits", b, 2, 8)
        object.__setattr__(self, "bits", bits)
        _check_choice("hessian", self.hessian, HESSIANS)
        _check_int_range("samples", self.samples, 2)
        _check_int_range("hessian_samples", self.hessian_samples, 1)
        for name in ("max_classes", "task_samples", "all_layers_iters"):
            if getattr(self, name) is not None:
                _check_int_range(name, getattr(self, name), 1)
        _check_int_range("sweeps", self.sweeps, 0)
        _check_int_range("all_layers_sweeps", self.all_layers_sweeps, 0)
        _check_int_range("iters", self.iters, 1)
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be a positive number (or None for 1e-3)")
        _check_int_range("batch_size", self.batch_size, 1)
        _check_int_range("eval_batch_size", self.eval_batch_size, 1)
        _check_int_range("max_dense", self.max_dense, 1)
        _check_int_range("seed", self.seed, 0)
        if self.layer is not None and not isinstance(self.layer, str):
            raise ConfigError(f"layer must be a module name or None, got {self.layer!r}")
        for name in ("per_channel", "all_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def quant_config(self, bits: int, iters: int | None = None) -> QuantConfig:
        """The core's settings for one bit width (grid, relaxation hyper-parameters)."""
        extra = {} if self.lr is None else {"lr": float(self.lr)}
        return QuantConfig(weight_bits=bits, per_channel=self.per_channel,
                           iters=iters or self.iters, batch_size=self.batch_size,
                           seed=self.seed, **extra)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bits"] = list(self.bits)
        return data
