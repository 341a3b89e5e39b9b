"""The AdaRound optimisation of one layer (paper, eq. 21 and 25)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaround.config import QuantConfig
from adaround.nn.quant_layer import QuantLayer, apply_layer
from adaround.primitives import (
    GAMMA,
    ZETA,
    beta_at,
    dequantize,
    hard_codes,
    init_v,
    reconstruction_loss,
)
from adaround.reconstruct.quadratic import Moments, quadratic_loss, weight_rows

EVAL_SAMPLES = 256
STOP_CHECK = 10  # steps between two reads of the early-stop counter (a device sync each)
STOP_WINDOW = 100  # steps every h(V) must stay at 0 or 1 before a layer stops early


@dataclass(frozen=True)
class LayerResult:
    """What one layer's reconstruction achieved (losses on up to 256 calibration samples)."""

    name: str
    loss_nearest: float
    loss_adaround: float
    flipped: float  # share of weights rounded differently from nearest
    iters: int  # steps run: fewer than cfg.iters after an early stop
    seconds: float  # all of it: data, moments, steps and these losses
    objective: str = "sampled"  # the loss optimised: "sampled", "quadratic", "quadratic_warmup"
    data_seconds: float = 0.0  # inputs, targets and moments, before the first step
    step_seconds: float = 0.0  # the optimisation steps
    batched: int = 1  # layers that shared this layer's loop (inputs="float")
    # where loss_nearest/loss_adaround are measured: "after <activation>" or "layer output"
    measured: str = "layer output"
    # the loss optimised, where it is another one (the quadratic loss, before the
    # activation), for nearest and AdaRound codes alike
    objective_nearest: float | None = None
    objective_adaround: float | None = None


@torch.no_grad()
def layer_loss(
    qlayer: QuantLayer,
    weight: Tensor,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    chunk: int = 256,
) -> float:
    """Reconstruction loss of `weight` on (x, target), same normalisation as training."""
    total, count = 0.0, 0
    for xs, ts in zip(x.split(chunk), target.split(chunk)):
        out = apply_layer(qlayer.layer, xs, weight)
        if activation is not None:
            out = activation(out)
        total += reconstruction_loss(out, ts, qlayer.channel_dim).item() * xs.shape[0]
        count += xs.shape[0]
    return total / max(count, 1)


def moment_loss(qlayer: QuantLayer, moments: Moments, weight: Tensor) -> float:
    """The quadratic loss (before any activation) of `weight`, from the input moments."""
    dw = weight_rows(qlayer.layer, weight) - weight_rows(qlayer.layer, qlayer.layer.weight)
    return quadratic_loss(moments, dw.detach()).item()


def fast_layout(t: Tensor) -> Tensor:
    """Channels-last for image batches: CPU convolutions and their weight gradients run 1.3-5x
    faster on it (measured on ResNet-20 and EfficientNet-Lite0 layers), with identical math."""
    if isinstance(t, Tensor) and t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


