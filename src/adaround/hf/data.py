"""Calibration data for Hugging Face-style models: batches that are dicts of tensors.

Accepted: a list of strings with a tokenizer, one dict (or `BatchEncoding`) of tensors, an
iterable of such dicts (a DataLoader), or a tensor of input_ids. Each batch keeps its own
padding; `token_mask` says which positions are real tokens, so that padding never enters the
reconstruction loss.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaround.errors import CalibrationDataError

Batch = dict[str, Any]
EMPTY = "calibration data is empty: pass a few hundred sentences or tokenized batches"


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int, batch_size: int
              ) -> list[Batch]:
    if tokenizer is None:
        raise CalibrationDataError(
            "calibration data is text but no tokenizer was given: pass tokenizer="
            "AutoTokenizer.from_pretrained(model_folder), or tokenized batches")
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        batches.append(dict(encoded))
    return batches


def _split(batch: Mapping[str, Any], batch_size: int) -> list[Batch]:
    """One large dict of tensors as dicts of at most `batch_size` rows (other values shared)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim()}
    if len(sizes) != 1:
        raise CalibrationDataError(
            f"the tensors of a calibration batch disagree in batch size ({sorted(sizes)}): "
            "pass input_ids, attention_mask, ... with one row per sequence")
    total = sizes.pop()
    return [{k: v[s:s + batch_size] if isinstance(v, Tensor) and v.dim() else v
             for k, v in batch.items()} for s in range(0, total, batch_size)]


def _check(batch: Batch) -> Batch:
    tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    if not tensors:
        raise CalibrationDataError(
            f"a calibration batch has no tensor (keys {sorted(batch)}): pass input_ids, "
            "attention_mask, ... as tensors (return_tensors='pt')")
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if isinstance(mask, Tensor) and isinstance(ids, Tensor) and mask.shape != ids.shape:
        raise CalibrationDataError(
            f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}: "
            "pass the mask the tokenizer returned with the ids")
    return batch


def calibration_batches(calib: Any, tokenizer: Any = None, max_length: int = 128,
                        batch_size: int = 32) -> list[Batch]:
    """The calibration data as a list of batches (dicts of tensors), `batch_size` sequences
    each where the data was not already batched.

    Example:
        >>> calibration_batches({"input_ids": torch.ones(3, 5, dtype=torch.long)}, batch_size=2)[1]
        {'input_ids': tensor([[1, 1, 1, 1, 1]])}
    """
    if isinstance(calib, (str, bytes)):
        raise CalibrationDataError("calibration data is one string: pass a list of sentences")
    if isinstance(calib, Mapping):
        batches = _split(calib, batch_size)
    elif isinstance(calib, Tensor):
        batches = _split({"input_ids": calib}, batch_size)
    elif isinstance(calib, Sequence) and calib and all(isinstance(t, str) for t in calib):
        batches = _tokenize(calib, tokenizer, max_length, batch_size)
    elif isinstance(calib, Iterable):
        batches = []
        for batch in calib:
            if isinstance(batch, Tensor):
                batch = {"input_ids": batch}
            if not isinstance(batch, Mapping):
                raise CalibrationDataError(
                    f"a calibration batch is a {type(batch).__name__}; expected a dict of "
                    "tensors (input_ids, attention_mask, ...), a list of strings with a "
                    "tokenizer, or a tensor of input_ids")
            batches.append(dict(batch))
    else:
        raise CalibrationDataError(
            f"calibration data of type {type(calib).__name__} is not supported: pass a list of "
            "strings with a tokenizer, a dict of tensors or an iterable of such dicts")
    if not batches:
        raise CalibrationDataError(EMPTY)
    checked = [_check(b) for b in batches]
    masks = [token_mask(b) for b in checked]
    if all(m is not None for m in masks) and not any(bool(m.any()) for m in masks if m is not None):
        raise CalibrationDataError("every attention_mask is all zero: there is no real token to "
                                   "calibrate on; pass masks with 1 at real tokens (what the "
                                   "tokenizer returns)")
    return checked


def token_mask(batch: Batch) -> Tensor | None:
    """[batch, positions] bool: True at real tokens (attention_mask == 1); None if unknown."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask == 1
    ids = batch.get("input_ids")
    if isinstance(ids, Tensor) and ids.dim() == 2:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return None


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def read_sentences(path: str | Path, column: int | None = None, limit: int | None = None,
                   skip_header: bool = False) -> list[str]:
    """Sentences from a text file (one per line) or from column `column` (0-based) of a TSV.

    Empty lines and empty cells are skipped; rows without that column are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration text file at {path}")
    with path.open(encoding="utf-8", newline="") as fh:
        if column is None:
            rows = [line.rstrip("\r\n") for line in fh]
        else:
            rows = []
            for number, row in enumerate(csv.reader(fh, delimiter="\t",
                                                    quoting=csv.QUOTE_NONE), 1):
                if column >= len(row):
                    raise CalibrationDataError(
                        f"{path}:{number} has {len(row)} tab-separated columns, no column "
                        f"{column}: pass --tsv-column between 0 and {len(row) - 1}")
                rows.append(row[column])
    if skip_header:
        rows = rows[1:]
    sentences = [r.strip() for r in rows if r.strip()]
    if not sentences:
        raise CalibrationDataError(f"{path} holds no sentence: {EMPTY}")
    return sentences[:limit] if limit is not None else sentences
