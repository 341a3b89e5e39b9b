"""The packed weight file: bit packing, save/load round trips, refused files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import images, sequences, tiny_mixed, tiny_resnet
from torch import nn

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.export.bitpack import pack_codes, packed_size, unpack_codes
from adaround.primitives import int_range

NEAREST = dict(rounding="nearest")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_every_bit_width(bits: int, signed: bool) -> None:
    qmin, qmax = int_range(bits, signed)
    g = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 1001):
        codes = torch.randint(qmin, qmax + 1, (count,), generator=g)
        codes = codes.to(torch.int8 if signed else torch.uint8)
        codes[0] = qmin
        codes[-1] = qmax
        packed = pack_codes(codes, bits, signed)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
        assert torch.equal(unpack_codes(packed, count, bits, signed), codes)


def test_packing_layout_is_lsb_first() -> None:
    four = pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4, signed=False)
    assert four.tolist() == [0x21, 0x03]  # two codes per byte, the first in the low nibble
    signed = pack_codes(torch.tensor([-8, 7], dtype=torch.int8), 4, signed=True)
    assert signed.tolist() == [0xF0]  # stored as code - qmin: 0 and 15
    two = pack_codes(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2, signed=False)
    assert two.tolist() == [0b11100100]
    assert packed_size(8, 3) == 3


def test_pack_refuses_codes_outside_the_grid() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        pack_codes(torch.tensor([8], dtype=torch.int8), 4, signed=True)
    with pytest.raises(ValueError, match="bytes cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 8, 4, signed=False)


def _quantized(bits: int = 4, **cfg: object) -> nn.Module:
    return adaround.quantize(tiny_resnet(), images(32), QuantConfig(weight_bits=bits, **NEAREST,
                                                                    **cfg))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_identical_outputs_and_packed_codes(tmp_path: Path, bits: int) -> None:
    qmodel = _quantized(bits, per_channel=True)
    path = tmp_path / "q.safetensors"
    adaround.save(qmodel, path)
    loaded = adaround.load(path, tiny_resnet())
    x = images(8, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["adaround"])
        stem = fh.get_tensor("stem.codes")
    assert stem.numel() == packed_size(qmodel.stem.codes.numel(), bits)
    assert header["library"] == adaround.__version__ and header["format_version"] == 2
    assert header["meta"]["config"] == QuantConfig(weight_bits=bits, per_channel=True,
                                                   **NEAREST).to_dict()
    assert header["layers"]["stem"] == {"bits": bits, "signed": True, "shape": [8, 3, 3, 3]}


def test_round_trip_asymmetric_other_layer_types_and_single_layer(tmp_path: Path) -> None:
    cfg = QuantConfig(weight_bits=3, symmetric=False, per_channel=True, **NEAREST)
    qmodel = adaround.quantize(tiny_mixed(), sequences(32), cfg)
    adaround.save(qmodel, tmp_path / "m.st")
    loaded = adaround.load(tmp_path / "m.st", tiny_mixed())
    x = sequences(8, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert loaded.up.codes.dtype == torch.uint8 and torch.equal(loaded.up.codes, qmodel.up.codes)
    torch.manual_seed(0)
    fc = nn.Linear(5, 3)
    qfc = adaround.quantize(fc, torch.randn(16, 5), QuantConfig(weight_bits=4, **NEAREST))
    adaround.save(qfc, tmp_path / "fc.st")
    loaded_fc = adaround.load(tmp_path / "fc.st", fc)
    assert isinstance(loaded_fc, QuantLayer) and torch.equal(loaded_fc.codes, qfc.codes)


def _rewrite_header(src: Path, dst: Path, **changes: object) -> None:
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as fh:
        header = json.loads(fh.metadata()["adaround"])
    header.update(changes)
    save_file(tensors, str(dst), metadata={"adaround": json.dumps(header)})


def test_refuses_newer_format_other_architecture_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "q.st"
    adaround.save(_quantized(), path)
    _rewrite_header(path, tmp_path / "new.st", format_version=3)
    with pytest.raises(adaround.SaveFileError, match="newer than this library.*upgrade adaround"):
        adaround.load(tmp_path / "new.st", tiny_resnet())
    with pytest.raises(adaround.SaveFileError, match="architecture"):
        adaround.load(path, tiny_mixed())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.st"), metadata={"x": "1"})
    with pytest.raises(adaround.SaveFileError, match="not a readable"):
        adaround.load(tmp_path / "other.st", tiny_resnet())
    _rewrite_header(path, tmp_path / "foreign.st", format="something-else")
    with pytest.raises(adaround.SaveFileError, match="not an adaround"):
        adaround.load(tmp_path / "foreign.st", tiny_resnet())


def test_refuses_corrupted_and_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "q.st"
    adaround.save(_quantized(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the tensor data
    (tmp_path / "flipped.st").write_bytes(bytes(data))
    with pytest.raises(adaround.SaveFileError, match="corrupted.*checksum"):
        adaround.load(tmp_path / "flipped.st", tiny_resnet())
    (tmp_path / "cut.st").write_bytes(path.read_bytes()[:-50])
    with pytest.raises(adaround.SaveFileError, match="not a readable.*truncated"):
        adaround.load(tmp_path / "cut.st", tiny_resnet())
    (tmp_path / "empty.st").write_bytes(b"")
    with pytest.raises(adaround.SaveFileError, match="not a readable"):
        adaround.load(tmp_path / "empty.st", tiny_resnet())


def test_loads_files_of_the_previous_torch_format(tmp_path: Path) -> None:
    qmodel = _quantized()
    skip = {f"{n}.layer.weight" for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    state = {k: v for k, v in qmodel.state_dict().items() if k not in skip}
    torch.save({"format": "adaround-quantized", "format_version": 1, "library": "0.1.0",
                "meta": qmodel.adaround_meta, "state": state}, tmp_path / "old.pt")
    loaded = adaround.load(tmp_path / "old.pt", tiny_resnet())
    with torch.no_grad():
        assert torch.equal(loaded(images(4)), qmodel(images(4)))


def test_packed_w4_file_is_about_an_eighth_of_the_float_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3)).eval()
    qmodel = adaround.quantize(model, torch.randn(8, 16, 9, 9), QuantConfig(**NEAREST))
    torch.save(model.state_dict(), tmp_path / "fp.pt")
    adaround.save(qmodel, tmp_path / "q.st")
    ratio = (tmp_path / "q.st").stat().st_size / (tmp_path / "fp.pt").stat().st_size
    assert ratio < 1 / 7


def test_round_trip_keeps_activation_quantizers(tmp_path: Path) -> None:
    from tiny_models import attach_act_quant

    from adaround.nn.act_quant import act_quant_spec

    qmodel = _quantized()
    attach_act_quant(qmodel.block.conv2, 8, False, scale=0.05)
    attach_act_quant(qmodel.fc, 4, True, scale=0.2)
    qmodel.adaround_meta["act_quant"] = act_quant_spec(qmodel)
    adaround.save(qmodel, tmp_path / "a.st")
    loaded = adaround.load(tmp_path / "a.st", tiny_resnet())
    assert loaded.fc.act_quant.bits == 4 and loaded.fc.act_quant.signed
    assert float(loaded.block.conv2.act_quant.scale) == pytest.approx(0.05)
    x = images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_configs_round_trip_through_their_dict() -> None:
    for cfg in (QuantConfig(), QuantConfig(weight_bits=3, per_channel=True, rounding="nearest"),
                QuantConfig(act_bits=8)):
        assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
