"""The Hessian of the task loss with respect to one layer's weights (paper, eq. 13).

Three estimates, all of the mean cross-entropy over the given samples:

* ``"gauss_newton"``: E_x[J^T (diag(p) - p p^T) J], J the Jacobian of the logits w.r.t. the
  weights; built from per-sample weight gradients, one per class c with logit cotangent
  sqrt(p_c) (e_c - p). ``max_classes`` keeps each sample's most probable classes only.
* ``"fisher"``: the empirical Fisher E_x[g g^T] of per-sample loss gradients, with the given
  labels or, without labels, labels drawn from the model's own prediction.
* ``"exact"``: second derivatives by double back-propagation, one Hessian-vector product per
  weight, so only for small layers. For networks that are piecewise linear after the layer
  (ReLU, ReLU6, max/avg pooling) it equals the Gauss-Newton matrix almost everywhere.

The task loss without labels is the cross-entropy against the FP model's own probabilities,
whose gradient vanishes at the FP weights: the paper's "converged network" assumption, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from adaround.analysis.qubo import MAX_DENSE, check_dense
from adaround.errors import ConfigError, ModelError
from adaround.evaluate import model_device
from adaround.nn.quant_layer import QuantLayer, apply_layer

log = logging.getLogger(__name__)

HESSIANS = ("gauss_newton", "fisher", "exact")


def _logits(out: Any) -> Tensor:
    """Class scores of a model output, in float32 at least."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        out = out[0]
    if isinstance(out, Tensor):
        return out if out.dtype == torch.float64 else out.float()
    raise ModelError(f"the model returned a {type(out).__name__}; the task loss needs a tensor "
                     "of class scores [batch, classes]")


