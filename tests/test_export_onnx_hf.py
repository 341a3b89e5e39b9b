"""ONNX export of MatMul/Gemm-based models and Hugging Face transformers, run by onnxruntime
against the simulated model; IR version 10."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import adaround
from adaround import QuantConfig
from adaround.export import build_onnx, exact_session_options

onnx = pytest.importorskip("onnx", reason="install adaround[export] (onnx)")
ort = pytest.importorskip("onnxruntime", reason="install adaround[export] (onnxruntime)")
ATOL = 1e-5


class TwoLinear(nn.Module):
    """Linear on [N, T, C] (exported as MatMul + Add) and on [N, C] (as Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 96), nn.Linear(96, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.nn.functional.gelu(self.a(x)))
        return self.c(y.mean(dim=1))


def _two_linear() -> nn.Module:
    torch.manual_seed(0)
    return TwoLinear().eval()


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, 64, generator=torch.Generator().manual_seed(seed)) * 2


def _session(proto: object, options: object = None) -> object:
    return ort.InferenceSession(proto.SerializeToString(), options,  # type: ignore[attr-defined]
                                providers=["CPUExecutionProvider"])


def _ops(proto: object) -> set[str]:
    return {n.op_type for n in proto.graph.node}  # type: ignore[attr-defined]


def test_files_declare_ir_version_10_for_opset_21() -> None:
    qmodel = adaround.quantize(_two_linear(), _x(16), QuantConfig(rounding="nearest"))
    for qdq in (True, False):
        proto = build_onnx(qmodel, _x(1), qdq=qdq)
        assert proto.ir_version == 10
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {21}
        onnx.checker.check_model(proto, full_check=True)


GRIDS = [dict(weight_bits=4, per_channel=True), dict(weight_bits=8, symmetric=False),
         dict(weight_bits=4, group_size=16)]


@pytest.mark.parametrize("cfg", GRIDS)
def test_matmul_and_gemm_weights_compute_as_simulated(cfg: dict) -> None:
    qmodel = adaround.quantize(_two_linear(), _x(32), QuantConfig(rounding="nearest", **cfg))
    x = _x(6, seed=2)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    proto = build_onnx(qmodel, _x(1))
    assert {"MatMul", "Gemm"} <= _ops(proto)
    # QDQ form with the stated session options: MatMulNBits computes in float32
    out = _session(proto, exact_session_options()).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    if cfg.get("group_size"):
        with pytest.raises(adaround.ExportError, match="groups of 16"):
            build_onnx(qmodel, _x(1), weight_form="scaled")
        return
    # the scaled form runs in onnxruntime's default session as simulated
    scaled = build_onnx(qmodel, _x(1), weight_form="scaled")
    assert "Mul" in _ops(scaled)
    out = _session(scaled).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_default_session_quantizes_matmul_activations_of_the_qdq_form() -> None:
    """Why the options are needed: onnxruntime's MatMulNBits fusion at its default accuracy
    level quantizes activations to int8, an error far above float32 rounding."""
    qmodel = adaround.quantize(_two_linear(), _x(32),
                               QuantConfig(rounding="nearest", weight_bits=4, per_channel=True))
    x = _x(6, seed=2)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    out = _session(build_onnx(qmodel, _x(1))).run(None, {"input": x.numpy()})[0]
    exact = _session(build_onnx(qmodel, _x(1)), exact_session_options()).run(
        None, {"input": x.numpy()})[0]
    assert np.abs(out - ref).max() > 100 * np.abs(exact - ref).max()


# -- Hugging Face -------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from tiny_hf import padded_batch, tiny_bert  # noqa: E402


@pytest.mark.parametrize("cfg", [dict(weight_bits=4, per_channel=True),
                                 dict(weight_bits=4, group_size=16)])
def test_hugging_face_model_exports_with_named_dynamic_inputs(cfg: dict) -> None:
    from adaround.hf import quantize_hf

    qmodel = quantize_hf(tiny_bert(), padded_batch(16, 10), QuantConfig(iters=20, **cfg))
    proto = build_onnx(qmodel, padded_batch(2, 7))  # exported at batch 2, length 7
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "pooler_output"]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    batch = padded_batch(5, 12, seed=3)  # run at batch 5, length 12, with padding
    with torch.no_grad():
        ref = qmodel(**batch)
    out = _session(proto, exact_session_options()).run(
        None, {k: v.numpy() for k, v in batch.items()})
    np.testing.assert_allclose(out[0], ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[1], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_causal_lm_exports_its_logits_without_the_cache() -> None:
    from adaround.hf import quantize_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    batch = padded_batch(8, 10)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # no left padding
    qmodel = quantize_hf(model, batch, QuantConfig(iters=20, per_channel=True))
    proto = build_onnx(qmodel, {k: v[:2, :7] for k, v in batch.items()})
    assert [o.name for o in proto.graph.output] == ["logits"]
    with torch.no_grad():
        ref = qmodel(**batch).logits.numpy()
    out = _session(proto, exact_session_options()).run(
        None, {k: v.numpy() for k, v in batch.items()})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
