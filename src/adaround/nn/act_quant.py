"""ActQuant: per-tensor fake quantization of a QuantLayer's input (the usual W/A placement).

    x_q = clamp(round(x / s), qmin, qmax) * s,   zero point 0

Unsigned grid [0, 2^b - 1] where the input is known non-negative (after ReLU/ReLU6), signed
symmetric [-2^(b-1), 2^(b-1) - 1] elsewhere. Rounding has a straight-through gradient; the
gradient with respect to s is LSQ's (Esser et al. 2020): round(x/s) - x/s inside the grid,
qmin or qmax where x is clipped. During reconstruction QDrop (Wei et al. 2022) can keep each
element quantized with probability `qdrop` and in float otherwise.

State: one buffer, `scale` (a 0-dim tensor); `bits` and `signed` are plain attributes that a
saved model records beside it (see `act_quant_spec` / `attach_act_quants`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adaround.errors import ConfigError
from adaround.fused import compile_once
from adaround.primitives import int_range


def _forward_parts(x: Tensor, scale: Tensor, qmin: int, qmax: int, keep: Tensor | None,
                   need_x: bool, need_scale: bool
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fake-quantized x, and what the backward pass multiplies by: the STE mask for x and
    LSQ's d(x_q)/ds (each None where not needed)."""
    xs = x / scale
    codes = torch.round(xs).clamp_(qmin, qmax)
    out = codes * scale
    pass_x = d_scale = None
    if need_x or need_scale:
        inside = (xs >= qmin) & (xs <= qmax)
        if need_x:  # straight through inside the grid (and where QDrop keeps x)
            pass_x = inside if keep is None else inside | ~keep
        if need_scale:  # LSQ: d(q s)/ds = round(x/s) - x/s inside, qmin or qmax outside
            d_scale = torch.where(inside, codes - xs, codes)
            if keep is not None:
                d_scale.mul_(keep)
    if keep is not None:
        out = torch.where(keep, out, x)
    return out, pass_x, d_scale


def _backward_parts(grad: Tensor, pass_x: Tensor | None, d_scale: Tensor | None
                    ) -> tuple[Tensor | None, Tensor | None]:
    grad_x = grad * pass_x if pass_x is not None else None
    grad_s = (grad * d_scale).sum().reshape(()) if d_scale is not None else None
    return grad_x, grad_s


def _parts(compiled: bool) -> tuple[Any, Any]:
    """Eager, or fused into one kernel each by torch.compile."""
    if not compiled:
        return _forward_parts, _backward_parts
    return compile_once(_forward_parts), compile_once(_backward_parts)