class SampledLoss:
    """The paper's loss: `reconstruction_loss` on a random batch of the cached (x^, target)."""

    def __init__(self, qlayer: QuantLayer, x: Tensor, target: Tensor,
                 activation: Callable[[Tensor], Tensor] | None, batch_size: int,
                 generator: torch.Generator) -> None:
        self.layer, self.channel_dim, self.activation = qlayer.layer, qlayer.channel_dim, activation
        self.x, self.target = fast_layout(x), fast_layout(target)
        self.batch_size, self.generator = min(batch_size, x.shape[0]), generator

    def _draw(self, count: int) -> Tensor:
        return torch.randint(self.x.shape[0], (count,), generator=self.generator)

    def __call__(self, weight: Tensor) -> Tensor:
        return self.batch_loss(self._draw(self.batch_size), weight)

    def batch_loss(self, idx: Tensor, weight: Tensor) -> Tensor:
        """The loss of `weight` on the cached samples `idx`."""
        if isinstance(self.x, Tensor):
            batch = self.x[idx.to(self.x.device)]
        else:  # spilled to disk: the batch in the layout the cached tensor would have had
            batch = fast_layout(self.x[idx])
        out = apply_layer(self.layer, batch, weight)
        if self.activation is not None:
            out = self.activation(out)
        target = (self.target[idx.to(self.target.device)] if isinstance(self.target, Tensor)
                  else self.target[idx])  # spilled: read back from disk
        return reconstruction_loss(out, target, self.channel_dim)

    def weight_grad(self, weight: Tensor) -> Tensor:
        """dL/dW~ on the next batch (autograd through the layer and its activation)."""
        with torch.enable_grad():
            leaf = weight.detach().requires_grad_(True)
            return torch.autograd.grad(self(leaf), leaf)[0]

    def gradient_at(self, w0: Tensor, precision: str = "float32",
                    threads: int = 1) -> Callable[[Tensor], Tensor]:
        """dL/dW~ at W~ = w0 + hs, as a function of hs (the form the rounding loop steps), on
        `threads` threads for layers of SAMPLED_PARALLEL weights or more; autograd in the
        weight's dtype whatever `precision`."""
        parallel = threads if w0.numel() >= SAMPLED_PARALLEL else 1
        return on_threads(parallel, lambda hs: self.weight_grad(w0 + hs))

    def skip(self, steps: int) -> None:
        """Draw the batches of `steps` skipped steps: the generator is shared by all layers, so
        the layers after an early stop see the same batches as after a full run."""
        self._draw(steps * self.batch_size)


class QuadraticLoss:
    """The loss on all calibration data at once, from the moments of the layer's inputs."""

    def __init__(self, qlayer: QuantLayer, moments: Moments) -> None:
        self.layer, self.moments = qlayer.layer, moments
        self.w = weight_rows(self.layer, self.layer.weight.detach())

    def __call__(self, weight: Tensor) -> Tensor:
        return quadratic_loss(self.moments, weight_rows(self.layer, weight) - self.w)

    def gradient_at(self, w0: Tensor, precision: str = "float32",
                    threads: int = 1) -> Callable[[Tensor], Tensor]:
        """dL/dW~ at W~ = w0 + hs as a function of hs: 2 (dw A + r) = 2 (hs A + r0) with
        r0 = r + (w0 - w) A, computed once. One product per step, into one reused buffer
        (`precision`, `threads`: `quadratic_gradient`'s)."""
        return quadratic_gradient(self.moments.a, self.moments.r,
                                  weight_rows(self.layer, w0) - self.w,
                                  lambda hs: weight_rows(self.layer, hs), precision=precision,
                                  threads=threads)

    def skip(self, steps: int) -> None:
        pass


Loss = SampledLoss | QuadraticLoss


def quadratic_gradient(a: Tensor, r: Tensor, offset: Tensor, rows: Callable[[Tensor], Tensor],
                       out: Tensor | None = None, precision: str = "float32",
                       threads: int = 1) -> Callable[[Tensor], Tensor]:
    """hs -> 2 (rows(hs) A + r + offset A): the quadratic loss's gradient at dw = offset +
    rows(hs) (one batched product per call, written into the same buffer, `out`, each time);
    `precision` "bfloat16", or "auto" on a CPU with bfloat16 matrix units and rows of at
    least BF16_MIN_ROW: most steps' products in bfloat16 (`DeltaGradient`). Products of
    PARALLEL_PRODUCT multiply-adds or more run on `threads` threads."""
    r0 = torch.baddbmm(r, offset, a)
    out = torch.empty_like(r0) if out is None else out
    rows = ViewOf(rows)
    if r0.numel() * a.shape[-1] < PARALLEL_PRODUCT:
        threads = 1

    def exact(hs: Tensor) -> Tensor:
        return torch.baddbmm(r0, rows(hs), a, beta=2, alpha=2, out=out)

    if bf16_steps(a, precision):
        return on_threads(threads, DeltaGradient(exact, a, rows, out))
    return on_threads(threads, exact)


BF16_MIN_ROW = 512  # row length d from which a bfloat16 step product beats float32 (AMX)
REFRESH = 32  # steps between two exact (float32) products of DeltaGradient


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16), from
    its feature flags: a fixed answer per machine, so that a run's codes do not depend on
    the load (as a timed choice would)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def bf16_steps(a: Tensor, precision: str) -> bool:
    """Whether a step product with moments `a` ([groups, d, d]) runs in bfloat16."""
    if precision == "auto":
        return a.device.type == "cpu" and a.shape[-1] >= BF16_MIN_ROW and cpu_has_bf16_units()
    return precision == "bfloat16"


class DeltaGradient:
    """2 (hs A + r0) as g_ref + (hs - hs_ref) 2A, the second product in bfloat16.

    hs_ref and g_ref = 2 (hs_ref A + r0) are refreshed exactly (float32) every REFRESH
    steps; in between only the change of hs since then goes through bfloat16 (8-bit
    mantissa, float32 accumulation), so the error is a fraction 2^-8 of the change's product,
    not of the whole gradient. A 64 x 576 layer's product with the conversions: 1.5x faster
    with AMX on one or two threads; codes and accuracy beside float32 steps: BENCHMARKS.md,
    "Against aimet-torch on a 2-core Xeon with AMX"."""

    def __init__(self, exact: Callable[[Tensor], Tensor], a: Tensor,
                 rows: Callable[[Tensor], Tensor], out: Tensor) -> None:
        """`exact`: hs -> 2 (hs A + r0) in float32, written into `out`."""
        self.exact, self.rows, self.out = exact, rows, out
        self.a2 = (2 * a).to(torch.bfloat16)  # 2A: exact in any binary format
        self.g_ref = torch.empty_like(out)
        self.change = torch.empty(out.shape, dtype=torch.bfloat16, device=out.device)
        self.hs_ref: Tensor | None = None
        self.delta: Tensor | None = None  # float32, then its bfloat16 copy: `delta16`
        self.delta16: Tensor | None = None
        self.calls = 0

    def __call__(self, hs: Tensor) -> Tensor:
        if self.calls % REFRESH == 0:
            self.g_ref.copy_(self.exact(hs))
            if self.hs_ref is None:
                self.hs_ref, self.delta = hs.clone(), torch.empty_like(hs)
                self.delta16 = torch.empty_like(hs, dtype=torch.bfloat16)
            else:
                self.hs_ref.copy_(hs)
        else:  # conversions as copies: a mixed-dtype add or sub takes a slow, scalar path
            self.delta16.copy_(torch.sub(hs, self.hs_ref, out=self.delta))
            torch.bmm(self.rows(self.delta16), self.a2, out=self.change)
            self.out.copy_(self.change).add_(self.g_ref)
        self.calls += 1
        return self.out


@dataclass(frozen=True)
class Objective:
    """The loss of each step: `warmup` for steps before `switch` (if given), `main` after."""

    main: Loss
    warmup: Loss | None = None
    switch: int = 0

    def at(self, step: int) -> Loss:
        return self.warmup if self.warmup is not None and step < self.switch else self.main


def make_objective(qlayer: QuantLayer, x: Tensor, target: Tensor,
                   activation: Callable[[Tensor], Tensor] | None, cfg: QuantConfig,
                   generator: torch.Generator, moments: Moments | None) -> Objective:
    """`cfg.loss` for this layer; the sampled loss wherever there are no moments."""
    if moments is not None and cfg.loss in ("quadratic", "auto"):
        return Objective(QuadraticLoss(qlayer, moments))
    sampled = SampledLoss(qlayer, x, target, activation, cfg.batch_size, generator)
    if moments is None or cfg.loss == "sampled":
        return Objective(sampled)
    return Objective(sampled, QuadraticLoss(qlayer, moments), int(cfg.warm_start * cfg.iters))


