#!/usr/bin/env python
"""Train FashionNet on Fashion-MNIST and save the weights used by the built-in demo.

Usage (from the repository root)::

    PYTHONPATH=src python scripts/train_fashion_net.py --epochs 8 --seed 0 --threads 2

Training is deterministic for a fixed seed and thread count: SGD with Nesterov momentum,
a one-cycle learning-rate schedule and random horizontal flips (optionally random crops).
The final model is evaluated once on the test split and saved as a plain float32
state_dict with ``torch.save``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from adaround.data.fashion_mnist import (
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        load_fashion_mnist,
    )
    from adaround.models.fashion_net import FashionNet
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from adaround.data.fashion_mnist import (
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        load_fashion_mnist,
    )
    from adaround.models.fashion_net import FashionNet

logger = logging.getLogger("train_fashion_net")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "src" / "adaround" / "models" / "fashion_net.pt",
        help="where to write the state_dict",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--crop-pad", type=int, default=0, help="random-crop padding; 0 disables")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def augment(x: torch.Tensor, crop_pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and (if ``crop_pad``) random crop with background padding."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if crop_pad > 0:
        background = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        padded = F.pad(x, [crop_pad] * 4, value=background)
        h, w = x.shape[-2:]
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # n,1,h,1
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # n,1,1,w
        batch = torch.arange(n)[:, None, None, None]
        x = padded[batch, 0, rows, cols]
    return x


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], bs):
        correct += int((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum())
    return correct / x.shape[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = FashionNet()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "FashionNet: %d parameters; %d train / %d test images", n_params, len(x_train), len(x_test)
    )

    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, len(x_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = augment(x_train[idx], args.crop_pad, gen)
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        logger.info(
            "epoch %d/%d  loss %.4f  train acc %.4f  (%.0fs elapsed)",
            epoch + 1,
            args.epochs,
            total_loss / len(x_train),
            correct / len(x_train),
            time.perf_counter() - start,
        )
    train_time = time.perf_counter() - start

    acc = evaluate(model, x_test, y_test)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"test accuracy: {acc:.4f}")
    print(f"training time: {train_time:.1f}s for {args.epochs} epochs")
    print(f"saved {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