@torch.no_grad()
def soft_targets(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """The model's class probabilities on x: the targets of the unlabelled task loss."""
    device = model_device(model)
    return torch.cat([F.softmax(_logits(model(xs.to(device))), -1).cpu()
                      for xs in x.split(batch_size)])


def _cross_entropy(logits: Tensor, labels: Tensor | None, targets: Tensor | None) -> Tensor:
    """Summed cross-entropy against hard labels or soft targets."""
    if labels is not None:
        return F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
    if targets is None:
        raise ConfigError("the task loss needs labels or soft targets")
    return -(targets.to(logits.device) * F.log_softmax(logits, -1)).sum()


@torch.no_grad()
def task_loss(model: nn.Module, x: Tensor, labels: Tensor | None = None,
              targets: Tensor | None = None, batch_size: int = 256) -> float:
    """Mean cross-entropy of `model` on x against `labels`, else against `targets`."""
    device = model_device(model)
    total = 0.0
    for i, xs in enumerate(x.split(batch_size)):
        part = slice(i * batch_size, i * batch_size + xs.shape[0])
        total += _cross_entropy(
            _logits(model(xs.to(device))),
            None if labels is None else labels[part],
            None if targets is None else targets[part],
        ).item()
    return total / x.shape[0]


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The float layer called `name` and the qualified name of its weight in `model`."""
    layer = model.get_submodule(name)
    if isinstance(layer, QuantLayer):
        layer = layer.layer
    for pname, param in model.named_parameters():
        if param is layer.weight:
            return layer, pname
    raise ModelError(f"layer {name} has no weight parameter registered in the model")


@contextmanager
def _output_as_leaf(layer: nn.Module, sink: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Replace the layer's output by a leaf tensor so gradients stop there."""

    def hook(_module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        sink.append((args[0].detach(), leaf))
        return leaf

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def per_sample_weight_grads(layer: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """[B, n]: for each sample, the weight gradient given the gradient at the layer's output."""
    weight = layer.weight.detach()

    def one(xi: Tensor, gi: Tensor) -> Tensor:
        _, pull = vjp(lambda w: apply_layer(layer, xi.unsqueeze(0), w), weight)
        return pull(gi.unsqueeze(0))[0]

    return vmap(one)(x, grad_out).reshape(x.shape[0], -1)


def _cotangents(probs: Tensor, kind: str, labels: Tensor | None, max_classes: int | None,
                generator: torch.Generator) -> list[Tensor]:
    """Logit cotangents r whose outer products sum to the per-sample curvature."""
    if kind == "fisher":
        if labels is None:
            labels = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0]
        return [F.one_hot(labels.to(probs.device), probs.shape[1]).to(probs.dtype) - probs]
    classes = probs.shape[1] if max_classes is None else min(max_classes, probs.shape[1])
    top = probs.topk(classes, dim=1).indices
    out = []
    for j in range(classes):
        c = top[:, j]
        p_c = probs.gather(1, c[:, None])
        out.append(p_c.sqrt() * (F.one_hot(c, probs.shape[1]).to(probs.dtype) - probs))
    return out


def _curvature(model: nn.Module, layer: nn.Module, x: Tensor, kind: str,
               labels: Tensor | None, max_classes: int | None, batch_size: int,
               generator: torch.Generator) -> Tensor:
    n = layer.weight.numel()
    device = model_device(model)
    hessian = torch.zeros(n, n, dtype=torch.float64, device=device)
    mass = 0.0
    for i, xs in enumerate(x.split(batch_size)):
        sink: list[tuple[Tensor, Tensor]] = []
        with torch.enable_grad(), _output_as_leaf(layer, sink):
            logits = _logits(model(xs.to(device)))
        inp, leaf = sink[0]
        probs = F.softmax(logits.detach(), -1)
        part = None if labels is None else labels[i * batch_size: i * batch_size + len(xs)]
        cots = _cotangents(probs, kind, part, max_classes, generator)
        for j, r in enumerate(cots):
            (grad_out,) = torch.autograd.grad(logits, leaf, r, retain_graph=j < len(cots) - 1)
            g = per_sample_weight_grads(layer, inp, grad_out).double()
            hessian += g.T @ g
        if kind == "gauss_newton":
            mass += float(probs.topk(len(cots), dim=1).values.sum())
    if kind == "gauss_newton" and max_classes is not None:
        log.info("Gauss-Newton over each sample's top %d classes: %.1f%% of the probability "
                 "mass", max_classes, 100 * mass / x.shape[0])
    return hessian / x.shape[0]


def _exact(model: nn.Module, pname: str, layer: nn.Module, x: Tensor, labels: Tensor | None,
           batch_size: int) -> Tensor:
    """Rows of the Hessian by double back-propagation: n Hessian-vector products per batch."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    n = weight.numel()
    targets = None if labels is not None else soft_targets(model, x, batch_size)
    hessian = torch.zeros(n, n, dtype=torch.float64, device=weight.device)
    device = model_device(model)
    for i, xs in enumerate(x.split(batch_size)):
        part = slice(i * batch_size, i * batch_size + xs.shape[0])
        with torch.enable_grad():
            logits = _logits(functional_call(model, {pname: weight}, (xs.to(device),)))
            loss = _cross_entropy(logits, None if labels is None else labels[part],
                                  None if targets is None else targets[part])
            (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
            grad = grad.reshape(-1)
            for k in range(n):
                (row,) = torch.autograd.grad(grad[k], weight, retain_graph=k < n - 1)
                hessian[k] += row.reshape(-1).double()
    return hessian / x.shape[0]


def task_loss_hessian(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    *,
    kind: str = "gauss_newton",
    labels: Tensor | None = None,
    max_classes: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    max_dense: int = MAX_DENSE,
) -> Tensor:
    """Hessian [n, n] (float64) of the mean cross-entropy on x w.r.t. the layer's weights.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> task_loss_hessian(net, "0", torch.randn(16, 3)).shape
        torch.Size([12, 12])
    """
    if kind not in HESSIANS:
        raise ConfigError(f"hessian={kind!r} is not supported: choose one of {', '.join(HESSIANS)}")
    layer, pname = _resolve(model, layer_name)
    check_dense(f"layer {layer_name} ({layer.weight.numel()} weights)", layer.weight.numel(),
                max_dense)
    generator = generator or torch.Generator().manual_seed(0)
    if kind == "exact":
        return _exact(model, pname, layer, x, labels, batch_size)
    return _curvature(model, layer, x, kind, labels, max_classes, batch_size, generator)

