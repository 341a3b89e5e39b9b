"""Load a local Hugging Face model folder (offline) with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from adaround.errors import ModelError

PIP = "pip install 'adaround[hf]'"


def load_pretrained(folder: str | Path) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) from a folder holding config.json and weights;
    nothing is downloaded."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder (no config.json): pass the "
                         "folder that holds config.json and the weights")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"loading a Hugging Face model needs transformers: {PIP}") from exc
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: transformers cannot load this model ({exc})") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer
