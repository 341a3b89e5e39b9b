"""A quantized transformer as a Hugging Face folder that `from_pretrained` loads by itself.

`save_compressed(qmodel, folder, tokenizer)` writes the compressed-tensors "pack-quantized"
checkpoint layout (what llm-compressor writes and transformers, vLLM and TGI read): for every
quantized Linear, `<name>.weight_packed` (the integer codes, 32 / bits per int32, as
compressed_tensors' `pack_to_int32` packs them), `<name>.weight_scale` (per channel
[out, 1], per group [out, in / group] or per tensor [1]), `<name>.weight_shape` and, for
asymmetric grids, `<name>.weight_zero_point`; every other tensor as it is; config.json with a
`quantization_config` whose config groups name the quantized layers. compressed-tensors' signed
codes are adaround's signed codes; unsigned codes c with zero point z are stored as c - 2^(b-1)
with zero point z - 2^(b-1): (c - z) * s either way. Each file is written atomically.

Loading needs `pip install compressed-tensors` (`adaround[compressed]`); docs/huggingface.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaround.errors import ExportError
from adaround.export.graph import float_twin
from adaround.io import atomic_write
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

PIP = "pip install 'adaround[compressed]'"


def _pack_to_int32() -> Any:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError as exc:
        raise ExportError(f"writing compressed-tensors checkpoints needs compressed-tensors: "
                          f"{PIP}") from exc
    return pack_to_int32


def _scheme(qlayer: QuantLayer) -> dict[str, Any]:
    strategy = ("group" if qlayer.group_size is not None
                else "tensor" if qlayer.axis is None else "channel")
    return {"num_bits": qlayer.bits, "type": "int", "symmetric": qlayer.symmetric,
            "strategy": strategy, "group_size": qlayer.group_size, "dynamic": False,
            "observer": "minmax", "actorder": None, "block_structure": None}


def _format(qlayer: QuantLayer) -> str:
    # compressed-tensors 0.20 loads packed zero points wrongly (it expects them unpacked when
    # it builds the model, packed when it decompresses): asymmetric grids go unpacked, one
    # int8 per code ("naive-quantized")
    return "pack-quantized" if qlayer.symmetric else "naive-quantized"


def _packed(qlayer: QuantLayer, pack: Any) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one Linear, signed codes in [-2^(b-1), 2^(b-1))."""
    shift = 0 if qlayer.symmetric else 2 ** (qlayer.bits - 1)
    codes = (qlayer.codes.detach().cpu().to(torch.int16) - shift).to(torch.int8)
    scale = qlayer.scale.detach().cpu().float()
    rows = codes.shape[0]
    scale = scale.reshape(1) if qlayer.axis is None else scale.reshape(rows, -1)
    if not qlayer.symmetric:
        zero = (qlayer.zero_point.detach().cpu().round() - shift).to(torch.int8)
        return {"weight": codes.contiguous(), "weight_scale": scale.contiguous(),
                "weight_zero_point": zero.reshape(scale.shape).contiguous()}
    return {"weight_packed": pack(codes, qlayer.bits), "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def compressed_state(qmodel: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, quantization_config) of the compressed-tensors checkpoint."""
    pack = _pack_to_int32()
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    linears = {n: m for n, m in layers.items() if isinstance(m.layer, nn.Linear)}
    if not linears:
        raise ExportError("the model has no quantized Linear layer: pass a quantize_hf result")
    if len(linears) < len(layers):
        log.info("%d quantized embedding(s) are stored as their dequantized float tables "
                 "(compressed-tensors packs Linear weights)", len(layers) - len(linears))
    state = dict(float_twin(qmodel).state_dict())
    groups: dict[str, dict[str, Any]] = {}
    for name, qlayer in linears.items():
        del state[f"{name}.weight"]
        for key, tensor in _packed(qlayer, pack).items():
            state[f"{name}.{key}"] = tensor
        scheme = _scheme(qlayer)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None,
                                "output_activations": None, "format": _format(qlayer)})
        groups[key]["targets"].append(name)
    ignore = [n for n, m in qmodel.named_modules()
              if isinstance(m, nn.Linear) and not n.endswith(".layer") and n not in linears]
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "kv_cache_scheme": None, "ignore": ignore,
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
    }
    return _dedupe(state), config


def _dedupe(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep one name per shared tensor (tied embeddings): safetensors refuses aliases, and
    from_pretrained ties them again."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_compressed(qmodel: nn.Module, folder: str | os.PathLike[str],
                    tokenizer: Any = None) -> Path:
    """Write `qmodel` (a `quantize_hf` result) as a compressed-tensors pack-quantized folder
    that `transformers.AutoModel.from_pretrained(folder)` loads; returns the folder.

    Example:
        >>> save_compressed(qmodel, "minilm-w4", tokenizer)                   # doctest: +SKIP
        >>> model = AutoModel.from_pretrained("minilm-w4", local_files_only=True)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    config = getattr(qmodel, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError("save_compressed writes Hugging Face models (with a .config): "
                          "use adaround.save for other models")
    state, quant_config = compressed_state(qmodel)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quant_config
    text = json.dumps(config_dict, indent=2, sort_keys=True)
    atomic_write(out / "model.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tokenizer.save_pretrained(tmp_dir)
            for file in sorted(Path(tmp_dir).iterdir()):
                if file.is_file():
                    atomic_write(out / file.name, lambda tmp, f=file: shutil.copyfile(f, tmp))
    log.info("wrote compressed-tensors checkpoint %s (%d quantized Linear layers)", out,
             sum(len(g["targets"]) for g in quant_config["config_groups"].values()))
    return out
