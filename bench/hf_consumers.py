"""all-MiniLM-L6-v2 quantized, then loaded by its consumers: onnxruntime (ONNX export with named
dynamic inputs) and transformers' from_pretrained (compressed-tensors checkpoint); each
compared with the simulated model on the STS-B dev sentences.

    python bench/hf_consumers.py --settings w4c w4g64 --iters 100 --threads 1 \
        --json bench/results/hf_consumers.jsonl

Per setting: AdaRound (`--iters` per layer, lr 3/iters, `--num-calib` train sentences), then
- ONNX, QDQ form: onnxruntime with `exact_session_options()` and with its default session;
  for per-channel grids also the "scaled" form in the default session: the largest
  difference of last_hidden_state on real tokens and Spearman x100 of each;
- compressed-tensors folder: `AutoModel.from_pretrained(folder)` (CPU), its largest
  difference, Spearman, load time, file size, and the module type the layers load as.
The loading code of docs/onnxruntime.md and docs/huggingface.md is what runs here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adaround.config import QuantConfig
from adaround.data.files import data_root
from adaround.export import exact_session_options, export_onnx
from adaround.hf import load_pretrained, quantize_hf, save_compressed

sys.path.insert(0, str(Path(__file__).parent))
from bench_minilm import (  # noqa: E402
    SETTINGS,
    calibration_sentences,
    model_folder,
    read_pairs,
    spearman,
)


def hidden_states(run, tokenizer, sentences: list[str], batch: int = 100):  # type: ignore[no-untyped-def]
    """[(last_hidden_state, attention_mask)] per batch from `run(encoded dict)`."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        out.append((np.asarray(run(dict(enc))), enc["attention_mask"].numpy()))
    return out


def compare(ours, theirs, scores: np.ndarray) -> dict:  # type: ignore[no-untyped-def]
    diff = max(float(np.abs((a - b) * m[..., None]).max()) for (a, m), (b, _) in zip(ours, theirs))
    emb = np.concatenate([(h * m[..., None]).sum(1) / m.sum(1, keepdims=True) for h, m in theirs])
    half = len(emb) // 2
    a, b = emb[:half], emb[half:]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"max_abs_diff": diff, "spearman": round(100 * spearman(cos, scores), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["w4c", "w4g64"], choices=sorted(SETTINGS))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--num-calib", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    import transformers

    model, tokenizer = load_pretrained(model_folder())
    stsb = data_root() / "stsb"
    dev = read_pairs(stsb / "sts-b-dev.tsv", header=True)
    calib = calibration_sentences(read_pairs(stsb / "sts-b-train-subset.tsv", header=False),
                                  args.num_calib, 0)
    sentences = [q[0] for q in dev] + [q[1] for q in dev]
    scores = np.array([q[2] for q in dev])
    for name in args.settings:
        bits, group = SETTINGS[name]
        cfg = QuantConfig(weight_bits=bits, per_channel=group is None, group_size=group,
                          loss="quadratic", iters=args.iters, lr=3.0 / args.iters)
        qmodel = quantize_hf(model, calib, cfg, tokenizer=tokenizer)
        with torch.no_grad():
            ours = hidden_states(lambda e, m=qmodel: m(**e).last_hidden_state, tokenizer,
                                 sentences)
        row = {"setting": name, "iters": args.iters, "machine": platform.processor() or
               platform.machine(), "simulated": compare(ours, ours, scores)}
        with tempfile.TemporaryDirectory() as tmp:
            example = dict(tokenizer(["an example"], return_tensors="pt"))
            forms = ["qdq"] + (["scaled"] if group is None else [])
            for form in forms:
                path = export_onnx(qmodel, example, Path(tmp) / f"{form}.onnx", weight_form=form)
                sessions = {"default": None} if form == "scaled" else {
                    "exact_options": exact_session_options(), "default": None}
                for label, options in sessions.items():
                    sess = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
                    names = [i.name for i in sess.get_inputs()]
                    res = hidden_states(lambda e, s=sess, n=names: s.run(
                        ["last_hidden_state"], {k: e[k].numpy() for k in n})[0],
                        tokenizer, sentences)
                    row[f"onnx_{form}_{label}"] = compare(ours, res, scores)
            start = time.perf_counter()
            folder = save_compressed(qmodel, Path(tmp) / "ckpt", tokenizer)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            loaded = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
            load_s = time.perf_counter() - start
            with torch.no_grad():
                res = hidden_states(lambda e, m=loaded: m(**e).last_hidden_state, tokenizer,
                                    sentences)
            row["from_pretrained"] = {
                **compare(ours, res, scores), "save_s": round(saved, 2),
                "load_s": round(load_s, 2),
                "size_mb": round((folder / "model.safetensors").stat().st_size / 2**20, 1),
                "layer_type": type(loaded.encoder.layer[0].attention.self.query).__name__}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
