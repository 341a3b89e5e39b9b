"""The on-paper plan: time and memory to quantize a 7B and a 70B Llama-architecture model with
`quantize_hf` (quadratic loss) on 1, 8 and 64 GPUs, from costs measured here on the CPU.

    OMP_NUM_THREADS=2 python bench/llama_plan.py --threads 2 --json bench/results/llama_plan.json

Measured (this machine, CPU, float32):
  1. the dense matmul rate (torch.mm, 2048^3): the machine's ceiling;
  2. one Llama decoder block at a reduced width (hidden 1024, MLP 2752, 4096 tokens) through
     `quantize_hf`, per layer: data seconds (the layer's input rows from runs of the block,
     the moments) and seconds per quadratic step, against their flop counts;
  3. three layers at the real 7B width (q_proj 4096 x 4096, gate_proj 4096 -> 11008,
     down_proj 11008 -> 4096): the moments over 2048 tokens (`accumulate_moments`) and a few
     quadratic steps (`run_rounding`), against their flop counts.
  From 2 and 3: the share of the matmul rate the library's moments and steps reach.

Assumed (stated in the output, `ASSUMED`): an H200's rates and bandwidths, and that the
library reaches on it the share of the peak written there (not measured: no GPU was lent).
The plan multiplies the flop and byte counts of each stage by those rates; the CPU
measurement shows that the counts are the work (the library runs at a steady share of the
matmul rate at 7B width) and gives the per-step elementwise share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

ASSUMED = {  # H200 SXM; peaks from NVIDIA's data sheet, shares are assumptions
    "tf32_dense_tflops": 494.7, "fp32_tflops": 67.0, "hbm_tb_s": 4.8,
    "step_matmul_share": 0.5,  # of the TF32 dense peak: the steps' [C_out, d] x [d, d] (TF32 on)
    "fp32_share": 0.6,  # of the FP32 peak: moments and forward passes (float32, no TF32)
    "hbm_share": 0.7,  # of HBM bandwidth: the elementwise part of a step
    "step_bytes_per_weight": 100,  # read+written per weight per step: V, Adam m/v, grad, ...
    "step_overhead_ms": 0.1,  # per step: ~15 kernel launches and the early-stop check
    "nvlink_busbw_gb_s": 350, "ib_busbw_gb_s": 40,  # all-reduce bus bandwidth per GPU
    "gpus_per_node": 8, "gpu_memory_gb": 141,
}
MODELS = {  # hidden, MLP, blocks, k/v output width (grouped-query attention), parameters
    "llama-7b": {"hidden": 4096, "mlp": 11008, "blocks": 32, "kv": 4096, "params": 6.74e9},
    "llama-70b": {"hidden": 8192, "mlp": 28672, "blocks": 80, "kv": 1024, "params": 69.0e9},
}


def layers(m: dict) -> list[tuple[str, int, int]]:
    """(name, C_out, d) of a block's Linear layers, in execution order."""
    h, f, kv = m["hidden"], m["mlp"], m["kv"]
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h), ("gate", f, h),
            ("up", f, h), ("down", h, f)]


def step_flops(c_out: int, d: int) -> float:
    return 2.0 * c_out * d * d  # [C_out, d] x [d, d]


def moment_flops(c_out: int, d: int, tokens: int) -> float:
    return tokens * (2.0 * d * d + 4.0 * c_out * d)  # U U^T, then w.e and (w.e) U^T


