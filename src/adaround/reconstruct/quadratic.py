"""The reconstruction loss as a quadratic form in the weights (no activation inside the loss).

At one output position the error of output channel k is  w~_k . x^ - w_k . x  (the bias
cancels), with x^ and x the layer's input patches in the quantized and the FP stream. With
dw_k = w~_k - w_k and e = x^ - x:

    E[(w~_k . x^ - w_k . x)^2] = dw_k^T A dw_k + 2 dw_k . r_k + c_k,
    A = E[x^ x^^T],   r_k = E[(w_k . e) x^],   c_k = E[(w_k . e)^2],

expectations over samples and positions, summed over k: exactly `reconstruction_loss` on the
whole calibration set. The moments are accumulated once per layer; a step then costs
O(C_out * d^2) (d = patch length, per group) whatever the number of samples. Writing the form
in dw and e, not in w~ and x, keeps every term as small as the loss itself, so float32 does
not lose the loss to cancellation between large terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PATCH_BUDGET = 2**24  # elements of one block of patches (64 MiB in float32)


_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)


class UnfoldError(ValueError):
    """The layer's forward does not reduce to one convolution with its own settings."""


def _standard(layer: nn.Module) -> bool:
    return type(layer).forward in (nn.Linear.forward, *(c.forward for c in _CONV))


def supports_quadratic(layer: nn.Module) -> bool:
    """Linear and Conv1d/2d/3d, subclasses included; ConvTranspose is not unfolded."""
    return isinstance(layer, (nn.Linear, *_CONV))


