"""Resolution and validation of QuantConfig's activation / reconstruction-unit options.

`method` is a shorthand for settings that also exist one by one, so every method runs the same
code path:

    method      unit     act_range  learn_act_scale  qdrop
    adaround    layer    minmax     False            off    (the paper; W4A8 uses this)
    brecq       block    mse        True             off    (Li et al. 2021)
    qdrop       block    mse        True             0.5    (Wei et al. 2022)

The options left at None are filled in from the method (or from "adaround" without one); an
option given explicitly that contradicts the method is refused. The learned step and the MSE
range only apply with quantized activations (act_bits set).
"""

from __future__ import annotations

from typing import Any

from adaround.errors import ConfigError

METHODS = ("adaround", "brecq", "qdrop")
UNITS = ("layer", "block")
ACT_RANGES = ("minmax", "mse", "percentile")

_PRESETS: dict[str, dict[str, Any]] = {
    "adaround": {"unit": "layer", "act_range": "minmax", "learn_act_scale": False, "qdrop": None},
    "brecq": {"unit": "block", "act_range": "mse", "learn_act_scale": True, "qdrop": None},
    "qdrop": {"unit": "block", "act_range": "mse", "learn_act_scale": True, "qdrop": 0.5},
}


def _set(cfg: Any, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)


def _apply_method(cfg: Any) -> None:
    method = cfg.method or "adaround"
    if method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not supported: choose one of "
                          f"{', '.join(METHODS)} (or leave it unset and choose unit/qdrop/"
                          "learn_act_scale one by one)")
    preset = dict(_PRESETS[method])
    if cfg.act_bits is None:  # weight-only: no activation grid to search, learn or drop
        if method == "qdrop":
            raise ConfigError("method='qdrop' drops activation quantization at random, which "
                              "is off: set act_bits (2-8), or use method='brecq' for weights only")
        preset.update(act_range="minmax", learn_act_scale=False)
    for name, value in preset.items():
        given = getattr(cfg, name)
        if given is None:
            _set(cfg, name, value)
        elif cfg.method is None or given == value or name == "act_range":
            continue  # the starting range is a free choice under every method
        elif name == "qdrop" and method == "brecq":
            raise ConfigError(f"method='brecq' has no QDrop; qdrop={given} asks for it: use "
                              "method='qdrop' (or drop qdrop)")
        elif not (name == "qdrop" and method == "qdrop"):  # QDrop takes any probability
            raise ConfigError(f"method={method!r} means {name}={value!r}, not {name}={given!r}: "
                              "drop one of the two options (or drop method and set the "
                              "options one by one)")


def _needs_act_bits(cfg: Any, given: dict[str, Any]) -> None:
    for name, value in given.items():
        if value:
            raise ConfigError(f"{name}={value!r} applies to quantized activations, which are "
                              "off: set act_bits (2-8) as well, or drop the option")


def resolve_activation_options(cfg: Any) -> None:
    """Fill in the method's settings and refuse contradictory combinations (in place)."""
    from adaround.config import _check_choice, _check_int_range, _check_positive

    for name in ("act_bits", "input_act_bits", "last_act_bits"):
        if getattr(cfg, name) is not None:
            _check_int_range(name, getattr(cfg, name), 2, 8)
    if cfg.act_bits is None:
        # "minmax" is what a weight-only config resolves act_range to: to_dict keeps it, and
        # from_dict (adaround.load) must accept it back
        act_range = None if cfg.act_range == "minmax" else cfg.act_range
        _needs_act_bits(cfg, {"act_range": act_range, "learn_act_scale": cfg.learn_act_scale,
                              "qdrop": cfg.qdrop, "input_act_bits": cfg.input_act_bits,
                              "last_act_bits": cfg.last_act_bits})
    _apply_method(cfg)
    _check_choice("unit", cfg.unit, UNITS)
    _check_choice("act_range", cfg.act_range, ACT_RANGES)
    for name in ("fisher", "learn_act_scale"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(cfg, name)!r}: "
                              "pass a bool")
    if cfg.qdrop is not None:
        _check_positive("qdrop", cfg.qdrop)
        if cfg.qdrop > 1:
            raise ConfigError(f"qdrop={cfg.qdrop} is the probability that an activation stays "
                              "quantized during reconstruction: use a value in (0, 1] (0.5)")
    _check_positive("act_lr", cfg.act_lr)
    _check_positive("act_percentile", cfg.act_percentile)
    if not 50 < cfg.act_percentile <= 100:
        raise ConfigError(f"act_percentile={cfg.act_percentile} must be in (50, 100] "
                          "(99.99 clips the top 0.01 % of |x|)")
    if isinstance(cfg.blocks, str):
        _set(cfg, "blocks", (cfg.blocks,))
    elif not all(isinstance(p, str) for p in cfg.blocks):
        raise ConfigError("blocks must be a sequence of module names or glob patterns")
    else:
        _set(cfg, "blocks", tuple(cfg.blocks))
    _check_combinations(cfg)


def _check_combinations(cfg: Any) -> None:
    if cfg.unit == "layer" and cfg.fisher:
        raise ConfigError("fisher=True weights the error of a block's output: set unit='block' "
                          "(or method='brecq'), or drop fisher")
    if cfg.unit == "layer" and cfg.blocks:
        raise ConfigError(f"blocks={list(cfg.blocks)} name the units of block reconstruction: "
                          "set unit='block' as well")
    reconstructs = {"unit='block'": cfg.unit == "block", "fisher=True": cfg.fisher,
                    f"qdrop={cfg.qdrop}": cfg.qdrop is not None,
                    "learn_act_scale=True": cfg.learn_act_scale}
    asked = [name for name, on in reconstructs.items() if on]
    if cfg.rounding == "nearest" and asked:
        raise ConfigError(f"rounding='nearest' reconstructs nothing, so {', '.join(asked)} "
                          "cannot apply: use rounding='adaround', or drop them")
    if cfg.loss in ("quadratic", "quadratic_warmup") and uses_unit_loop(cfg):
        raise ConfigError(f"loss={cfg.loss!r} needs fixed layer inputs, which "
                          f"{', '.join(asked)} change at every step: use loss='sampled' "
                          "(or 'auto'), or unit='layer' without qdrop and learn_act_scale")


def uses_unit_loop(cfg: Any) -> bool:
    """Whether reconstruction runs the autograd unit loop (reconstruct/block.py) rather than
    the paper's layer loop with the gradient written out (reconstruct/loop.py)."""
    return bool(cfg.unit == "block" or cfg.qdrop is not None or cfg.learn_act_scale)
