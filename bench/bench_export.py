"""Export benchmark: file sizes, onnxruntime accuracy against the simulated model, latency.

For one network: quantize with AdaRound (or load a saved result), write the packed file, the
QDQ ONNX file, the encodings JSON and the FP32 ONNX file; compare top-1 of the simulated
(PyTorch) model with onnxruntime's on the benchmark set, the largest logit difference, and
onnxruntime CPU latency (one thread, batch 1 and 32) of FP32 against QDQ. Appends one JSON
line per run to --json and prints a markdown row.

    python bench/bench_export.py --model resnet20 --bits 4 --grid tensor --iters 200 \
        --threads 1 --json bench/results/export.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import adaround
from adaround.allocator import keep_freed_memory
from adaround.evaluate import accuracy
from adaround.export.graph import export_float_graph

sys.path.insert(0, str(Path(__file__).parent))
from bench_weights import load_cifar, load_effnet  # noqa: E402

log = logging.getLogger("bench")
EXACT = ["WeightBiasQuantization"]  # onnxruntime's int32 rounding of biases (test_export_onnx)
FOLD = "session.disable_quant_qdq"  # no QDQ kernels: weight DequantizeLinear folded at load


def session(path: Path, threads: int, disabled: list[str] | None = None,  # type: ignore[no-untyped-def]
            fold: bool = False):
    """An onnxruntime CPU session; `fold` dequantizes the weights once, at load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if fold:
        options.add_session_config_entry(FOLD, "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled or [])


def ort_logits(sess, x: torch.Tensor, batch: int = 100) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([sess.run(None, {"input": x[i:i + batch].numpy()})[0]
                           for i in range(0, len(x), batch)])


def torch_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 100) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(x[i:i + batch]).numpy() for i in range(0, len(x), batch)])


