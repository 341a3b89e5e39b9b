"""AdaRound inside a torch.distributed process group: the 1-process codes on N processes.

Inside an initialised process group of more than one process (`torchrun`, which the command
line joins, or the caller's own `init_process_group`; gloo on CPUs, NCCL on GPUs), the
layer-wise path of `quantize` splits its work; with one process nothing here runs.

- Data: the calibration inputs are cut into chunks of FORWARD_BATCH samples exactly as in one
  process, and process r of N holds the contiguous run of chunks [r n / N, (r + 1) n / N) of
  the n chunks (`shard`). Both streams (FP and quantized) advance on that shard only, so each
  process caches 1/N of the activations and runs 1/N of the forward passes.
- Quadratic loss (`round_rows`): the moments are sums over samples. Each process sums its
  shard in float64 (the same float32 terms as one process, chunk for chunk), the sums are
  all-reduced and divided by the global count: every process holds the 1-process moments (up
  to the order of the float64 additions, below float32's resolution). The loss plus the
  regulariser separate over output channels and Adam is element-wise, so process r rounds the
  output channels [r C / N, (r + 1) C / N) (whole groups for grouped convolutions) with no
  communication during the steps, the early stop included: each process stops once its own
  rows have been binary for STOP_WINDOW steps (from then on their codes do not change, so
  they are those of the layer's 1-process stop, which is the latest process's stop: the
  steps reported). The codes are then summed by all-reduce (each process fills its rows,
  zeros elsewhere), so every process holds the whole quantized layer before the next one.
  Layers under ROW_SPLIT_MIN weights, whose steps are launch-bound, are stepped whole by
  every process instead.
- inputs="float" (`distributed_whole`): the layers are independent, so each process rounds
  whole stacks of same-shaped layers from the all-reduced moments (no rows split, no
  communication during the steps), and one all-reduce gathers the codes.
- Sampled loss (`ShardSampledLoss`): every process draws the same batches, global sample
  indices from the generator seeded as in one process; each computes the gradient of the part
  of the batch it holds, weighted by its share of the batch (the 1-process normalisation), and
  the gradients are summed by all-reduce, so every process takes the same step: the 1-process
  step up to the order of the float additions.

- Blocks (BRECQ, learned activation steps; `distributed_units.BatchSplit`): as the sampled
  loss, the regulariser's gradient added after the sum.
- QDrop: one process draws each batch's masks from the seeded generator, activation by
  activation, byte by byte in memory order. Every process draws those same bytes for the whole
  batch and keeps the rows of the samples it holds (`nn.act_quant.qdrop_rows`), so it keeps
  the elements one process keeps, and the generator stays the 1-process one; a process that
  holds none of a batch runs one of its samples, weighted 0, to draw them. This needs each
  quantized activation to hold its samples batch first (conv and Linear inputs, contiguous or
  channels-last); two probe passes per unit check it (`block.check_batch_first`) and refuse
  a unit where it does not hold. The masks' random bytes are not split (each process draws
  all of them): a fixed cost per step.
- Fisher weights: the gradients at a block's output are computed on the shard; the two
  means that normalise them (of |g| and of the damped weights) are all-reduced
  (`distributed_units.shared_mean`, float64 sums), the 1-process means up to float rounding.
- `quantize_hf`: each process holds a contiguous run of the calibration batches; the token
  rows of a layer enter the moments or the sampled loss as above (`round_hf_layer`).
- Resume (`checkpoint_dir`): every process holds the whole quantized model after each unit,
  so process 0 writes the checkpoint (atomically) and every process restores from it; the
  folder must be on storage all processes reach (a network file system across machines).
  `check_same_progress` compares the units done on every process after opening it and
  raises DistributedError where they differ (a folder local to each machine). The
  fingerprint holds nothing of the process layout, and the number of processes may change
  between runs: the batches are drawn as global sample indices and the moments are sums over
  all data, so the codes do not depend on it (the quadratic path bit for bit, the others up
  to the order of float sums, as for an uninterrupted run).

Bit for bit: CPU element-wise kernels compute the last (size mod 32) elements of a tensor on a
scalar path and the rest in vector registers, and sigmoid or exp2 differ in the last bit
between the two. A process therefore steps its channels inside a window of the flattened
weight aligned to ALIGN elements of the whole layer (its few extra elements are stepped and
dropped), so every weight takes the path it takes in one process. With one thread per process
the quadratic path gives the 1-process codes exactly (tests/test_distributed.py).

Failures: a process that dies makes the others' next collective fail (gloo: the connection
closes; any backend: the process group's timeout); that error is re-raised as
`DistributedError`, which names the process. `torchrun` also stops the others as soon as one
exits with an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adaround.checkpoint import Checkpoint
from adaround.config import QuantConfig
from adaround.errors import CalibrationDataError
from adaround.nn.quant_layer import QuantLayer
from adaround.reconstruct.loop import (
    LayerResult,
    Objective,
    QuadraticLoss,
    SampledLoss,
    eval_rows,
    layer_loss,
    layer_result,
    quadratic_gradient,
    round_weights,
    run_rounding,
)
from adaround.reconstruct.quadratic import Moments, finish_moments, moment_sums, weight_rows
from adaround.reconstruct.spill import budget_store
from adaround.reconstruct.stream import make_engine

if TYPE_CHECKING:
    from adaround.prepare import LayerPlan

log = logging.getLogger(__name__)

ALIGN = 64  # elements: a multiple of every CPU vector loop's stride (2 x 16 floats)
GROUP_TIMEOUT = timedelta(minutes=30)  # a collective waiting longer fails (command line)


class DistributedError(RuntimeError):
    """A collective operation failed: another process died, raised or timed out."""


def active() -> bool:
    """Inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def all_sum(t: Tensor) -> Tensor:
    """Sum `t` (contiguous) over all processes, in place; a failure names this process."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise RuntimeError subclasses
        raise DistributedError(
            f"process {rank()} of {world()}: a collective operation failed ({type(exc).__name__}:"
            f" {str(exc).splitlines()[0][:200]}); another process probably failed or was "
            "stopped: see its log") from exc
    return t


def all_sum_each(tensors: list[Tensor]) -> list[Tensor]:
    """Each of `tensors` summed over all processes, in one all-reduce (a collective costs 0.6
    ms at least on gloo): float64, shaped as given (exact for integers, and for values summed
    with the other processes' zeros)."""
    flat = all_sum(torch.cat([t.reshape(-1).double() for t in tensors]))
    return [p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def where() -> str:
    """"process r of N: " inside a process group, "" outside (for messages)."""
    return f"process {rank()} of {world()}: " if active() else ""


@contextmanager
def launched_group() -> Iterator[None]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1, RANK,
    MASTER_ADDR, MASTER_PORT) on gloo, the command line computing on CPUs, and leave it at
    the end; without torchrun (or inside a group already), nothing."""
    if (int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available()
            or dist.is_initialized()):
        yield
        return
    pin_to_cores()
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pin_to_cores() -> None:
    """Each of torchrun's processes on this machine kept on its own equal share of the CPUs
    this process may use (the command line's processes compute on CPUs, a few threads each):
    the scheduler no longer moves two of them onto one core for a while, which made the
    other wait at the next collective. Nothing where the CPUs do not split evenly, where a
    process runs more threads than its share, or where the OS has no CPU affinity."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if count <= 1 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    per = len(cpus) // count
    if per == 0 or len(cpus) % count or torch.get_num_threads() > per:
        return
    os.sched_setaffinity(0, cpus[local * per:(local + 1) * per])
    log.debug("local process %d: on CPUs %s", local, cpus[local * per:(local + 1) * per])


def check_same_progress(checkpoint: Checkpoint, device: torch.device) -> None:
    """Every process must resume from the same units done: process 0 writes the checkpoint
    and the others read it, so its folder must be one folder all processes reach. A folder
    local to each machine shows up here (progress on some processes, none on others)."""
    if not active() or checkpoint.path is None:
        return
    digest = hashlib.sha256("\n".join(checkpoint.done).encode()).digest()
    seen = torch.zeros(2, world(), dtype=torch.float64, device=device)
    seen[0, rank()] = len(checkpoint.done)
    seen[1, rank()] = int.from_bytes(digest[:6], "big")  # 48 bits: exact in float64
    seen = all_sum(seen)
    if bool((seen != seen[:, :1]).any()):
        done = ", ".join(f"process {r}: {int(n)}" for r, n in enumerate(seen[0].tolist()))
        raise DistributedError(
            f"{where()}the processes see different progress in checkpoint_dir "
            f"{checkpoint.path.parent} (units done, {done}): process 0 writes it and every "
            "process resumes from it, so pass a folder on storage all processes share (a "
            "network file system on several machines), or delete it to start over")


def fit_grids(qmodel: nn.Module, names: list[str], method: str) -> None:
    """The weight grids of the QuantLayers `names` of `qmodel` ("" for the model itself),
    process r fitting every N-th from the r-th (`QuantLayer.fit_grid`, as one process does)
    and one all-reduce summing each grid with the others' zeros (in float64: exact), so every
    process holds every grid, the 1-process one."""
    layers = [qmodel.get_submodule(name) if name else qmodel for name in names]
    grids, held = [], []
    for i, qlayer in enumerate(layers):
        mine = i % world() == rank()
        if mine:
            qlayer.fit_grid(method)
        for t in (qlayer.scale, qlayer.zero_point):
            grids.append(t)
            held.append(t if mine else torch.zeros_like(t))
    for t, total in zip(grids, all_sum_each(held)):
        t.copy_(total)


@dataclass(frozen=True)
class Shard:
    """This process's calibration chunks, and where its samples sit among all samples."""

    chunks: list[Tensor]
    offset: int  # global index of the shard's first sample
    count: int  # samples held here
    total: int  # samples over all processes


def shard_items(items: list[Any], what: str = "calibration batches") -> list[Any]:
    """Process r's contiguous run of `items` (balanced: counts differ by at most one)."""
    n, r, w = len(items), rank(), world()
    if n < w:
        raise CalibrationDataError(
            f"the {what} are {n}, fewer than the {w} processes: pass more data (or smaller "
            "batches) or run fewer processes")
    return items[n * r // w:n * (r + 1) // w]


def shard(chunks: list[Tensor]) -> Shard:
    """Process r's contiguous run of the calibration chunks, and where it sits."""
    lo = len(chunks) * rank() // world()
    mine = shard_items(chunks, f"calibration chunks of at most {len(chunks[0])} samples")
    return Shard(mine, sum(len(c) for c in chunks[:lo]), sum(len(c) for c in mine),
                 sum(len(c) for c in chunks))


def rows_shard(count: int, device: torch.device) -> Shard:
    """Where this process's `count` rows sit among all processes' (process order)."""
    counts = torch.zeros(world(), dtype=torch.float64, device=device)
    counts[rank()] = count
    counts = all_sum(counts).tolist()
    return Shard([], int(sum(counts[:rank()])), count, int(sum(counts)))


@torch.no_grad()
def shared_moments(layer: nn.Module, chunks: Iterable[tuple[Tensor, Tensor]],
                   keep: float = 1.0, seed: int = 0) -> Moments:
    """The moments of all processes' data: shard sums, all-reduced, over the global count."""
    sums, count = moment_sums(layer, chunks, keep, seed)
    if not sums:
        raise ValueError("no calibration data reached the layer")
    *sums, total = all_sum_each([*sums, sums[0].new_tensor(float(count))])
    return finish_moments(layer, sums, int(total.item()))


def owned_rows(c_out: int, groups: int, r: int, w: int) -> tuple[int, int]:
    """The output channels [lo, hi) process r of w rounds: a balanced contiguous run of
    channels, of whole groups for grouped convolutions (a group shares one moment matrix)."""
    if groups == 1:
        return c_out * r // w, c_out * (r + 1) // w
    per = c_out // groups
    return per * (groups * r // w), per * (groups * (r + 1) // w)


class RowsLoss:
    """The quadratic loss of rows [lo, hi) of a layer, on a window of its flattened weight
    that starts `at` elements before row lo: the gradient 2 (dw A + r) of those rows, zero on
    the window's extra elements (stepped, then dropped)."""

    def __init__(self, layer: nn.Module, moments: Moments, lo: int, hi: int, at: int,
                 size: int) -> None:
        rows = weight_rows(layer, layer.weight.detach())  # [groups, C_out / groups, d]
        if rows.shape[0] == 1:
            self.w, self.a, self.r = rows[:, lo:hi], moments.a, moments.r[:, lo:hi]
        else:
            per = rows.shape[1]
            self.w, self.a, self.r = (t[lo // per:hi // per] for t in (rows, moments.a, moments.r))
        self.w, self.r = self.w.contiguous(), self.r.contiguous()
        self.at = at
        # one gradient buffer, reused by every step (the step consumes it before the next):
        # zero on the window's extra elements, the rows' gradient written in place
        self.grad = self.w.new_zeros(size)
        self.rows = self.grad[at:at + self.w.numel()].view(self.w.shape)

    def gradient_at(self, w0: Tensor, precision: str = "float32",
                    threads: int = 1) -> Callable[[Tensor], Tensor]:
        """As QuadraticLoss.gradient_at, on the rows' part of the window."""
        n = self.w.numel()
        rows = quadratic_gradient(self.a, self.r, w0[self.at:self.at + n].view(self.w.shape)
                                  - self.w, lambda hs: hs[self.at:self.at + n].view(self.w.shape),
                                  out=self.rows,  # the window's other elements stay 0
                                  precision=precision, threads=threads)
        return lambda hs: (rows(hs), self.grad)[1]

    def skip(self, steps: int) -> None:
        pass


#: layers with fewer weights are stepped whole by every process instead of split by rows:
#: their steps are bound by kernel launches, which every process would run anyway (2
#: processes at once, 1 thread each, AMD EPYC, ms a step whole / each half: 16 x 144 weights
#: 0.12-0.16 / 0.11-0.16, 32 x 288 0.30-0.35 / 0.22-0.25, 64 x 576 1.26-1.48 / 0.68-0.76;
#: bench/bench_share_step.py). The 1-process codes either way.
ROW_SPLIT_MIN = 4096


@torch.no_grad()
def round_rows(qlayer: QuantLayer, moments: Moments, cfg: QuantConfig, progress: bool = False,
               desc: str = "") -> tuple[Tensor, int]:
    """This process's channels rounded on the quadratic loss, the codes of all channels
    gathered: (codes shaped as the weight, steps run), the same on every process."""
    weight = qlayer.layer.weight.detach()
    n = weight.numel()
    owned, codes, steps_run = round_share(qlayer, moments, cfg, rank(), world(), progress, desc)
    # the codes, then each process's steps run, in float32 (exact integers up to 2^24, also
    # for a half-precision weight)
    full = weight.new_zeros(n + world(), dtype=torch.float32)
    full[owned] = codes
    full[n + rank()] = steps_run
    full = all_sum(full)
    return full[:n].reshape(weight.shape).to(codes.dtype), int(full[n:].max().item())


def round_share(qlayer: QuantLayer, moments: Moments, cfg: QuantConfig, r: int, w: int,
                progress: bool = False, desc: str = "") -> tuple[slice, Tensor, int]:
    """Process r of w's share: (its elements of the flattened weight, their codes, steps run
    until its rows stopped)."""
    weight = qlayer.layer.weight.detach()
    c_out, n = weight.shape[0], weight.numel()
    length = n // max(c_out, 1)
    lo, hi = owned_rows(c_out, getattr(qlayer.layer, "groups", 1), r, w)
    # the window: the elements of rows [lo, hi), widened to multiples of ALIGN of the layer
    start = lo * length // ALIGN * ALIGN
    stop = n if hi * length == n else min(n, -(-hi * length // ALIGN) * ALIGN)
    if lo == hi:
        start = stop = lo * length
    owned = slice(lo * length - start, hi * length - start)

    def window(t: Tensor) -> Tensor:
        return t.expand_as(weight).reshape(-1)[start:stop]

    objective = Objective(RowsLoss(qlayer.layer, moments, lo, hi, owned.start, stop - start))
    codes, steps_run = round_weights(
        window(weight), window(qlayer.weight_scale()), window(qlayer.weight_zero_point()),
        qlayer.qmin, qlayer.qmax, objective, cfg, progress, desc, owned)
    return slice(lo * length, hi * length), codes[owned], steps_run


class ShardSampledLoss(SampledLoss):
    """The sampled loss with the data split across processes: batches drawn as global sample
    indices (the 1-process draws), each process's part of the batch weighted by its share of
    the batch, the gradients summed over processes."""

    def __init__(self, qlayer: QuantLayer, x: Tensor, target: Tensor,
                 activation: Callable[[Tensor], Tensor] | None, batch_size: int,
                 generator: torch.Generator, part: Shard) -> None:
        super().__init__(qlayer, x, target, activation, batch_size, generator)
        self.batch_size = min(batch_size, part.total)
        self.offset, self.total, self.count = part.offset, part.total, part.count

    def _draw(self, count: int) -> Tensor:
        return torch.randint(self.total, (count,), generator=self.generator)

    def _local_loss(self, idx: Tensor, weight: Tensor) -> Tensor:
        return self.batch_loss(idx, weight) * (len(idx) / self.batch_size)

    def weight_grad(self, weight: Tensor) -> Tensor:
        idx = self._draw(self.batch_size) - self.offset
        idx = idx[(idx >= 0) & (idx < self.count)]
        if len(idx):
            with torch.enable_grad():
                leaf = weight.detach().requires_grad_(True)
                grad = torch.autograd.grad(self._local_loss(idx, leaf), leaf)[0].contiguous()
        else:
            grad = torch.zeros_like(weight)
        return all_sum(grad)

    def __call__(self, weight: Tensor) -> Tensor:
        raise NotImplementedError("ShardSampledLoss gives gradients only (weight_grad)")


def eval_share(part: Shard) -> Shard:
    """The samples of `eval_rows` that this process holds, as a shard of those samples:
    `chunks` holds their indices into this process's data, offset and total count them
    among the samples of `eval_rows` only."""
    every = eval_rows(part.total, 0, part.total)
    mine = eval_rows(part.total, part.offset, part.count)
    before = int((every < part.offset).sum())
    return Shard(chunks=[mine], offset=before, count=len(mine), total=len(every))


def shared_losses(qlayer: QuantLayer, weights: list[Tensor], x: Tensor, target: Tensor,
                  activation: Callable[[Tensor], Tensor] | None, part: Shard) -> list[float]:
    """`layer_loss` of each of `weights` on the samples of `eval_rows` (as in one process),
    each process on those it holds; one all-reduce for all."""
    at = eval_rows(part.total, part.offset, part.count)
    keep = len(at)
    if keep and (keep != len(x) or int(at[-1]) != keep - 1):  # not all of x in order: copy
        x, target = x[at], target[at]
    local = [layer_loss(qlayer, w, x, target, activation) * keep if keep else 0.0
             for w in weights]
    sums = all_sum(torch.tensor([*local, float(keep)], dtype=torch.float64,
                                device=weights[0].device))
    return (sums[:-1] / sums[-1].clamp(min=1)).tolist()


def adaround_layer(name: str, qlayer: QuantLayer, x: Tensor, target: Tensor,
                   activation: Callable[[Tensor], Tensor] | None, cfg: QuantConfig,
                   generator: torch.Generator, progress: bool, start: float,
                   moments: Moments | None, part: Shard) -> LayerResult:
    """`adaround.reconstruct.adaround_layer` with the work split across processes."""
    begin = time.perf_counter()
    nearest = qlayer.nearest_codes()
    if moments is not None and cfg.loss in ("quadratic", "auto"):
        if qlayer.layer.weight.numel() >= ROW_SPLIT_MIN:
            codes, steps_run = round_rows(qlayer, moments, cfg, progress, name)
        else:  # launch-bound: every process steps the whole layer, no communication
            codes, steps_run = run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)),
                                            cfg, progress, name)
    else:
        sampled = ShardSampledLoss(qlayer, x, target, activation, cfg.batch_size, generator,
                                   part)
        objective = (Objective(sampled) if moments is None or cfg.loss == "sampled" else
                     Objective(sampled, QuadraticLoss(qlayer, moments),
                               int(cfg.warm_start * cfg.iters)))
        codes, steps_run = run_rounding(qlayer, objective, cfg, progress, name)
    step_seconds = time.perf_counter() - begin
    qlayer.set_codes(codes)
    return layer_result(name, qlayer, codes, nearest, steps_run, cfg, moments, activation,
                        lambda ws: shared_losses(qlayer, ws, x, target, activation, part),
                        (start, begin, step_seconds))


class SharedWork:
    """`adaround.api.LayerWork` across the processes of the group (this process holds the
    samples of `part`): moments all-reduced, rows split (quadratic loss) or gradients summed
    (sampled loss), per-layer losses on each process's report samples, summed; independent
    layers (inputs="float") whole, each on one process (`distributed_whole`)."""

    def __init__(self, part: Shard) -> None:
        self.part, self.speaks = part, rank() == 0
        self.report_rows = eval_share(part)  # the same for every layer

    def moments(self, engine: Any, name: str, qlayer: QuantLayer, cfg: QuantConfig
                ) -> Moments | None:
        from adaround import api  # api imports this module

        return api._layer_moments(engine, name, qlayer, cfg, shared_moments, self.part.total)

    def eval_at(self) -> Tensor:
        return self.report_rows.chunks[0]

    def round(self, name: str, qlayer: QuantLayer, xq: Tensor, target: Tensor,
              activation: Callable[[Tensor], Tensor] | None, cfg: QuantConfig,
              generator: torch.Generator, progress: bool, start: float,
              moments: Moments | None, rows_only: bool) -> LayerResult:
        held = self.report_rows if rows_only else self.part
        return adaround_layer(name, qlayer, xq, target, activation, cfg, generator, progress,
                              start, moments, held)

    def round_independent(self, named: list[tuple[str, QuantLayer, Moments]],
                          cfg: QuantConfig, progress: bool) -> list[LayerResult]:
        from adaround.distributed_whole import round_whole

        return round_whole(named, cfg, progress)


def round_layers(fp: nn.Module, qmodel: nn.Module, plans: list[LayerPlan], x: Tensor,
                 cfg: QuantConfig, progress: bool, checkpoint: Checkpoint) -> list[LayerResult]:
    """`adaround.api._round_layers` across the processes of the group (`SharedWork`): data
    sharded; progress and logs from process 0, the checkpoint written by process 0 after
    each layer."""
    from adaround import api  # api imports this module

    names = [p.name for p in plans if p.reconstructable]
    part = shard(list(x.split(api.FORWARD_BATCH)))
    if rank() == 0:
        log.info("%d processes: process 0 holds %d of %d calibration samples", world(),
                 part.count, part.total)
    with budget_store(cfg.memory_budget_mb) as store:
        source = fp if cfg.inputs == "float" else qmodel
        engine = make_engine(fp, source, part.chunks, names, store)
        return api._reconstruct_each(engine, qmodel, plans, cfg, progress and rank() == 0,
                                     checkpoint, SharedWork(part))


def round_hf_layer(name: str, qlayer: QuantLayer, x_q: list[Tensor], x_fp: list[Tensor],
                   activation: Callable[[Tensor], Tensor] | None, cfg: QuantConfig,
                   generator: torch.Generator, progress: bool, begin: float) -> LayerResult:
    """`quantize_hf`'s layer across processes: each holds the token rows of its batches."""
    from adaround.reconstruct.cache import layer_target

    moments = None
    if cfg.loss != "sampled":
        moments = shared_moments(qlayer.layer, zip(x_q, x_fp))
    xq = torch.cat(x_q)
    target = layer_target(qlayer.layer, torch.cat(x_fp), activation)
    part = rows_shard(xq.shape[0], xq.device)
    return adaround_layer(name, qlayer, xq, target, activation, cfg, generator,
                          progress and rank() == 0, begin, moments, part)
