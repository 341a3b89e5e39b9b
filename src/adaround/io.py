"""Save a quantized model as packed integer codes and load it back.

The file is one safetensors file: every QuantLayer's codes packed to its bit width (two 4-bit
codes per byte, see `adaround.export.bitpack`), scales, zero points, float biases and the other
float state; its JSON metadata header (key "adaround") holds the format version, the library
version, the full QuantConfig, the folded BatchNorms, each layer's bits/shape and a SHA-256 of
the tensor data, so a truncated or altered file is refused instead of loaded wrong. One file
is one atomic rename. Files of the previous format (a torch pickle, version 1) still load.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaround.api import META_ATTR
from adaround.calibration import model_device
from adaround.checkpoint import tensor_digest
from adaround.checks import check_model, check_path
from adaround.config import QuantConfig
from adaround.errors import SaveFileError
from adaround.leftovers import sweep, tagged
from adaround.nn.quant_layer import QuantLayer
from adaround.prepare import LayerPlan, apply_folds, swap_in_quant_layers

FORMAT = "adaround-quantized"
FORMAT_VERSION = 2
HEADER_KEY = "adaround"
_PIP = "pip install 'adaround[export]'"
_UMASK_LOCK = threading.Lock()


def _float_weight_keys(qmodel: nn.Module) -> set[str]:
    return {_key(n, "layer.weight") for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def _key(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


def _file_mode(target: Path) -> int:
    """The mode a new file would get from open(): 0666 less the umask; an existing file keeps
    its own (mkstemp's 0600 would otherwise end up on every output)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        pass
    with _UMASK_LOCK:  # reading the umask means setting it: keep that window private
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: never a half-written file at `path`.

    A symlink at `path` is written through (its target is replaced, the link stays); the file
    gets the mode open() would give it; `.tmp` files that killed runs left beside it go first.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    sweep(target.parent, prefix, ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=tagged(prefix), suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise SaveFileError(f"saving and loading need the safetensors package: {_PIP}") from exc
    return safetensors.torch


def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the quantized state of a `quantize` result: packed codes, scales, config.

    Example:
        >>> adaround.save(qmodel, "model.w4.safetensors")  # doctest: +SKIP
    """
    check_model(qmodel, "qmodel")
    check_path(path)
    meta = getattr(qmodel, META_ATTR, None)
    if meta is None:
        raise SaveFileError("this module was not produced by adaround.quantize: nothing to save")
    from adaround import __version__
    from adaround.export.bitpack import pack_codes

    skip = _float_weight_keys(qmodel)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()
               if k not in skip}
    layers = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLayer):
            key = _key(name, "codes")
            tensors[key] = pack_codes(module.codes, module.bits, module.symmetric)
            layers[name] = {"bits": module.bits, "signed": module.symmetric,
                            "shape": list(module.codes.shape)}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "library": __version__,
              "meta": meta, "layers": layers, "sha256": tensor_digest(tensors)}
    header["header_sha256"] = _header_digest(header)
    metadata = {HEADER_KEY: json.dumps(header)}
    st = _safetensors()
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=metadata))


def _check_version(path: Path, header: dict[str, Any]) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SaveFileError(f"{path} is not an adaround quantized-model file")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SaveFileError(
            f"{path} has format version {version}, newer than this library reads "
            f"({FORMAT_VERSION}): upgrade adaround"
        )


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the header without its own digest: the tensor checksum does not cover the
    header, whose bit flips would otherwise surface as a KeyError deep inside `load`."""
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _check_header(path: Path, header: dict[str, Any], packed: bool = True) -> None:
    """Refuse a header altered after saving (digest, where the file has one: older files
    do not) or missing what `load` reads."""
    corrupted = (f"{path} is corrupted (its header was altered after saving): save or copy "
                 "it again")
    if "header_sha256" in header and header["header_sha256"] != _header_digest(header):
        raise SaveFileError(corrupted)
    meta = header.get("meta")
    layers = header.get("layers") if packed else {}
    ok = (isinstance(meta, dict) and isinstance(layers, dict)
          and isinstance(meta.get("config"), dict) and isinstance(meta.get("folded"), dict)
          and isinstance(meta.get("layers"), dict)
          and all(isinstance(i, dict) and {"bits", "signed", "shape"} <= set(i)
                  for i in layers.values()))
    if not ok:
        raise SaveFileError(corrupted)


def _read_packed(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from adaround.export.bitpack import unpack_codes  # export/ imports this module

    st = _safetensors()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = st.load_file(str(path))
        header = json.loads(metadata[HEADER_KEY])
    except Exception as exc:
        raise SaveFileError(f"{path} is not a readable adaround file ({exc}); it may be "
                            "truncated or corrupted: save it again") from exc
    _check_version(path, header)
    _check_header(path, header)
    if header.get("sha256") != tensor_digest(tensors):
        raise SaveFileError(f"{path} is corrupted (its data does not match the checksum in "
                            "its header): save or copy it again")
    for name, info in header["layers"].items():
        key = _key(name, "codes")
        try:
            count = int(torch.Size(info["shape"]).numel())
            codes = unpack_codes(tensors[key], count, info["bits"], info["signed"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise SaveFileError(f"{path}: the codes of layer {name!r} cannot be unpacked "
                                f"({exc}): save the model again") from exc
        tensors[key] = codes.reshape(info["shape"])
    return header, tensors


def _read_legacy(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Format version 1: a torch pickle of {format, format_version, meta, state}."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SaveFileError(f"{path} is not a readable adaround file ({exc})") from exc
    _check_version(path, payload)
    _check_header(path, payload, packed=False)
    if not isinstance(payload.get("state"), dict):
        raise SaveFileError(f"{path} is corrupted (no state): save it again")
    return payload, payload["state"]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model file at {path}")
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[:4] == b"PK\x03\x04":  # a torch zip archive: the version-1 format
        return _read_legacy(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_packed(path)
    raise SaveFileError(f"{path} is not a readable adaround file (neither safetensors nor a "
                        "torch file): pass a file written by adaround.save")


def load(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at `path` on top of `model` (the FP architecture).

    Example:
        >>> qmodel = adaround.load("model.w4.safetensors", resnet20())  # doctest: +SKIP
    """
    check_model(model)
    header, state = _read(check_path(path))
    meta = header["meta"]
    try:
        cfg = QuantConfig.from_dict(meta["config"])
    except (TypeError, KeyError) as exc:
        raise SaveFileError(f"{path} holds an unreadable config ({exc}): save it again") from exc
    qmodel = copy.deepcopy(model).eval()
    try:
        apply_folds(qmodel, meta["folded"])
        plans = [LayerPlan(name, bits, None) for name, bits in meta["layers"].items()]
        qmodel = swap_in_quant_layers(qmodel, plans, cfg, fit=False)
        if meta.get("act_quant"):  # input quantizers: bits/sign here, scales in the state
            from adaround.nn.act_quant import attach_act_quants

            attach_act_quants(qmodel, meta["act_quant"])
    except (AttributeError, TypeError, RuntimeError, KeyError, IndexError) as exc:
        raise SaveFileError(
            f"{path} does not match this model's architecture ({exc}): pass the model it was "
            "quantized from"
        ) from exc
    device = model_device(model)
    state = {k: v.to(device) for k, v in state.items()}
    own = qmodel.state_dict()
    expected = set(own) - _float_weight_keys(qmodel)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    mismatched = [k for k, v in state.items() if k in expected and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise SaveFileError(
            f"{path} does not match this model's architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}): pass the model it "
            "was quantized from"
        )
    # the modules' state-dict versions (some check theirs in _load_from_state_dict, e.g.
    # torchvision's MNASNet) come from the model itself: the file holds tensors only
    state = collections.OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    qmodel.load_state_dict(state, strict=False)
    for module in qmodel.modules():
        if isinstance(module, QuantLayer):
            module.mode = "quantized"
    setattr(qmodel, META_ATTR, meta)
    return qmodel
