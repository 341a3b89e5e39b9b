"""Options of the transformer pipeline (beyond QuantConfig's) and what a run measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adaround.config import _check_int_range, _check_positive
from adaround.errors import ConfigError

HF_ATTR = "adaround_hf_stats"


@dataclass(frozen=True)
class HFOptions:
    """Which parts of a transformer to quantize, and how to hold its activations.

    blocks: name of the ModuleList of transformer blocks (found by itself if None).
    embeddings: also quantize the nn.Embedding tables (rounded to nearest: for a lookup table
        that minimises the layer-wise loss). head: also the Linear layers outside the blocks
        (pooler, LM head), reconstructed from whole-network passes after the blocks.
    max_length / forward_batch: tokenization of text calibration data, sequences per forward.
    offload: keep the blocks not in use, and the cached activations, on the CPU while
        running on `device` (a GPU); on the CPU it changes nothing.
    memory_budget_mb: cached block inputs beyond this many MB go to files in `spill_dir`
        (a temporary folder by default), removed at the end.

    Example:
        >>> HFOptions(embeddings=True, memory_budget_mb=512).head
        False
    """

    blocks: str | None = None
    embeddings: bool = False
    head: bool = False
    max_length: int = 128
    forward_batch: int = 32
    offload: bool = False
    device: str | None = None
    memory_budget_mb: float | None = None
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        _check_int_range("max_length", self.max_length, 1)
        _check_int_range("forward_batch", self.forward_batch, 1)
        if self.memory_budget_mb is not None:
            _check_positive("memory_budget_mb", self.memory_budget_mb, allow_zero=True)
        for name in ("embeddings", "head", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.device is not None:
            check_device(self.device)


def check_device(device: Any) -> None:
    """Refuse a device string torch does not know, or a GPU this machine lacks."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device={device!r} is not a torch device ({exc}): use 'cpu', "
                          "'cuda' or 'cuda:N'") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here (torch "
                          f"{torch.__version__}, CPU build or no GPU visible): leave device unset "
                          "or use 'cpu'")


@dataclass(frozen=True)
class HFStats:
    """What one `quantize_hf` run took."""

    seconds: float
    peak_rss_mb: float  # the process's peak resident memory (getrusage), whole run
    peak_device_mb: float | None  # torch.cuda.max_memory_allocated on a GPU, else None
    peak_cached_mb: float  # block inputs of both streams held in memory at once, at most
    spilled_mb: float  # block inputs written to disk over the budget
    tokens: int  # real (non-padding) calibration tokens
    losses: list[str] = field(default_factory=list)  # the objectives the layers optimised

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