def latency_ms(sess, x: torch.Tensor, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of one run, over as many runs as fit in `seconds` (at least 5)."""
    feed = {"input": x.numpy()}
    sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def weight_bytes(path: Path, qmodel: torch.nn.Module) -> dict[str, object]:
    """Bytes of the integer weight initializers, their scales and zero points, their types."""
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    codes = scales = 0
    types: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            init = inits[node.input[0]]
            codes += len(init.raw_data)
            scales += sum(len(inits[n].raw_data) for n in node.input[1:] if n in inits)
            kind = onnx.TensorProto.DataType.Name(init.data_type)
            types[kind] = types.get(kind, 0) + 1
    fp32 = sum(4 * m.codes.numel() for m in qmodel.modules() if isinstance(m, adaround.QuantLayer))
    return {"weight_code_bytes": codes, "weight_scale_bytes": scales, "fp32_weight_bytes": fp32,
            "weight_initializer_types": types}


def quantized_model(args: argparse.Namespace, model: torch.nn.Module, calib: torch.Tensor
                    ) -> tuple[torch.nn.Module, float]:
    if args.quantized and args.quantized.exists():
        log.info("loading %s", args.quantized)
        return adaround.load(args.quantized, model), 0.0
    extra: dict[str, object] = {"act_bits": args.act_bits} if args.act_bits else {}
    if args.loss:
        extra["loss"] = args.loss
    cfg = adaround.QuantConfig(weight_bits=args.bits, per_channel=args.grid == "channel",
                               rounding=args.rounding, iters=args.iters, seed=args.seed,
                               **extra)
    start = time.perf_counter()
    qmodel = adaround.quantize(model, calib, cfg)
    seconds = time.perf_counter() - start
    if args.quantized:
        adaround.save(qmodel, args.quantized)
    return qmodel, seconds


def _kb(n: int) -> str:
    return f"{n / 1024:.0f}"


def report(path: Path) -> str:
    """BENCHMARKS.md's two tables from the JSON lines; the latest run of a setting wins."""
    runs: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs[(r["model"], r["bits"], r["act_bits"], r["grid"])] = r
    acc = ["| model | setting | FP top-1 | simulated top-1 | onnxruntime top-1 | top-1 "
           "disagreements | max abs logit diff (without int32 biases) | FP32 state dict KB | "
           "packed KB (ratio) | packed reload | QDQ ONNX KB | FP32 ONNX KB | encodings KB | "
           "weight initializers |", "|" + "---|" * 14]
    lat = ["| model | setting | FP32 b1 ms | QDQ b1 ms | QDQ folded b1 ms | FP32 b32 ms | "
           "QDQ b32 ms | QDQ folded b32 ms |", "|" + "---|" * 8]
    for r in runs.values():
        setting = (f"W{r['bits']}" + (f"A{r['act_bits']}" if r["act_bits"] else "") +
                   f" per-{r['grid']}, {r['rounding']} {r['iters']} it")
        sz = r["sizes"]
        types = ", ".join(f"{n} {k}" for k, n in sorted(r["weight_initializer_types"].items()))
        acc.append(
            f"| {r['model']} | {setting} | {r['fp_top1']:.2f} | {r['sim_top1']:.2f} | "
            f"{r['ort_top1']:.2f} | {r['top1_disagreements']} / {r['eval_samples']} | "
            f"{r['max_abs_diff']:.1e} ({r['max_abs_diff_exact']:.1e}) | {_kb(sz['fp32.pt'])} | "
            f"{_kb(sz['packed.safetensors'])} (1/{sz['fp32.pt'] / sz['packed.safetensors']:.1f})"
            f" | {'identical' if r['reload_identical'] else 'DIFFERENT'} | {_kb(sz['qdq.onnx'])} | "
            f"{_kb(sz['fp32.onnx'])} | {_kb(sz['model.encodings'])} | {types} |")
        lat.append(f"| {r['model']} | {setting} | " + " | ".join(
            f"{r[f'{k}_b{b}_ms']:.1f}" for b in (1, 32) for k in ("fp32", "qdq", "qdq_folded"))
            + " |")
    return "\n".join(acc) + "\n\n" + "\n".join(lat)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"])
    p.add_argument("--report", type=Path, help="print the markdown tables of this JSON-lines "
                   "file and exit")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, help="activation bits (needs activation "
                   "quantization in QuantConfig)")
    p.add_argument("--grid", choices=["tensor", "channel"], default="tensor")
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounding", choices=["adaround", "nearest"], default="adaround")
    p.add_argument("--loss", help="reconstruction loss (default: QuantConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantized", type=Path, help="load this saved result if it exists, "
                   "else quantize and save it here")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--eval-threads", type=int, default=2, help="onnxruntime threads, accuracy")
    p.add_argument("--json", type=Path, help="append one JSON line here")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
        return 0
    if not args.model:
        p.error("--model is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.model == "efficientnet_lite0":
        model, calib, x_eval, y_eval = load_effnet(args.num_calib, args.seed)
    else:
        model, calib, x_eval, y_eval = load_cifar(args.model, args.num_calib, args.seed)
    qmodel, quantize_s = quantized_model(args, model, calib)
    sim_top1 = accuracy(qmodel, x_eval, y_eval)[1]
    fp_top1 = accuracy(model, x_eval, y_eval)[1]
    example = x_eval[:1]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.save(model.state_dict(), d / "fp32.pt")
        adaround.save(qmodel, d / "packed.safetensors")
        adaround.export_onnx(qmodel, example, d / "qdq.onnx")
        adaround.export_encodings(qmodel, d / "model.encodings", example)
        fp_proto = export_float_graph(model.eval(), example)
        (d / "fp32.onnx").write_bytes(fp_proto.SerializeToString())
        sizes = {f.name: f.stat().st_size for f in d.iterdir()}
        weights = weight_bytes(d / "qdq.onnx", qmodel)
        reloaded = adaround.load(d / "packed.safetensors", model)
        with torch.no_grad():
            identical = bool(torch.equal(reloaded(x_eval[:64]), qmodel(x_eval[:64])))
        sim = torch_logits(qmodel, x_eval)
        qdq = ort_logits(session(d / "qdq.onnx", args.eval_threads), x_eval)
        qdq_exact = ort_logits(session(d / "qdq.onnx", args.eval_threads, EXACT), x_eval)
        ort_top1 = 100.0 * float((qdq.argmax(1) == y_eval.numpy()).mean())
        folded = ort_logits(session(d / "qdq.onnx", args.eval_threads, fold=True), x_eval)
        latency = {}
        for name, path, fold in (("fp32", "fp32.onnx", False), ("qdq", "qdq.onnx", False),
                                 ("qdq_folded", "qdq.onnx", True)):
            sess = session(d / path, 1, fold=fold)
            for batch in (1, 32):
                latency[f"{name}_b{batch}_ms"] = latency_ms(sess, x_eval[:batch],
                                                            args.latency_seconds)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    row = {
        "model": args.model, "bits": args.bits, "act_bits": args.act_bits, "grid": args.grid,
        "rounding": args.rounding, "iters": args.iters, "quantize_s": quantize_s,
        "loss": qmodel.adaround_meta["config"]["loss"],
        "num_calib": len(calib),
        "eval_samples": len(x_eval), "fp_top1": fp_top1, "sim_top1": sim_top1,
        "ort_top1": ort_top1, "top1_disagreements": int((qdq.argmax(1) != sim.argmax(1)).sum()),
        "max_abs_diff": float(np.abs(qdq - sim).max()),
        "max_abs_diff_exact": float(np.abs(qdq_exact - sim).max()),
        "folded_top1": 100.0 * float((folded.argmax(1) == y_eval.numpy()).mean()),
        "max_abs_diff_folded": float(np.abs(folded - sim).max()),
        "reload_identical": identical, "sizes": sizes, **weights, **latency,
        "machine": machine, "commit": commit,
    }
    print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