class _FakeQuant(torch.autograd.Function):
    """Fake quantization with the STE gradient for x and LSQ's for the step, optionally kept
    only where `keep` (QDrop). The forward pass prepares what the backward pass multiplies
    by, so the backward pass is a product and a weighted sum (activations at 112x112 make
    these element-wise passes the larger part of a block step)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int,  # type: ignore[override]
                keep: Tensor | None, fused: bool) -> Tensor:
        forward_parts, _ = _parts(fused)
        out, pass_x, d_scale = forward_parts(x, scale, qmin, qmax, keep,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.fused = fused
        ctx.save_for_backward(pass_x, d_scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        _, backward_parts = _parts(ctx.fused)
        grad_x, grad_s = backward_parts(grad, *ctx.saved_tensors)
        return grad_x, grad_s, None, None, None, None


def qdrop_mask(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """True with probability p (rounded to a multiple of 1/256) per element of x, laid out
    like x (a channels-last x gets a channels-last mask: mixed layouts make every later
    element-wise pass strided).

    One random byte per element, drawn eight at a time as 64-bit integers (the CPU generator's
    cost is per draw: 3x cheaper than torch.rand on 112x112 activations).
    """
    keep = torch.empty_like(x, dtype=torch.bool, device="cpu")  # dense, in x's layout
    threshold = round(min(max(p, 0.0), 1.0) * 256)
    if threshold in (0, 256):
        return keep.fill_(threshold == 256).to(x.device)
    n = keep.numel()
    words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1,
                                                                  generator=generator)
    flat = keep.as_strided((n,), (1,))  # the whole storage, whatever the strides
    torch.lt(words.view(torch.uint8)[:n], threshold, out=flat)
    return keep.to(x.device)


@dataclass(frozen=True)
class BatchRows:
    """Which samples of a batch of `batch` samples an activation holds (in a process group,
    each process runs the unit on its part of the batch): their positions in the batch."""

    positions: Tensor  # int64, in the order of the activation's samples
    batch: int


def qdrop_rows(x: Tensor, p: float, generator: torch.Generator | None, rows: BatchRows) -> Tensor:
    """The rows `rows.positions` of the mask `qdrop_mask` draws for the whole batch, for an
    x holding only those samples: every process draws the whole batch's random bytes (the
    1-process stream) and compares only its samples' bytes, so N processes keep the elements
    one process keeps.

    x must hold its samples batch first in memory (equal runs of dim 0, as conv and Linear
    inputs are, contiguous or channels-last), as one process's x then does: sample j's
    elements are then bytes [j n, (j + 1) n) of the stream in both.
    """
    keep = torch.empty_like(x, dtype=torch.bool, device="cpu")
    threshold = round(min(max(p, 0.0), 1.0) * 256)
    if threshold in (0, 256):
        return keep.fill_(threshold == 256).to(x.device)
    count, n = len(rows.positions), keep.numel()
    per = n // max(count, 1)
    if count == 0 or per * count != n or x.shape[0] % count or (
            x.shape[0] > 1 and keep.stride(0) * x.shape[0] != n):
        raise ConfigError(
            f"QDrop across processes: an activation of shape {tuple(x.shape)} does not hold "
            f"its {count} samples batch first: run QDrop in one process (or without qdrop)")
    total = per * rows.batch
    words = torch.empty((total + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1,
                                                                      generator=generator)
    mine = words.view(torch.uint8)[:total].view(rows.batch, per)[rows.positions.cpu()]
    torch.lt(mine.reshape(-1), threshold, out=keep.as_strided((n,), (1,)))
    return keep.to(x.device)


def fake_quantize_act(x: Tensor, scale: Tensor, qmin: int, qmax: int,
                      keep: Tensor | None = None, fused: bool = False) -> Tensor:
    """clamp(round(x / scale), qmin, qmax) * scale with the STE / LSQ gradients; where `keep`
    is given, x itself elsewhere. `fused`: the element-wise passes compiled into one kernel
    each (torch.compile; the same values).

    Example:
        >>> fake_quantize_act(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), 0, 15)
        tensor([0.5000, 0.0000, 7.5000])
    """
    return _FakeQuant.apply(x, scale, qmin, qmax, keep, fused)


class ActQuant(nn.Module):
    """Fake-quantizes a tensor on a per-tensor grid with zero point 0."""

    def __init__(self, bits: int, signed: bool, scale: float | Tensor = 1.0) -> None:
        super().__init__()
        self.bits = int(bits)
        self.signed = bool(signed)
        self.qmin, self.qmax = int_range(self.bits, self.signed)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()))
        self.enabled = True
        self.qdrop: float | None = None  # during reconstruction: P(element is quantized)
        self.generator: torch.Generator | None = None  # for the QDrop masks
        self.rows: BatchRows | None = None  # in a process group: this process's samples
        self.fused = False  # during reconstruction with compile=True: torch.compile'd passes

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        scale = self.scale.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
        keep = None
        if self.qdrop is not None and self.qdrop < 1.0:
            keep = (qdrop_mask(x, self.qdrop, self.generator) if self.rows is None else
                    qdrop_rows(x, self.qdrop, self.generator, self.rows))
        return fake_quantize_act(x, scale, self.qmin, self.qmax, keep, self.fused)

    @property
    def range(self) -> tuple[float, float]:
        """The float range the grid covers: [qmin * s, qmax * s]."""
        s = float(self.scale)
        return self.qmin * s, self.qmax * s

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, scale={float(self.scale):.4g}"


def act_quant_spec(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: {"bits", "signed"}} of every QuantLayer that carries an ActQuant."""
    from adaround.nn.quant_layer import QuantLayer

    return {name: {"bits": m.act_quant.bits, "signed": m.act_quant.signed}
            for name, m in qmodel.named_modules()
            if isinstance(m, QuantLayer) and getattr(m, "act_quant", None) is not None}


def attach_act_quants(qmodel: nn.Module, spec: dict[str, dict[str, Any]]) -> None:
    """Give the named QuantLayers an ActQuant of the recorded bits/sign (scale 1 until a state
    dict is loaded): what `load` needs before `load_state_dict` of a saved model."""
    for name, info in spec.items():
        layer = qmodel.get_submodule(name)
        device = next(iter(layer.buffers())).device
        layer.act_quant = ActQuant(info["bits"], info["signed"]).to(device)


def quantize_layer_input(qlayer: nn.Module, x: Any) -> Any:
    """x^ as the layer's weights see it: through the layer's ActQuant where it has one.

    `x` may be a tensor spilled to disk (anything with `load()`); it is read into memory only
    when there is an ActQuant to apply.
    """
    act_quant = getattr(qlayer, "act_quant", None)
    if act_quant is None:
        return x
    if not isinstance(x, Tensor):
        x = x.load()
    with torch.no_grad():
        return act_quant(x)


def act_note(qlayer: nn.Module) -> str:
    """", input A4u [0, 2.99]" for a layer with an ActQuant (for log lines), else ""."""
    aq = getattr(qlayer, "act_quant", None)
    if aq is None:
        return ""
    lo, hi = aq.range
    return f", input A{aq.bits}{'s' if aq.signed else 'u'} [{lo:.3g}, {hi:.3g}]"
