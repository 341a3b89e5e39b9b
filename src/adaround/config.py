"""Quantization settings: one frozen dataclass, validated at construction.

The defaults are the AdaRound paper's: symmetric 4-bit weights, one scale per tensor chosen by
an MSE grid search, 10k iterations per layer at batch 32, Adam lr 1e-3, lambda 0.01, beta
annealed 20 -> 2 after a 20 % warm start, loss taken after the following activation.

`loss="quadratic"` evaluates the loss on all calibration data at every step, from second
moments of the layer's inputs; it has no activation inside, so for a layer followed by one it
is the loss before it ("quadratic_warmup": in the warm start only, the paper's loss after it).
`loss="auto"` (the default, the one departure from the paper's settings) takes the quadratic
loss for each layer where one of its steps costs fewer multiply-adds than a sampled step, the
paper's sampled loss elsewhere (accuracy and time of each: BENCHMARKS.md). `loss="sampled"`
is the paper exactly.
`group_size` gives each run of that many consecutive input weights of an output channel its
own grid (Linear and Embedding layers; it must divide their input dimension), per channel implied.
`inputs="float"` takes each layer's input from the FP network (the paper's symmetric
reconstruction) instead of the partly quantized one (eq. 25, the default): the layers are then
independent, and those of one shape are rounded in one loop with batched kernels.
`moment_positions` caps the positions (samples x output positions) from which a layer's
moments are computed: a seeded uniform subset of that many where a layer has more (its cost
falls in proportion; accuracy: BENCHMARKS.md). None (the default): all of them, exact.
`QuantConfig.fast()` is the preset measured to reach the default's accuracy in a fraction of
its time on the CIFAR ResNets (few steps at a matching lr where the quadratic loss is taken,
subsampled moments); EfficientNet-Lite0 needs more steps (BENCHMARKS.md, "Time to accuracy").
`step_precision` "auto" (the default) multiplies the change of the weights by the moments in
bfloat16 in most steps of layers with rows of 512 or more, on CPUs with bfloat16 matrix units
(AMX, AVX512-BF16), the gradient refreshed exactly every 32 steps; "float32" always exactly
(the moments, the losses and the codes' scoring are float32 either way; BENCHMARKS.md).
`early_stop` ends a layer once every h(V) has stayed exactly 0 or 1 for 100 steps: V then gets
no gradient, and the codes are those of the full run.
`lr` 1e-3 is the paper's for 10k-20k iterations. An Adam step moves V by about lr, and V spans
about +-2.4 between rounding down and up, so a run of `iters` can only flip weights within
lr * iters of a tie: `short_run_note` says so, and lr ~ 3 / iters fits short runs (ResNet-20
W2A4, 300 iterations: 21.9 % at lr 1e-3, 74.3 % at lr 1e-2; BENCHMARKS.md).

Activations (off unless `act_bits` is set): every quantized layer's input is fake-quantized
per tensor at `act_bits` (unsigned where the calibration data is non-negative), the model
input at `input_act_bits` and the last layer's input at `last_act_bits` (both default to
`act_bits`: the paper's W4A8; the literature keeps them at 8 for W4A4 and below). Ranges from
the calibration data by `act_range` ("minmax", the paper's; "mse" search; "percentile", at
`act_percentile` of |x|). `unit="block"` reconstructs whole blocks at once (BRECQ; blocks
found automatically or named by `blocks` patterns; `fisher` weights the output error by the
diagonal Fisher); `qdrop=p` keeps each activation quantized with probability p during
reconstruction (QDrop); `learn_act_scale` learns the activation steps (LSQ, lr `act_lr`)
jointly with the rounding. `method="adaround"|"brecq"|"qdrop"` is shorthand for those
settings (see adaround.act_config); the options left unset take the method's values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from adaround.act_config import resolve_activation_options
from adaround.errors import ConfigError
from adaround.primitives import V_SPAN

CONFIG_VERSION = 1

ROUNDING_MODES = ("adaround", "nearest")
SCALE_METHODS = ("mse", "minmax")
BETA_DECAYS = ("cosine", "linear")
LOSSES = ("auto", "sampled", "quadratic", "quadratic_warmup")
STEP_PRECISIONS = ("auto", "float32", "bfloat16")
INPUTS = ("quantized", "float")


def short_run_note(cfg: QuantConfig) -> str | None:
    """A warning where lr * iters is too short a reach for V to flip most rounding decisions,
    with the fix; None otherwise (the paper's 10k iterations at lr 1e-3)."""
    reach = cfg.lr * cfg.iters
    if cfg.rounding != "adaround" or reach >= V_SPAN:
        return None
    return (f"iters={cfg.iters} at lr={cfg.lr:g}: Adam moves each V by at most about "
            f"{reach:.2g} (rounding up and down are {2 * V_SPAN:.2g} apart), so only weights near "
            f"a tie can change their rounding; set lr to about {3 / cfg.iters:.2g} (3 / iters) "
            "or run more iterations")


#: QuantConfig.fast(): the quadratic loss is full-batch and deterministic, so few steps at a
#: larger lr (about 3 / iters: `short_run_note`) reach the codes' accuracy of the paper's long
#: runs, and the moments of a subset of the positions estimate the full ones closely
FAST_PRESET: dict[str, Any] = {"iters": 100, "lr": 0.03, "loss": "auto",
                               "moment_positions": 2**15}
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds


def _check_int_range(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}: pass a whole number")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={value} is out of range: use a value {bound}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported: choose one of {', '.join(choices)}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}: pass a float")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number: pass a finite value "
                          f"{'>= 0' if allow_zero else '> 0'} (the default is the paper's)")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}: pass a "
                          f"{'non-negative' if allow_zero else 'positive'} value")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a network's weights.

    Example:
        >>> cfg = QuantConfig(weight_bits=3, per_channel=True)
        >>> cfg.rounding
        'adaround'
    """

    weight_bits: int = 4
    per_channel: bool = False
    symmetric: bool = True
    rounding: str = "adaround"
    iters: int = 10000
    batch_size: int = 32
    seed: int = 0
    scale_method: str = "mse"
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    beta_decay: str = "cosine"
    loss_after_activation: bool = True
    loss: str = "auto"
    early_stop: bool = True
    first_last_bits: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True
    memory_budget_mb: float | None = None
    moment_positions: int | None = None
    step_precision: str = "auto"
    compile: bool = False
    inputs: str = "quantized"
    act_bits: int | None = None
    act_range: str | None = None  # None: the method's ("minmax" for AdaRound)
    act_percentile: float = 99.99
    input_act_bits: int | None = None  # None: act_bits
    last_act_bits: int | None = None  # None: act_bits
    unit: str | None = None  # None: the method's ("layer" for AdaRound)
    blocks: tuple[str, ...] = ()
    fisher: bool = False
    qdrop: float | None = None
    learn_act_scale: bool | None = None  # None: the method's (False for AdaRound)
    act_lr: float = 4e-5
    method: str | None = None
    group_size: int | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        _check_int_range("weight_bits", self.weight_bits, 2, 8)
        if self.first_last_bits is not None:
            _check_int_range("first_last_bits", self.first_last_bits, 2, 8)
        if self.group_size is not None:
            # a group is a run of input weights of one output channel: per channel implied
            _check_int_range("group_size", self.group_size, 1)
            object.__setattr__(self, "per_channel", True)
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        _check_choice("scale_method", self.scale_method, SCALE_METHODS)
        _check_choice("beta_decay", self.beta_decay, BETA_DECAYS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("inputs", self.inputs, INPUTS)
        _check_choice("step_precision", self.step_precision, STEP_PRECISIONS)
        if self.memory_budget_mb is not None:
            _check_positive("memory_budget_mb", self.memory_budget_mb)
        if self.moment_positions is not None:
            _check_int_range("moment_positions", self.moment_positions, 1)
        _check_int_range("iters", self.iters, 1)
        _check_int_range("batch_size", self.batch_size, 1)
        _check_int_range("seed", self.seed, 0, SEED_MAX)
        _check_positive("lr", self.lr)
        _check_positive("reg_weight", self.reg_weight, allow_zero=True)
        _check_positive("beta_start", self.beta_start)
        _check_positive("beta_end", self.beta_end)
        if self.beta_end > self.beta_start:
            raise ConfigError(
                f"beta_end={self.beta_end} exceeds beta_start={self.beta_start}: beta is "
                "annealed from high to low, swap the two values"
            )
        _check_positive("warm_start", self.warm_start, allow_zero=True)
        if not 0.0 <= self.warm_start < 1.0:
            raise ConfigError(f"warm_start={self.warm_start} must be in [0, 1): use a fraction "
                              "of the iterations, e.g. 0.2 (the paper's)")
        for name in ("per_channel", "symmetric", "loss_after_activation", "early_stop", "compile",
                     "fold_bn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}: "
                                  "pass a bool")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a sequence of module-name patterns: pass "
                                  "strings such as 'layer1.*'")
            else:
                object.__setattr__(self, name, tuple(value))
        resolve_activation_options(self)
        if self.version > CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version} is newer than this library's "
                f"({CONFIG_VERSION}): upgrade adaround"
            )

    @classmethod
    def fast(cls, **overrides: Any) -> QuantConfig:
        """The time-to-accuracy preset: FAST_PRESET's settings (measured in BENCHMARKS.md,
        "Time to accuracy"), any of them replaced by `overrides`."""
        return cls(**{**FAST_PRESET, **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        data["blocks"] = list(self.blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        values = dict(data)
        for name in ("include", "exclude", "blocks"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
