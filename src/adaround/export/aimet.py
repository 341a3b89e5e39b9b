"""What aimet-torch's own AdaRound flow hands over, written from an adaround result.

`export_aimet(qmodel, example_input, directory, prefix)` writes, one file at a time (each
atomically):

- `<prefix>.pth`: the state dict of the model with BatchNorm folded (as aimet's
  `fold_all_batch_norms` leaves it: the BatchNorm modules become Identity, the convolutions get
  the folded weight and bias) and the AdaRound weights (codes times scale), keyed by the
  original module names: `model.load_state_dict(torch.load(...))` after aimet's folding;
- `<prefix>.onnx`: the float graph (`export_onnx(..., qdq=False)`);
- `<prefix>.encodings`: AIMET encoding format 1.0.0 (or 0.6.1) keyed by that graph's tensor
  names, for Qualcomm's converters;
- `<prefix>_torch.encodings`: the same grids keyed by module names, parameters as
  `<module>.weight` and input quantizers as `{module: {"input": {"0": ...}}}`, the layout that
  `QuantizationSimModel.load_encodings` reads (aimet's own export writes this file beside the
  1.0.0 one: its `load_encodings` does not read the 1.0.0 lists);
- `<prefix>_quantsim_config.json`: an AIMET config that puts quantizers where adaround has
  them: weights of the quantized layers, the inputs of Conv/Gemm/ConvTranspose/MatMul where
  activations are quantized (adaround quantizes layer inputs; AIMET's default config quantizes
  every op's output), nothing else.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaround.checks import check_export, check_path
from adaround.errors import ExportError
from adaround.export.aimet_grid import aimet_ready, legacy_entries, v1_entry
from adaround.export.encodings import encodings_dict
from adaround.export.graph import float_twin, quant_layers, require_onnx
from adaround.export.onnx_qdq import act_qparams, build_onnx, enabled_act_quant
from adaround.io import atomic_write
from adaround.nn.quant_layer import QuantLayer

log = logging.getLogger(__name__)

AIMET_VERSIONS = ("1.0.0", "0.6.1")
_QUANT_STATE = ("scale", "zero_point", "codes")


def aimet_state_dict(qmodel: nn.Module) -> dict[str, Tensor]:
    """The float state dict of the folded model with the AdaRound weights, original names.

    QuantLayer `<name>` keeps its float layer under `<name>.layer`; here its parameters are
    `<name>.weight` (the dequantized codes) and `<name>.bias`, as in the user's model.
    """
    twin = float_twin(qmodel)
    return {k: v.detach().clone().contiguous() for k, v in twin.state_dict().items()}


def _grid(qlayer: QuantLayer) -> tuple[np.ndarray, np.ndarray]:
    scales = qlayer.scale.detach().cpu().float().reshape(-1).numpy()
    if qlayer.symmetric:
        return scales, np.full(scales.shape, -(2 ** (qlayer.bits - 1)), dtype=np.int64)
    zero = qlayer.zero_point.detach().cpu().double().reshape(-1).round().numpy()
    return scales, -zero.astype(np.int64)


def param_entries(qlayer: QuantLayer) -> list[dict[str, Any]]:
    if qlayer.group_size is not None:
        raise ExportError(f"group-wise grids (group_size={qlayer.group_size}) have no AIMET "
                          "legacy encoding: export them as ONNX (blocked DequantizeLinear) or "
                          "quantize per channel for AIMET")
    scales, offsets = _grid(qlayer)
    return legacy_entries(qlayer.bits, qlayer.symmetric, scales, offsets)


def act_entries(act: nn.Module) -> list[dict[str, Any]]:
    bits, signed, scale = act_qparams(act)
    offset = -(2 ** (bits - 1)) if signed else 0
    return legacy_entries(bits, signed, np.array([scale], np.float32), np.array([offset]))


def torch_encodings(qmodel: nn.Module, version: str = "1.0.0") -> dict[str, Any]:
    """Encodings keyed by module names, as `QuantizationSimModel.load_encodings` reads them."""
    params: dict[str, Any] = {}
    activations: dict[str, Any] = {}
    for name, qlayer in quant_layers(qmodel):
        params[f"{name}.weight"] = param_entries(qlayer)
        act = enabled_act_quant(qlayer)
        if act is not None:
            activations[name] = {"input": {"0": act_entries(act)}}
    return {"version": version, "activation_encodings": activations,
            "param_encodings": params, "excluded_layers": []}


def graph_encodings(qmodel: nn.Module, example_input: Tensor | tuple[Tensor, ...],
                    version: str = "1.0.0") -> dict[str, Any]:
    """Encodings of the float ONNX graph's tensors, in format 1.0.0 or 0.6.1."""
    legacy = encodings_dict(qmodel, example_input)
    by_name = {f"{n}.weight": q for n, q in quant_layers(qmodel)}
    for name in legacy["param_encodings"]:
        # the same grid with the min/max that AIMET reads back exactly
        qlayer = by_name.get(name)
        if qlayer is not None:
            legacy["param_encodings"][name] = param_entries(qlayer)
    if version == "0.6.1":
        return legacy
    return {
        "version": "1.0.0",
        "activation_encodings": [v1_entry(n, e) for n, e in
                                 legacy["activation_encodings"].items()],
        "param_encodings": [v1_entry(n, e) for n, e in legacy["param_encodings"].items()],
        "excluded_layers": [],
        "quantizer_args": legacy["quantizer_args"],
    }