class EarlyStop:
    """Says stop once every h(V) has been exactly 0 or 1 at every step of the last STOP_WINDOW.

    Then the relaxed weight is the hard weight, so the loss has settled exactly (not only to a
    tolerance), and V gets no gradient (h is clipped): all that still moves V is Adam's momentum,
    which has decayed by 0.9^STOP_WINDOW. h is looked at every STOP_CHECK steps until it is
    binary, then at every step; the count of soft h is summed on the device and read every
    STOP_CHECK steps only.

    `owned`: one process's share of a layer's rounding (adaround.distributed), the elements
    of the flattened weight it steps and keeps; only those are looked at, with no
    communication: the rows separate, so a share stops at the step the whole layer would have
    stopped at had its other rows been binary since (the whole layer stops at the latest
    share's step).
    """

    def __init__(self, owned: slice | None = None) -> None:
        self.soft: Tensor | None = None
        self.binary_since: int | None = None
        self.owned = owned

    def update(self, step: int, inside: Callable[[], Tensor]) -> bool:
        """`inside()`: 1 (or True) where h is strictly between 0 and 1, 0 elsewhere; called
        only at the steps where h is looked at."""
        at_check = (step + 1) % STOP_CHECK == 0
        if self.binary_since is None and not at_check:
            return False
        mask = inside()
        if self.owned is not None:
            mask = mask.reshape(-1)[self.owned]
        soft = mask.sum()
        self.soft = soft if self.soft is None else self.soft + soft
        if not at_check:
            return False
        binary, self.soft = self.soft.item() == 0, None
        if not binary:
            self.binary_since = None
        elif self.binary_since is None:
            self.binary_since = step
        return self.binary_since is not None and step + 1 - self.binary_since >= STOP_WINDOW


_FUSED_ADAM = hasattr(torch, "_fused_adam_")


