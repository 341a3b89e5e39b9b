"""compressed-tensors checkpoints (`save_compressed`): transformers' own `from_pretrained`
loads them offline and computes what the simulated model computes. Tiny models from configs;
skipped where transformers or compressed-tensors is absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import adaround
from adaround import QuantConfig
from adaround.hf import HFOptions, quantize_hf, save_compressed

transformers = pytest.importorskip("transformers")
from tiny_hf import tiny_bert, tiny_llama  # noqa: E402


def _batch(n: int = 8, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("cfg", [
    dict(weight_bits=4, per_channel=True),
    dict(weight_bits=4, group_size=16),
    dict(weight_bits=8, per_channel=True),
    dict(weight_bits=4, per_channel=True, symmetric=False),
    dict(weight_bits=3, group_size=16, symmetric=False),
])
def test_from_pretrained_loads_the_simulated_model(tmp_path: Path, cfg: dict) -> None:
    pytest.importorskip("compressed_tensors")
    qmodel = quantize_hf(tiny_bert(), _batch(), QuantConfig(iters=20, **cfg))
    save_compressed(qmodel, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    (group,) = quant["config_groups"].values()
    assert len(group["targets"]) == 12 and group["weights"]["num_bits"] == cfg["weight_bits"]
    assert group["weights"]["strategy"] == ("group" if "group_size" in cfg else "channel")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    batch = _batch(5, 12, seed=3)
    with torch.no_grad():
        ours = qmodel(**batch).last_hidden_state
        theirs = loaded.eval()(**batch).last_hidden_state
    assert torch.equal(theirs, ours)


def test_packed_int4_is_an_eighth_of_float_and_codes_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file

    qmodel = quantize_hf(tiny_bert(), _batch(), QuantConfig(iters=20, per_channel=True))
    state = load_file(save_compressed(qmodel, tmp_path / "c") / "model.safetensors")
    query = qmodel.get_submodule("encoder.layer.0.attention.self.query")
    packed = state["encoder.layer.0.attention.self.query.weight_packed"]
    assert packed.dtype == torch.int32 and packed.numel() == query.codes.numel() // 8
    assert "encoder.layer.0.attention.self.query.weight" not in state
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    codes = unpack_from_int32(packed, 4, query.codes.shape)
    assert torch.equal(codes, query.codes)


def test_llama_with_tied_head_and_quantized_lm_head(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    qmodel = quantize_hf(tiny_llama(tie_word_embeddings=True), _batch(),
                         QuantConfig(iters=20, per_channel=True),
                         HFOptions(head=False))
    save_compressed(qmodel, tmp_path / "llama")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama",
                                                               local_files_only=True).eval()
    batch = _batch(4, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, qmodel(**batch).logits)


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qmodel = quantize_hf(tiny_bert(), _batch(), QuantConfig(iters=5, per_channel=True))
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors.pack_quantized.helpers",
                        None)
    with pytest.raises(adaround.ExportError, match="adaround\\[compressed\\]"):
        save_compressed(qmodel, tmp_path / "x")
    monkeypatch.undo()
    plain = adaround.quantize(nn.Sequential(nn.Linear(4, 4)), torch.randn(8, 4),
                              QuantConfig(rounding="nearest"))
    with pytest.raises(adaround.ExportError, match="Hugging Face models"):
        save_compressed(plain, tmp_path / "y")


def test_cli_writes_the_checkpoint_beside_the_packed_file(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from adaround.cli import main

    words = "the a cat dog sat on mat ran far away big small red blue".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                   "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model = tiny_bert()
    model.save_pretrained(tmp_path / "fp")
    tokenizer.save_pretrained(tmp_path / "fp")
    (tmp_path / "calib.txt").write_text("the cat sat on the mat\na big red dog ran far away\n")
    code = main(["-q", "quantize", "--hf-model", str(tmp_path / "fp"), "--calib-text",
                 str(tmp_path / "calib.txt"), "--iters", "10", "--lr", "0.3", "--per-channel",
                 "-o", str(tmp_path / "q.safetensors"), "--hf-compressed",
                 str(tmp_path / "ct")])
    assert code == 0
    qmodel = adaround.load(tmp_path / "q.safetensors",
                           transformers.AutoModel.from_pretrained(tmp_path / "fp"))
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "ct", local_files_only=True)
    batch = tokenizer(["the big cat", "a dog sat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).last_hidden_state,
                           qmodel(**batch).last_hidden_state)
