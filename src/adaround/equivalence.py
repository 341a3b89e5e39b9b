"""Run-time equivalence checks: the network we quantize must be the user's network.

Preparing a network rewrites it (BatchNorm folded into the layer before it, layers wrapped
for quantization). A rewrite that changes what the network computes would make every later
number wrong without a sign, so each rewrite is checked on one calibration batch: the outputs
must agree within float noise, and where they do not, the first module (in execution order)
whose output differs is found with forward hooks and named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Folding changes the order of float operations; on deep networks that leaves relative
# output errors of about 1e-7..1e-6. A real change of the network is orders larger.
TOLERANCE = 1e-4
# Deep networks amplify float32 rounding: where a rewrite misses TOLERANCE, it still passes
# within this factor of the network's own noise (its error under one-ulp parameter changes).
NOISE_FACTOR = 4.0
CHECK_SAMPLES = 8


def flatten_tensors(value: Any) -> list[Tensor]:
    """Every tensor in a (nested) output: tensors, tuples, lists, dicts, ModelOutput-likes."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in flatten_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_tensors(v)]
    return []


def relative_error(reference: list[Tensor], other: list[Tensor]) -> float:
    """||other - reference|| / ||reference|| over all floating tensors (inf if the structures
    differ, 0 for two all-zero outputs); integer tensors must match exactly."""
    if len(reference) != len(other):
        return float("inf")
    num = den = 0.0
    for a, b in zip(reference, other):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.dtype)):
                return float("inf")
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
            if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
                return float("inf")
            mask = torch.isfinite(a64)
            a64, b64 = a64[mask], b64[mask]
        num += float((a64 - b64).pow(2).sum())
        den += float(a64.pow(2).sum())
    if num == 0.0:
        return 0.0
    return (num / den) ** 0.5 if den > 0 else float("inf")


def run_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in flatten_tensors(model(x))]


@contextmanager
def _recording(model: nn.Module, sink: dict[str, list[Tensor]]) -> Iterator[None]:
    """Record the first output of every module, by name, in execution order."""
    handles = []
    for name, module in model.named_modules():
        def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            if name not in sink:
                sink[name] = [t.detach().clone() for t in flatten_tensors(out)]
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Difference:
    """The first module whose output differs between two networks."""

    name: str
    kind: str
    error: float

    def describe(self) -> str:
        where = self.name or "the model itself"
        if self.error == float("inf"):
            return f"{where} ({self.kind}), not called or shaped differently"
        return f"{where} ({self.kind}), relative error {self.error:.3g}"


def first_difference(reference: nn.Module, other: nn.Module, x: Tensor,
                     skip: set[str] = frozenset()) -> Difference | None:  # type: ignore[assignment]
    """The first module, in `reference`'s execution order, whose output in `other` differs
    (modules named in `skip`, e.g. layers with a norm folded into them, are not compared)."""
    ref_outs: dict[str, list[Tensor]] = {}
    other_outs: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        with _recording(reference, ref_outs):
            reference(x)
        with _recording(other, other_outs):
            other(x)
    kinds = {n: type(m).__name__ for n, m in other.named_modules()}
    for name, outs in ref_outs.items():
        if name in skip or not name:
            continue
        if name not in other_outs:  # called by the reference, never by the other
            if name in kinds:
                return Difference(name, kinds[name], float("inf"))
            continue
        error = relative_error(outs, other_outs[name])
        if error > TOLERANCE:
            return Difference(name, kinds.get(name, "?"), error)
    error = relative_error(ref_outs.get("", []), other_outs.get("", []))
    return Difference("", type(other).__name__, error) if error > TOLERANCE else None