def matmul_rate(threads: int) -> float:
    """GFLOP/s of a float32 2048^3 torch.mm, best of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def measure_block(hidden: int, mlp: int, tokens: int, iters: int) -> list[dict]:
    """One decoder block of a random Llama through quantize_hf: per layer, seconds of data and
    of steps, and their flops."""
    import transformers

    import adaround
    from adaround.hf import HFOptions, quantize_hf

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, num_hidden_layers=1, intermediate_size=mlp,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=256)).eval()
    seq = 128
    ids = torch.randint(0, 256, (tokens // seq, seq), generator=torch.Generator().manual_seed(1))
    cfg = adaround.QuantConfig(weight_bits=4, per_channel=True, loss="quadratic", iters=iters,
                               lr=0.01, early_stop=False)
    qmodel = quantize_hf(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cfg,
                         HFOptions(forward_batch=8))
    rows = []
    for r in qmodel.adaround_report:
        c_out, d = qmodel.get_submodule(r.name).layer.weight.shape
        rows.append({"layer": r.name, "c_out": c_out, "d": d, "tokens": tokens,
                     "data_s": round(r.data_seconds, 3),
                     "step_ms": round(1000 * r.step_seconds / r.iters, 3),
                     "step_gflop_s": round(step_flops(c_out, d) * r.iters / r.step_seconds / 1e9,
                                           1)})
    return rows


def measure_layer(name: str, c_out: int, d: int, tokens: int, steps: int) -> dict:
    """One Linear of the real width: the moments over `tokens` tokens and `steps` steps."""
    import adaround
    from adaround.nn.quant_layer import QuantLayer
    from adaround.reconstruct.loop import Objective, QuadraticLoss, run_rounding
    from adaround.reconstruct.quadratic import accumulate_moments

    torch.manual_seed(0)
    layer = nn.Linear(d, c_out, bias=False)
    qlayer = QuantLayer(layer, 4, True, True)
    qlayer.fit_grid("minmax")
    x = torch.randn(tokens, d)
    xq = x + 0.01 * torch.randn(tokens, d)
    t = time.perf_counter()
    moments = accumulate_moments(layer, [(xq, x)])
    moment_s = time.perf_counter() - t
    cfg = adaround.QuantConfig(weight_bits=4, per_channel=True, iters=steps, lr=0.01,
                               early_stop=False)
    run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)),  # one warm-up step
                 dataclasses.replace(cfg, iters=1))
    t = time.perf_counter()
    run_rounding(qlayer, Objective(QuadraticLoss(qlayer, moments)), cfg)
    step_s = (time.perf_counter() - t) / steps
    return {"layer": name, "c_out": c_out, "d": d, "tokens": tokens, "moment_s": round(moment_s, 2),
            "moment_gflop_s": round(moment_flops(c_out, d, tokens) / moment_s / 1e9, 1),
            "step_s": round(step_s, 3),
            "step_gflop_s": round(step_flops(c_out, d) / step_s / 1e9, 1), "steps": steps}


def allreduce_s(nbytes: float, gpus: int) -> float:
    if gpus == 1:
        return 0.0
    bw = ASSUMED["nvlink_busbw_gb_s"] if gpus <= ASSUMED["gpus_per_node"] else ASSUMED[
        "ib_busbw_gb_s"]
    return 2 * (gpus - 1) / gpus * nbytes / (bw * 1e9)


def plan(name: str, gpus: int, tokens: int, iters: int, seq: int) -> dict:
    """Seconds and per-GPU memory of each stage, for the whole model."""
    m = MODELS[name]
    a = ASSUMED
    r_step = a["tf32_dense_tflops"] * a["step_matmul_share"] * 1e12
    r_fp32 = a["fp32_tflops"] * a["fp32_share"] * 1e12
    hbm = a["hbm_tb_s"] * a["hbm_share"] * 1e12
    steps = moments = forward = comm = overhead = 0.0
    block_params = sum(c * d for _, c, d in layers(m))
    attention = 2.0 * tokens * seq * m["hidden"]  # causal QK^T and AV
    prefix = 0.0  # forward flops of the block before each layer: its input capture runs them
    captures = 0.0
    for lname, c_out, d in layers(m):
        if lname == "o":
            prefix += attention
        captures += 2 * prefix  # both streams, each layer's input from a run of the block
        prefix += 2.0 * tokens * c_out * d
        rows = -(-c_out // gpus)  # the rows one GPU steps
        steps += iters * (step_flops(rows, d) / r_step
                          + a["step_bytes_per_weight"] * rows * d / hbm)
        overhead += iters * a["step_overhead_ms"] / 1000
        moments += moment_flops(c_out, d, tokens) / gpus / r_fp32
        comm += allreduce_s(8.0 * (d * d + c_out * d), gpus)  # float64 moment sums
        comm += allreduce_s(4.0 * c_out * d, gpus)  # the codes, gathered
    forward = (captures + 2 * (2.0 * tokens * block_params + attention)) / gpus / r_fp32
    per_block = {"steps": steps, "step_overhead": overhead, "moments": moments,
                 "forward": forward, "communication": comm}
    total = {k: v * m["blocks"] for k, v in per_block.items()}
    h, f = m["hidden"], m["mlp"]
    local = tokens / gpus
    widest = max(2 * d + c for _, c, d in layers(m))
    memory = {  # GB per GPU at the peak of a block
        "cached_block_inputs": 4 * local * h * 4 / 1e9,  # FP, quantized, and their next
        "layer_rows": local * widest * 4 / 1e9,  # x^, x and the target of the widest layer
        "moments": max(12.0 * d * d + 12.0 * c * d for _, c, d in layers(m)) / 1e9,
        "rounding_state": max(10 * 4.0 * -(-c // gpus) * d for _, c, d in layers(m)) / 1e9,
        "block_fp32": 4.0 * block_params / 1e9,
    }
    limit = max(total, key=lambda k: total[k])
    return {"model": name, "gpus": gpus, "tokens": tokens, "iters": iters,
            "hours": round(sum(total.values()) / 3600, 2),
            "seconds": {k: round(v) for k, v in total.items()}, "limited_by": limit,
            "memory_gb": {k: round(v, 1) for k, v in memory.items()},
            "memory_total_gb": round(sum(memory.values()), 1),
            "host_model_copy_gb_per_process": round(2 * m["params"] / 1e9),
            "mlp_width": f}


def table(plans: list[dict]) -> str:
    lines = ["| model | GPUs | hours | steps | step overhead | moments | forward | comm. | "
             "limited by | GPU memory (GB) |", "|" + "---|" * 10]
    for p in plans:
        s = p["seconds"]
        lines.append(f"| {p['model']} | {p['gpus']} | {p['hours']} | {s['steps']} s | "
                     f"{s['step_overhead']} s | {s['moments']} s | {s['forward']} s | "
                     f"{s['communication']} s | {p['limited_by']} | {p['memory_total_gb']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block-hidden", type=int, default=1024)
    p.add_argument("--block-mlp", type=int, default=2752)
    p.add_argument("--block-tokens", type=int, default=4096)
    p.add_argument("--block-iters", type=int, default=50)
    p.add_argument("--layer-tokens", type=int, default=2048)
    p.add_argument("--layer-steps", type=int, default=3)
    p.add_argument("--no-7b-layers", action="store_true")
    p.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (plan)")
    p.add_argument("--iters", type=int, default=10000, help="steps per layer (plan)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"command": " ".join(sys.argv), "machine": platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__,
                    "uptime_before": subprocess.run(["uptime"], capture_output=True,
                                                    text=True).stdout.strip(),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                             capture_output=True, text=True).stdout.strip()}
    result["matmul_gflop_s"] = round(matmul_rate(args.threads), 1)
    print(json.dumps({"matmul_gflop_s": result["matmul_gflop_s"]}), flush=True)
    result["block"] = measure_block(args.block_hidden, args.block_mlp, args.block_tokens,
                                    args.block_iters)
    for row in result["block"]:
        print(json.dumps(row), flush=True)
    result["layers_7b"] = []
    if not args.no_7b_layers:
        for name, c_out, d in [("q_proj", 4096, 4096), ("gate_proj", 11008, 4096),
                               ("down_proj", 4096, 11008)]:
            result["layers_7b"].append(measure_layer(name, c_out, d, args.layer_tokens,
                                                     args.layer_steps))
            print(json.dumps(result["layers_7b"][-1]), flush=True)
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True,
                                            text=True).stdout.strip()
    result["assumed"] = ASSUMED
    result["plan"] = [plan(m, g, args.tokens, args.iters, 2048) for m in MODELS
                      for g in (1, 8, 64)]
    print(table(result["plan"]))
    for row in result["plan"]:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