def quantsim_config(qmodel: nn.Module) -> dict[str, Any]:
    """AIMET config placing quantizers as adaround does (layer inputs, no outputs)."""
    layers = [q for _, q in quant_layers(qmodel)]
    acts = [enabled_act_quant(q) is not None for q in layers]
    if any(acts) and not all(acts):
        log.warning("only %d of %d quantized layers quantize their input: the AIMET config "
                    "enables the input quantizer of every Conv/Gemm; load the encodings with "
                    "partial=False to drop those without an encoding", sum(acts), len(acts))
    config: dict[str, Any] = {
        "defaults": {
            "ops": {},
            "params": {"is_quantized": "True", "is_symmetric": str(layers[0].symmetric)},
            "strict_symmetric": "False",
            "unsigned_symmetric": "False",
            "per_channel_quantization": str(layers[0].axis is not None),
        },
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {},
        "supergroups": [],
        "model_input": {},
        "model_output": {},
    }
    if any(acts):
        config["op_type"] = {op: {"is_input_quantized": "True"}
                             for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def export_aimet(qmodel: nn.Module, example_input: Tensor | tuple[Tensor, ...],
                 directory: str | os.PathLike[str], prefix: str = "model",
                 encoding_version: str = "1.0.0") -> dict[str, Path]:
    """Write the AIMET hand-over files of `qmodel` into `directory`; returns them by kind.

    Example (the aimet-torch side is in docs/aimet.md):
        >>> adaround.export_aimet(qmodel, torch.randn(1, 3, 32, 32), "out")  # doctest: +SKIP
    """
    check_export(qmodel, example_input)
    check_path(directory, "directory")
    onnx = require_onnx()
    if encoding_version not in AIMET_VERSIONS:
        raise ExportError(f"encoding_version={encoding_version!r}: AIMET formats are "
                          f"{', '.join(AIMET_VERSIONS)}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ExportError(f"prefix={prefix!r} must be a plain file name stem, e.g. 'model'")
    model = copy.deepcopy(qmodel).eval()
    aimet_ready(model)
    out = Path(directory)
    paths = {
        "pth": out / f"{prefix}.pth",
        "onnx": out / f"{prefix}.onnx",
        "encodings": out / f"{prefix}.encodings",
        "torch_encodings": out / f"{prefix}_torch.encodings",
        "config": out / f"{prefix}_quantsim_config.json",
    }
    encodings = graph_encodings(model, example_input, encoding_version)
    state = aimet_state_dict(model)
    proto = build_onnx(model, example_input, qdq=False)
    atomic_write(paths["pth"], lambda tmp: torch.save(state, tmp))
    atomic_write(paths["onnx"], lambda tmp: onnx.save_model(proto, tmp))
    _write_json(paths["encodings"], encodings)
    _write_json(paths["torch_encodings"], torch_encodings(model, encoding_version))
    _write_json(paths["config"], quantsim_config(model))
    log.info("wrote AIMET files %s", ", ".join(str(p) for p in paths.values()))
    return paths
