"""The loading code of docs/onnxruntime.md, docs/huggingface.md and docs/aimet.md's export
block, run as written there (python blocks in order) on tiny models, against the simulated
model. (docs/aimet.md's aimet-torch block is run by bench/aimet_consume.py in the aimet venv.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import images, tiny_resnet

import adaround
from adaround import QuantConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
pytest.importorskip("onnx", reason="install adaround[export] (onnx)")
ort = pytest.importorskip("onnxruntime", reason="install adaround[export] (onnxruntime)")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def run(block: str, scope: dict) -> dict:
    exec(compile(block, "doc", "exec"), scope)  # noqa: S102
    return scope


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tiny_bert_and_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    words = "the a cat dog sat on mat ran far away big small red blue sentence any".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    return transformers.BertModel(config).eval(), tokenizer


SENTENCES = ["the cat sat on the mat", "a big red dog ran far away", "a sentence"]


def test_onnxruntime_page_convolutional_network(in_tmp: Path) -> None:
    export, _, load, scaled = python_blocks("onnxruntime.md")
    x = images(4, seed=2)
    qmodel = adaround.quantize(tiny_resnet(), images(32), QuantConfig(rounding="nearest"))
    with torch.no_grad():
        ref = qmodel(x).numpy()
    scope = run(export, {"qmodel": qmodel, "x": x})
    scope["inputs"] = {"input": x}
    np.testing.assert_allclose(run(load, scope)["outputs"][0], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(scaled, scope)["outputs"][0], ref, atol=1e-5, rtol=0)


def test_onnxruntime_page_hugging_face_model(in_tmp: Path) -> None:
    from adaround.hf import quantize_hf

    _, export, load, _ = python_blocks("onnxruntime.md")
    model, tokenizer = _tiny_bert_and_tokenizer(in_tmp)
    qmodel = quantize_hf(model, SENTENCES * 4, QuantConfig(iters=10, lr=0.3, group_size=16),
                         tokenizer=tokenizer)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = qmodel(**inputs).last_hidden_state.numpy()
    scope = run(export, {"qmodel": qmodel, "tokenizer": tokenizer, "adaround": adaround})
    scope["inputs"] = inputs
    np.testing.assert_allclose(run(load, scope)["outputs"][0], ref, atol=1e-4, rtol=0)


def test_huggingface_page(in_tmp: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from adaround.hf import quantize_hf

    save, load = python_blocks("huggingface.md")
    model, tokenizer = _tiny_bert_and_tokenizer(in_tmp)
    qmodel = quantize_hf(model, SENTENCES * 4, QuantConfig(iters=10, lr=0.3, per_channel=True),
                         tokenizer=tokenizer)
    run(save, {"qmodel": qmodel, "tokenizer": tokenizer})
    assert (in_tmp / "model_w4" / "tokenizer_config.json").exists()
    scope = run(load.replace('["a sentence"]', "SENTENCES, padding=True"),
                {"SENTENCES": SENTENCES})
    with torch.no_grad():
        ref = qmodel(**tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert torch.equal(scope["outputs"].last_hidden_state, ref.last_hidden_state)


def test_aimet_page_export_block(in_tmp: Path) -> None:
    export = python_blocks("aimet.md")[0]
    qmodel = adaround.quantize(tiny_resnet(), images(32), QuantConfig(rounding="nearest"))
    scope = run(export, {"qmodel": qmodel, "x": images(4)})
    assert set(scope["paths"]) == {"pth", "onnx", "encodings", "torch_encodings", "config"}
    assert all(p.exists() for p in scope["paths"].values())