class Adam:
    """torch.optim.Adam's update (default settings) for one tensor whose gradient we compute:
    PyTorch's fused Adam kernel (one pass over memory) where this build has it."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(param), torch.zeros_like(param), 0
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)
        self.one = torch.ones((), dtype=torch.float32, device=param.device)
        self.denom = torch.empty_like(param)

    def step(self, grad: Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        if _FUSED_ADAM:
            self.steps.add_(self.one)
            # the fused kernel walks raw memory: a gradient in another layout (channels-last,
            # from a convolution's weight gradient) must be laid out as the parameter first
            grad = grad.contiguous()
            torch._fused_adam_([self.param], [grad], [self.m], [self.v], [], [self.steps],
                               lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps,
                               amsgrad=False, maximize=False)
            return
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = torch.sqrt(self.v, out=self.denom).div_(math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


class ViewOf:
    """`make(t)`, remembered for the last `t` where it is a view of it: the loop hands the same
    buffers to the same reshapes every step, and even a view costs a dispatch."""

    def __init__(self, make: Callable[[Tensor], Tensor]) -> None:
        self.make, self.source, self.view = make, None, None

    def __call__(self, t: Tensor) -> Tensor:
        if t is self.source:
            return self.view
        view = self.make(t)
        if view._base is t or view._base is not None and view._base is t._base:
            self.source, self.view = t, view
        return view


class Relaxation:
    """h(V) and the gradient chain from dL/dW~ to V, in buffers that every step reuses.

    One step of a small layer is a few dozen element-wise kernels on a few thousand values:
    their launches, allocations and boolean masks, not arithmetic, set its time. So each
    quantity is written into its buffer in place, the clip of h is a float mask (h - h^2 > 0:
    1 inside (0, 1), 0 where h is clipped) and constant factors are folded into one product.
    """

    def __init__(self, v: Tensor, s_live: Tensor) -> None:
        self.sig, self.h, self.inside, self.slope, self.u, self.power, self.grad = (
            torch.empty_like(v) for _ in range(7))
        # dL/dV = dL/dW~ * s * dh/dV, with dh/dV = (zeta - gamma) sig (1 - sig) inside the clip
        self.s_slope = (s_live * (ZETA - GAMMA)).expand_as(v).contiguous()
        # constants as 0-d tensors of V's dtype: a Python number is converted at every call
        self.minus_one, self.stretch, self.gamma = (v.new_tensor(c) for c in (
            -1.0, ZETA - GAMMA, GAMMA))
        self.exponent = v.new_zeros(())  # beta - 1, written each step
        self.as_v = ViewOf(lambda t: t.reshape(v.shape))

    def update(self, v: Tensor) -> Tensor:
        """h(V) (returned; overwritten by the next update) and what `v_grad` needs of it."""
        torch.mul(torch.sigmoid(v, out=self.sig), self.stretch, out=self.h)
        self.h.add_(self.gamma).clamp_(0.0, 1.0)  # as primitives.rectified_sigmoid, to the bit
        torch.addcmul(self.h, self.h, self.h, value=-1, out=self.inside).sign_()
        torch.addcmul(self.sig, self.sig, self.sig, value=-1, out=self.slope).mul_(self.inside)
        return self.h

    def v_grad(self, grad_w: Tensor, beta: float | None, reg_weight: float) -> Tensor:
        """d(L + reg_weight * f_reg)/dV from dL/dW~ (`grad_w`, left unchanged), with
        d f_reg/dh = -2 beta |2h - 1|^(beta - 1) sign(2h - 1) where beta is given (the power
        as exp2(log2): twice as fast as pow on CPUs, and 0 at h = 1/2 for beta > 1)."""
        g = torch.mul(self.as_v(grad_w), self.s_slope, out=self.grad)
        if beta is not None and reg_weight:
            u = torch.add(self.minus_one, self.h, alpha=2, out=self.u)
            power = torch.abs(u, out=self.power).log2_().mul_(self.exponent.fill_(beta - 1))
            power.exp2_()
            g.add_(torch.copysign(power, u, out=power),
                   alpha=-2 * beta * reg_weight * (ZETA - GAMMA))
        return g.mul_(self.slope)

    def soft(self) -> Tensor:
        """1 where h is strictly between 0 and 1, 0 where it is clipped (for `EarlyStop`)."""
        return self.inside


def grid_constants(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                   qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """floor(W / s), and W~ = w0 + h * s_live: weights whose floor + 1 leaves the grid are
    clipped whatever h is (w0 holds their clipped value, s_live is 0 there)."""
    w_floor = torch.floor(w / scale)
    base = w_floor + zero_point
    live = (base >= qmin) & (base + 1 <= qmax)
    w0 = (base.clamp(qmin, qmax) - zero_point) * scale
    return w_floor, w0, scale * live


@torch.no_grad()
def run_rounding(qlayer: QuantLayer, objective: Objective, cfg: QuantConfig,
                 progress: bool = False, desc: str = "") -> tuple[Tensor, int]:
    """Learn V by Adam on loss + lambda * f_reg; return the hard codes and the steps run."""
    return round_weights(qlayer.layer.weight.detach(), qlayer.weight_scale(),
                         qlayer.weight_zero_point(), qlayer.qmin, qlayer.qmax, objective, cfg,
                         progress, desc)


@torch.no_grad()
def round_weights(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  objective: Objective, cfg: QuantConfig, progress: bool = False,
                  desc: str = "", owned: slice | None = None) -> tuple[Tensor, int]:
    """The loop of `run_rounding` on any weight tensor (also a stack of several layers', or one
    process's share of a layer's, whose early stop looks at the elements `owned` only).

    The chain from the loss to V is written out (dL/dW~ from the loss, then through the grid
    clip, h(V) and the regularizer): the same gradient autograd computes (tested), at a
    fraction of the per-step cost on small layers, where the step is dominated by op launches.
    """
    with (gpu_matmul_precision(w.device), step_threads(w.device) as threads,
          flush_denormals(w.device)):
        return _round_weights(w, scale, zero_point, qmin, qmax, objective, cfg, progress, desc,
                              owned, threads)


PARALLEL_PRODUCT = 2**21  # multiply-adds of a step's product from which it takes all threads
SAMPLED_PARALLEL = 32_768  # weights from which a sampled step's autograd takes all threads


@contextmanager
def step_threads(device: torch.device) -> Iterator[int]:
    """The steps' element-wise kernels on one CPU thread; yields the caller's thread count,
    which the steps' large products (PARALLEL_PRODUCT) and the sampled loss take back.

    A step's element-wise kernels touch at most a few hundred thousand values: split over
    threads they gain little and add a fork and join each (measured on 2 cores: ResNet-20's
    16- and 32-channel layers 1.3-1.6x faster on one thread), and the denormal setting of
    `flush_denormals` holds for the calling thread only: Adam's kernel on a second thread ran
    3.3x slower on its denormal moments (a 64 x 576 layer: 136 against 42 us a step).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def on_threads(threads: int, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`fn` run on `threads` CPU threads, from inside `step_threads` (0.4 us a switch)."""
    if threads <= 1:
        return fn

    def run(t: Tensor) -> Tensor:
        torch.set_num_threads(threads)
        try:
            return fn(t)
        finally:
            torch.set_num_threads(1)
    return run


def denormals_flushed() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero (tested on one)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Denormal floats flushed to zero on this thread during the steps, the setting restored.

    Adam's first moment of a weight whose h is clipped (no gradient) decays by 0.9 a step and
    falls below float32's normal range (1.2e-38) within about 700 steps; x86 CPUs compute on
    such numbers through a slow microcode path, which made the fused Adam kernel 4.5x slower
    (30.6 against 6.8 us a step on a 16 x 144 layer over 2000 steps). Flushed, those moments
    are 0 instead of below 1e-38: their share of a step is below 1e-30 of lr either way.
    """
    if device.type != "cpu" or denormals_flushed() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def gpu_matmul_precision(device: torch.device) -> Iterator[None]:
    """TF32 matmuls in the steps on a GPU (the moments stay in full float32): a step's matmul
    only steers Adam, and the codes are scored by the exact loss afterwards. CPUs unchanged."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _round_weights(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   objective: Objective, cfg: QuantConfig, progress: bool,
                   desc: str, owned: slice | None = None, threads: int = 1
                   ) -> tuple[Tensor, int]:
    # every per-step tensor in the standard layout: a channels-last weight would make each
    # reshape to weight rows (and back) a copy
    w = w.contiguous()
    w_floor, w0, s_live = grid_constants(w, scale, zero_point, qmin, qmax)
    v = init_v(w / scale - w_floor)
    adam = Adam(v, cfg.lr)
    stop = EarlyStop(owned) if cfg.early_stop else None
    steps_run = cfg.iters
    relax = Relaxation(v, s_live)
    s_live = s_live.expand_as(v).contiguous()
    hs = torch.empty_like(v)  # h * s_live: W~ = w0 + hs
    gradients = {id(loss): loss.gradient_at(w0, cfg.step_precision, threads)
                 for loss in (objective.main, objective.warmup) if loss is not None}
    for step in tqdm(range(cfg.iters), desc=desc, leave=False, disable=not progress):
        h = relax.update(v)
        grad_w = gradients[id(objective.at(step))](torch.mul(h, s_live, out=hs))
        beta = beta_at(step, cfg.iters, cfg.warm_start, cfg.beta_start, cfg.beta_end,
                       cfg.beta_decay)
        adam.step(relax.v_grad(grad_w, beta, cfg.reg_weight))
        if beta is not None and stop is not None and stop.update(step, relax.soft):
            steps_run = step + 1
            objective.main.skip(cfg.iters - steps_run)
            break
    return hard_codes(w_floor, v, zero_point, qmin, qmax), steps_run


def optimise_rounding(
    qlayer: QuantLayer,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    cfg: QuantConfig,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
    moments: Moments | None = None,
) -> Tensor:
    """The hard codes AdaRound learns for `qlayer` on (x, target) (and `moments`, if given)."""
    objective = make_objective(qlayer, x, target, activation, cfg, generator, moments)
    return run_rounding(qlayer, objective, cfg, progress, desc)[0]


def adaround_layer(
    name: str,
    qlayer: QuantLayer,
    x: Tensor,
    target: Tensor,
    activation: Callable[[Tensor], Tensor] | None,
    cfg: QuantConfig,
    generator: torch.Generator,
    progress: bool = False,
    start: float | None = None,
    moments: Moments | None = None,
) -> LayerResult:
    """Optimise the rounding of `qlayer`, store the hard codes, and report the gain.

    `start` (a perf_counter reading) lets the caller include its data collection in the time.
    With `moments` (of the layer's inputs) and cfg.loss "quadratic" or "quadratic_warmup", the
    quadratic-form loss replaces the sampled one (in the warm start only, for the latter): it
    has no activation inside, so for a layer followed by one it is the loss before it. The
    losses reported are the sampled ones on (x, target) either way (after the activation),
    for nearest and AdaRound codes alike; with moments, the optimised quadratic loss of both
    is reported beside them.
    """
    begin = time.perf_counter()
    start = begin if start is None else start
    nearest = qlayer.nearest_codes()
    objective = make_objective(qlayer, x, target, activation, cfg, generator, moments)
    codes, steps_run = run_rounding(qlayer, objective, cfg, progress, name)
    step_seconds = time.perf_counter() - begin
    qlayer.set_codes(codes)
    at = eval_rows(x.shape[0], 0, x.shape[0])
    xs, ts = x[at], target[at]
    return layer_result(name, qlayer, codes, nearest, steps_run, cfg, moments, activation,
                        lambda ws: [layer_loss(qlayer, w, xs, ts, activation) for w in ws],
                        (start, begin, step_seconds))


def eval_rows(total: int, offset: int, count: int) -> Tensor:
    """Where the per-layer losses are measured: EVAL_SAMPLES samples spread evenly over all
    `total` (sample i * total // EVAL_SAMPLES), as indices into the run [offset, offset +
    count) that one process holds. Spread, so that N processes share the work evenly and
    together measure on the samples one process measures on."""
    n = min(total, EVAL_SAMPLES)
    every = torch.arange(n) * total // max(n, 1) - offset
    return every[(every >= 0) & (every < count)]


def layer_result(name: str, qlayer: QuantLayer, codes: Tensor, nearest: Tensor,
                 steps_run: int, cfg: QuantConfig, moments: Moments | None,
                 activation: Callable[[Tensor], Tensor] | None,
                 losses_of: Callable[[list[Tensor]], list[float]],
                 times: tuple[float, float, float]) -> LayerResult:
    """What a layer's rounding achieved: nearest and AdaRound on the same loss (`losses_of`
    weights), and on the optimised quadratic one where moments were used. `times`: the
    perf_counter readings at the start and at the first step, and the seconds of the steps."""
    start, begin, step_seconds = times
    weight_nearest = dequantize(nearest, qlayer.weight_scale(), qlayer.weight_zero_point())
    loss_nearest, loss_adaround = losses_of([weight_nearest, qlayer.quantized_weight()])
    return LayerResult(
        name=name,
        loss_nearest=loss_nearest,
        loss_adaround=loss_adaround,
        flipped=(codes != nearest).float().mean().item(),
        iters=steps_run,
        seconds=time.perf_counter() - start,
        objective="sampled" if moments is None else cfg.loss.replace("auto", "quadratic"),
        data_seconds=begin - start,
        step_seconds=step_seconds,
        measured="after activation" if activation is not None else "layer output",
        objective_nearest=None if moments is None else moment_loss(qlayer, moments,
                                                                    weight_nearest),
        objective_adaround=None if moments is None else moment_loss(
            qlayer, moments, qlayer.quantized_weight()),
    )