class _CaptureConvInput(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _CONV_FNS:
            self.calls.append(tuple(args) + tuple((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


def _as_tuple(value: Any, dims: int) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * dims if isinstance(value, int) else value


def conv_input(layer: nn.Module, x: Tensor) -> Tensor:
    """What the layer's convolution actually receives: `x` itself for the standard layers;
    for a subclass with its own forward (e.g. TF-style "same" padding that pads first), the
    input of its one convolution call, checked to use the layer's weight and settings."""
    if _standard(layer):
        return x
    with torch.no_grad(), _CaptureConvInput() as mode:
        layer(x)
    if len(mode.calls) != 1 or mode.calls[0][1] is not layer.weight:
        raise UnfoldError(f"{type(layer).__name__}.forward is not one convolution with its weight")
    call = mode.calls[0]
    settings = (layer.stride, layer.padding, layer.dilation, layer.groups)
    given = tuple(call[3:7]) + settings[len(call[3:7]):]
    if [_as_tuple(v, len(layer.kernel_size)) for v in given] != [
            _as_tuple(v, len(layer.kernel_size)) for v in settings] or \
            layer.padding_mode != "zeros":
        raise UnfoldError(f"{type(layer).__name__} calls its convolution with other settings")
    return call[0]


def step_costs(layer: nn.Module, x: Tensor, batch_size: int) -> tuple[int, int]:
    """Multiply-adds of one step: (quadratic, sampled). The quadratic step is one
    [C_out, d] x [d, d] product per group; the sampled step runs the layer forward and
    backward (input and weight gradients) on `batch_size` samples."""
    groups = getattr(layer, "groups", 1)
    d = layer.weight[0].numel()
    c_out = layer.weight.shape[0]
    positions = patches(layer, conv_input(layer, x[:1])).shape[1] if x.dim() > 2 else 1
    return c_out * d * d // groups, 3 * batch_size * positions * c_out * d


def weight_rows(layer: nn.Module, weight: Tensor) -> Tensor:
    """`weight` as [groups, C_out / groups, d]: one row per output channel, in patch order."""
    groups = getattr(layer, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def windows(layer: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input windows as a view, [N, C, L..., k...]: padded as the layer pads,
    one kernel axis appended per spatial axis (strided by the layer's stride and dilation)."""
    pad: Any = layer._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(x.dim() - 2):  # each unfold appends one kernel axis at the end
        k, s, dil = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)[..., ::dil]
    return x


def patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The input vectors each output value is a dot product with: [groups, positions, d]."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    nd = x.dim() - 2
    x = windows(layer, x)
    n, c, groups = x.shape[0], x.shape[1], layer.groups
    x = x.reshape(n, groups, c // groups, *x.shape[2:])  # [N, g, C/g, L..., k...]
    order = [1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
    return x.permute(order).reshape(groups, -1, (c // groups) * math.prod(layer.kernel_size))


@dataclass(frozen=True)
class Moments:
    """Second moments of one layer's data: loss(w~) = sum dw^T A dw + 2 dw . r + c."""

    a: Tensor  # [groups, d, d]
    r: Tensor  # [groups, C_out / groups, d]
    c: Tensor  # scalar
    count: int  # positions (samples x output positions) averaged over


def _blocks(x_q: Tensor, x_fp: Tensor, per_sample: int) -> Iterator[tuple[Tensor, Tensor]]:
    rows = max(1, PATCH_BUDGET // max(per_sample, 1))
    yield from zip(x_q.split(rows), x_fp.split(rows))


def _window_rows(layer: nn.Module) -> bool:
    """2-D convolutions with zero padding: their patches are copied as rows straight from the
    channels-last windows (`patch_rows`)."""
    return (isinstance(layer, nn.Conv2d)
            and (layer.padding_mode == "zeros" or not any(layer._reversed_padding_repeated_twice))
            and not isinstance(layer.padding, str))


def patch_rows(layer: nn.Module, x: Tensor, every: int = 1, seed: int = 0,
               buffer: list[Tensor] | None = None) -> Tensor:
    """The patches as rows, [groups, positions, d]; with `every` > 1, those of 1 / every^2 of
    the positions (`subsample`). For `_window_rows` layers each row holds its patch in
    (kernel row, kernel column, channel) order, the order in which a channels-last window lies
    in memory, so one copy of runs of C contiguous values builds them (3-9x faster than im2col
    and a transpose); `weight_order` maps that order back to the weight's."""
    if not _window_rows(layer):
        rows = patches(layer, x)
        at = sampled_positions(rows.shape[1], 1 / every**2, seed)
        return rows if at is None else rows[:, at]
    v = windows(layer, x)  # [N, C, H', W', kh, kw]
    g = layer.groups
    # [N, H', W', kh, kw, g, C / g] -> [g, N, H', W', kh, kw, C / g]: one group's rows together
    v = v.permute(0, 2, 3, 4, 5, 1).unflatten(5, (g, v.shape[1] // g))
    v = v.permute(5, 0, 1, 2, 3, 4, 6)
    d = math.prod(v.shape[-3:])
    if every == 1:
        return copy_into(v, buffer).view(g, -1, d)
    return torch.cat([sub.reshape(g, -1, d) for sub in subsample(v, every, first=1)], dim=1)


def copy_into(v: Tensor, buffer: list[Tensor] | None) -> Tensor:
    """A contiguous copy of `v`, in the memory of buffer[0] where it fits (grown else): the
    blocks of one layer's patches reuse one allocation instead of faulting in fresh pages for
    each (glibc returns allocations over 32 MB to the OS when freed; ResNet-20's patches:
    2.1 s against 1.5 s with the allocator told to keep them)."""
    if buffer is None:
        return v.contiguous()
    if not buffer or buffer[0].numel() < v.numel() or buffer[0].dtype != v.dtype:
        buffer[:] = [v.new_empty(v.numel())]
    return buffer[0][:v.numel()].view(v.shape).copy_(v)


def window_layout(x: Tensor) -> Tensor:
    """Image batches channels-last: `patch_rows` then copies runs of C contiguous values and
    the layer's convolution in `weighted_error` runs faster (measured on ResNet-20's 16-channel
    layer, one block: 19.6 against 6.6 ms and 5.3 against 2.7 ms, for a 1.1 ms conversion)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def subsample(v: Tensor, every: int, first: int = 0) -> list[Tensor]:
    """Every `every`-th row and column of the output positions of [..., N, H', W', ...] (N at
    dim `first`), the grid shifted from sample to sample through all every^2 offsets: 1 /
    every^2 of the positions, spread evenly over the image and the samples, as strided views
    (copied without a gather)."""
    period, lead = every * every, (slice(None),) * first
    return [v[(*lead, slice(k, None, period), slice(k // every, None, every),
               slice(k % every, None, every))] for k in range(period)]


def sampled_positions(positions: int, keep: float, seed: int) -> Tensor | None:
    """A uniform subset of round(keep * positions) positions, the same for every block of
    this size (so on any number of processes); None for all of them."""
    if keep >= 1.0:
        return None
    count = max(1, round(keep * positions))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(positions, generator=generator)[:count].sort().values


def subsample_step(keep: float) -> int:
    """`every` for at most a share `keep` of the positions: 1 / every^2 <= keep."""
    return 1 if keep >= 1.0 else math.ceil(math.sqrt(1 / keep) - 1e-9)


def weight_order(layer: nn.Module) -> Tensor | None:
    """For each element of a weight row (channel, kernel row, kernel column), its place in a
    `patch_rows` row; None where the two orders are the same."""
    if not _window_rows(layer):
        return None
    c, taps = layer.weight.shape[1], math.prod(layer.kernel_size)
    return torch.arange(taps * c).reshape(taps, c).t().reshape(-1)


GRAM_BLOCKS = 4  # U^T U from 4 x 4 column blocks: the 10 on and below the diagonal
# below this, 2 x 2 blocks (3 of the 4 products): faster up to d = 576 on the 2-core Xeon
# (d = 288: 33.8 against 41.8 ms; 576: 130 against 136; 1152: 130 against 120)
GRAM_MIN_COLUMNS = 1024


def gram(rows: Tensor) -> Tensor:
    """U^T U per group ([g, P, d] -> [g, d, d]) from its lower block triangle, mirrored: 5/8
    (3/4 for small d) of the multiply-adds of one product, the symmetric half of the work
    skipped."""
    g, _, d = rows.shape
    blocks = GRAM_BLOCKS if d >= GRAM_MIN_COLUMNS else 2 if d >= 32 else 1
    edges = [d * i // blocks for i in range(blocks + 1)]
    out = rows.new_empty(g, d, d)
    for i in range(blocks):
        a = slice(edges[i], edges[i + 1])
        for j in range(i + 1):
            b = slice(edges[j], edges[j + 1])
            block = torch.bmm(rows[:, :, a].transpose(1, 2), rows[:, :, b])
            out[:, a, b] = block
            if i != j:
                out[:, b, a] = block.transpose(1, 2)
    return out


def weighted_error(layer: nn.Module, e: Tensor, w_rows: Tensor) -> Tensor:
    """w_k . (x^ - x) at every output position, [groups, positions, C_out / groups]: the
    layer's own operation on the input difference e (no bias), not an unfold; positions in
    the order of `patch_rows`."""
    if isinstance(layer, nn.Linear):
        return (e.reshape(-1, e.shape[-1]) @ w_rows[0].T).unsqueeze(0)
    out = layer._conv_forward(e, w_rows.reshape(layer.weight.shape), None).movedim(1, -1)
    return out.reshape(-1, layer.groups, out.shape[-1] // layer.groups).transpose(0, 1)


@torch.no_grad()
def accumulate_moments(layer: nn.Module, chunks: Iterable[tuple[Tensor, Tensor]],
                       keep: float = 1.0, seed: int = 0) -> Moments:
    """Moments from (x^, x) input chunks, block by block, so only one block of patches lives.

    A = U^T U from the quantized stream's patch rows U; r and c from w . e, which the layer's
    own convolution computes on e = x^ - x without unfolding the FP stream. `keep` < 1
    estimates them from at most that share of the positions (`patch_rows`' subsample).
    """
    sums, count = moment_sums(layer, chunks, keep, seed)
    if not sums:
        raise ValueError("no calibration data reached the layer")
    return finish_moments(layer, sums, count)


@torch.no_grad()
def moment_sums(layer: nn.Module, chunks: Iterable[tuple[Tensor, Tensor]], keep: float = 1.0,
                seed: int = 0) -> tuple[list[Tensor], int]:
    """The float64 sums over positions of U^T U, (w . e) U and (w . e)^2 (in the weight's
    element order), and the count of positions: what `finish_moments` averages (sums over
    samples, so shards of the data can add theirs; an empty list where no data came). With
    `keep` < 1, over at most that share of each block's positions (`patch_rows`)."""
    w = weight_rows(layer, layer.weight.detach())
    dtype = torch.promote_types(w.dtype, torch.float32)
    w = w.to(dtype)
    order = weight_order(layer)
    w_patch = w if order is None else w.new_empty(w.shape).index_copy_(2, order, w)
    every = subsample_step(keep)
    sums: list[Tensor] = []
    count = 0
    buffer: list[Tensor] = []  # the patch rows' memory, reused block after block
    for x_q, x_fp in chunks:
        per_sample = patches(layer, conv_input(layer, x_q[:1])).numel()
        for bq, bf in _blocks(x_q, x_fp, per_sample):
            cq = window_layout(conv_input(layer, bq).to(dtype))
            e = cq - window_layout(conv_input(layer, bf).to(dtype))
            u = patch_rows(layer, cq, every, seed, buffer)  # [g, P, d]
            we = (weighted_error(layer, e, w) if every == 1  # [g, P, co]
                  else torch.bmm(patch_rows(layer, e, every, seed), w_patch.transpose(1, 2)))
            terms = [gram(u), torch.bmm(we.transpose(1, 2), u), we.pow(2).sum()]
            # float64 running sums: chunks may be many, and each term is already a long sum
            sums = [t.double() + s for t, s in zip(terms, sums)] if sums else [
                t.double() for t in terms]
            count += u.shape[1]
    if sums and order is not None:
        sums[0], sums[1] = sums[0][:, order][:, :, order], sums[1][:, :, order]
    return sums, count


def finish_moments(layer: nn.Module, sums: list[Tensor], count: int) -> Moments:
    """The moments from the sums of `moment_sums` over `count` positions."""
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    a, r, c = (s.div(count).to(dtype) for s in sums)
    return Moments(a=(a + a.transpose(1, 2)) / 2, r=r, c=c, count=count)


class _QuadraticForm(torch.autograd.Function):
    """sum(dw * (dw A + 2 r)) + c, with the gradient 2 (dw A + r) from the forward's product:
    one batched matmul per step instead of the two autograd would run."""

    @staticmethod
    def forward(ctx: Any, dw: Tensor, a: Tensor, r: Tensor, c: Tensor) -> Tensor:
        g = torch.baddbmm(r, dw, a)
        ctx.save_for_backward(g)
        return (dw * (g + r)).sum() + c

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (g,) = ctx.saved_tensors
        return 2 * grad * g, None, None, None


def quadratic_loss(moments: Moments, dw: Tensor) -> Tensor:
    """Reconstruction loss of w + dw on all the data the moments came from (dw as weight_rows)."""
    return _QuadraticForm.apply(dw, moments.a, moments.r, moments.c)
