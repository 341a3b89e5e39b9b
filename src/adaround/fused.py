"""Element-wise functions fused into one kernel by torch.compile, once per process.

Used where `compile=True` asks for it: the rounding step's element-wise chain
(reconstruct/loop.py) and the activation quantizers' passes (nn/act_quant.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def compile_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled with dynamic shapes: one compilation serves every layer shape (a few more
    where a Python argument such as a grid bound or an optional tensor differs)."""
    return torch.compile(fn, dynamic=True)
