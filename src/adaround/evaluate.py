"""Classification accuracy of a model on in-memory tensors."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from adaround.calibration import model_device
from adaround.errors import AdaRoundError, EvaluationError
from adaround.input_stats import warn_if_unlike

__all__ = ["accuracy", "model_device", "predictions"]

logger = logging.getLogger(__name__)


def check_labels(y: Tensor, classes: int) -> None:
    """Refuse labels that no output of a `classes`-way classifier can match."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise EvaluationError(
            f"labels span {int(y.min())}..{int(y.max())} but the model has {classes} outputs "
            f"(classes 0..{classes - 1}): pass the labels of this model's classes (a file for "
            "another task, or 1-based labels?)")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _logits(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot take class scores from a model output of type {type(out).__name__}")


def _batches(
    model: nn.Module, x: Tensor, batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, scores)`` per batch, scores as float32 on the CPU (no grad, eval mode)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x)
    if n == 0:
        raise ValueError("no samples to evaluate (x is empty)")
    device = model_device(model)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", total=len(starts), leave=False)
    with torch.no_grad(), _eval_mode(model):
        for start in starts:
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            try:
                out = model(xb)
            except (RuntimeError, ValueError, TypeError) as exc:
                if isinstance(exc, AdaRoundError):
                    raise
                raise EvaluationError(
                    f"the model rejected inputs of shape {tuple(xb.shape)} ({type(exc).__name__}"
                    f": {str(exc).splitlines()[0][:200]}); pass inputs shaped and preprocessed "
                    "as for calibration") from exc
            yield start, _logits(out).float().cpu()


def predictions(
    model: nn.Module, x: Tensor, batch_size: int = 256, progress: bool = False
) -> Tensor:
    """Top-1 class index of every sample of ``x`` (int64, CPU), computed in eval mode."""
    out = torch.empty(len(x), dtype=torch.long)
    for start, scores in _batches(model, x, batch_size, progress, "predict"):
        out[start : start + len(scores)] = scores.argmax(dim=1)
    return out


def accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    topk: Sequence[int] = (1,),
    progress: bool = False,
) -> dict[int, float]:
    """Top-k accuracy in percent, ``{k: acc}`` for each ``k`` in ``topk``.

    Batches are moved to the model's device; the model runs under ``no_grad`` in eval mode and
    every submodule's training flag is restored afterwards. ``progress`` shows a tqdm bar.
    """
    y = torch.as_tensor(y).reshape(-1).long().cpu()
    if len(y) != len(x):
        raise ValueError(f"{len(y)} labels for {len(x)} samples")
    ks = sorted({int(k) for k in topk})
    if not ks or ks[0] < 1:
        raise ValueError(f"topk must hold positive integers, got {tuple(topk)}")
    correct = dict.fromkeys(ks, 0)
    warn_if_unlike(model, x)
    for start, scores in _batches(model, x, batch_size, progress, "evaluate"):
        if scores.ndim != 2:
            raise ValueError(f"expected (batch, classes) model outputs, got {tuple(scores.shape)}")
        check_labels(y, scores.shape[1])
        if ks[-1] > scores.shape[1]:
            raise ValueError(f"top-{ks[-1]} accuracy needs more than {scores.shape[1]} classes")
        top = scores.topk(ks[-1], dim=1).indices
        hit = top.eq(y[start : start + len(scores)].unsqueeze(1))
        for k in ks:
            correct[k] += int(hit[:, :k].any(dim=1).sum())
    result = {k: 100.0 * correct[k] / len(x) for k in ks}
    logger.info(
        "accuracy on %d samples: %s",
        len(x),
        ", ".join(f"top-{k} {v:.2f}%" for k, v in result.items()),
    )
    return result
