"""Model-zoo benchmark (issue 13): does `adaround.quantize` give the right network, or refuse?

Each model of bench/zoo_models.py (timm, torchvision, Hugging Face; random weights, BatchNorm
statistics set from random data so that folding bugs cannot hide behind identity norms) runs in
its own subprocess with a timeout and gets one JSON line: the prepared float network's error,
W8/W4 nearest and W4 AdaRound output errors, ONNX (onnxruntime) and save/load agreement, W4A8,
seconds per stage, and its class: correct, refused (an AdaRoundError), WRONG (no error but an
error above threshold) or CRASH (a raw exception). For WRONG models the first module whose output
differs (forward hooks, execution order) is recorded.

Needs timm, torchvision, transformers, onnx, onnxruntime in a separate venv (torch 2.14.1 with
torchvision 0.29.1; CI has none of them and never imports this file). Run it against a chosen
adaround checkout with PYTHONPATH (the installed one does not matter), e.g.:

    OMP_NUM_THREADS=1 PYTHONPATH=/work/main/src /work/zoo-venv/bin/python bench/zoo.py \
        --threads 1 --out bench/results/zoo.jsonl
    python bench/zoo.py --table bench/results/zoo.jsonl
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STAGES = ["build", "prepare", "w8", "onnx", "reload", "w4a8", "w4_nearest", "w4_adaround"]
CORE = STAGES[:5]
PREP_TOL, W8_TOL, ONNX_TOL = 1e-4, 1e-3, 1e-3
NOISE_FACTOR = 4.0  # prepared float may differ by this many times the model's one-ulp noise
W8_RATIO, W8_LAYER_TOL = 2.0, 5e-2  # W8 may be 2x the reference quantizer's error
N_CALIB, N_EVAL, BATCH, ITERS = 32, 16, 16, 200


def _missing(sources: set[str]) -> list[str]:
    need = {"timm": ["timm", "torchvision"], "torchvision": ["torchvision"],
            "transformers": ["transformers"]}
    mods = {"torch", "onnx", "onnxruntime"} | {m for s in sources for m in need[s]}
    return sorted(m for m in mods if importlib.util.find_spec(m) is None)


# ---------------------------------------------------------------- child: one model, all stages
def out_tensor(y):
    """The tensor to compare: the output itself, `logits`/`last_hidden_state`, or the first one."""
    import torch

    if isinstance(y, torch.Tensor):
        return y
    for key in ("logits", "last_hidden_state"):
        if hasattr(y, key) and getattr(y, key) is not None:
            return getattr(y, key)
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)):
        for v in y:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"no tensor in model output of type {type(y).__name__}")


def rel_err(y, ref) -> float:
    y, ref = out_tensor(y).double(), out_tensor(ref).double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def randomize_norms(model, x) -> None:
    """Random BN affine parameters and running statistics from train-mode passes on `x`."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            is_frozen = type(m).__name__ == "FrozenBatchNorm2d"
            if isinstance(m, _BatchNorm) or is_frozen:
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if is_frozen:  # no train mode: draw plausible statistics
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, _BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the statistics of the passes below
        # torchvision's Inception3 runs its auxiliary head in train mode only, and only on
        # 299x299 inputs: leave it out of these passes (it never runs in eval mode)
        aux = getattr(model, "AuxLogits", None)
        if aux is not None:
            model.AuxLogits = None
        model.train()
        for chunk in x.split(BATCH):
            model(chunk)
        model.eval()
        if aux is not None:
            model.AuxLogits = aux


def first_diff(ref_model, other, x, tol: float) -> dict | None:
    """The first module (execution order of `ref_model`) whose output differs in `other`."""
    import torch

    def record(model):
        outs, handles = {}, []
        for name, mod in model.named_modules():
            def hook(mod, inp, out, name=name):
                try:
                    outs.setdefault(name, []).append(out_tensor(out).detach().clone())
                except TypeError:
                    pass
                order.append(name)
            handles.append(mod.register_forward_hook(hook))
        return outs, handles

    order: list[str] = []
    ref_outs, h1 = record(ref_model)
    with torch.no_grad():
        ref_model(x)
    ref_order, order[:] = list(order), []
    other_outs, h2 = record(other)
    with torch.no_grad():
        other(x)
    for h in h1 + h2:
        h.remove()
    seen: dict[str, int] = {}
    for name in ref_order:
        k = seen[name] = seen.get(name, -1) + 1
        a, b = ref_outs.get(name, []), other_outs.get(name, [])
        if k >= len(a) or k >= len(b) or a[k].shape != b[k].shape or not a[k].is_floating_point():
            continue
        err = rel_err(b[k], a[k])
        if not err <= tol:  # NaN counts as a difference
            mods = dict(ref_model.named_modules())
            omods = dict(other.named_modules())
            return {"module": name or "<root>", "class": type(mods[name]).__qualname__,
                    "class_module": type(mods[name]).__module__,
                    "other_class": type(omods[name]).__qualname__ if name in omods else None,
                    "call": k, "rel_err": err}
    return None


def reference_w8(fp):
    """The bench's own W8 of the prepared network: symmetric per-channel min-max, nearest.

    Random-weight networks with real BatchNorm statistics amplify 8-bit weight noise (resnet18:
    5e-2 at the output), so W8 is judged against this independent quantizer, not by 1e-3 alone.
    """
    import torch
    from torch import nn

    ref = copy.deepcopy(fp)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = mod.weight
                s = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
                w.copy_(torch.round(w / s.view(-1, *[1] * (w.dim() - 1))) * s.view(
                    -1, *[1] * (w.dim() - 1)))
    return ref


def w8_ok(rec: dict) -> bool:
    e = rec.get("w8_nearest_rel_err", 0)
    return e <= W8_TOL or e <= W8_RATIO * rec.get("w8_reference_rel_err", 0)


def run_child(name: str, partial: str, threads: int, no_adaround: bool) -> None:
    import numpy as np
    import torch
    from zoo_models import BY_NAME

    import adaround
    from adaround.api import prepare_float

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = BY_NAME[name]
    rec: dict = {"model": name, "source": spec.source, "seconds": {}, "errors": {}}
    state: dict = {}

    def dump() -> None:  # atomic: the parent may kill this process at any moment
        Path(partial + ".tmp").write_text(json.dumps(rec))
        os.replace(partial + ".tmp", partial)

    def stage(key, fn) -> bool:
        rec["running"] = key
        dump()
        t0 = time.perf_counter()
        try:
            fn()
            ok = True
        except Exception as e:  # noqa: BLE001 - classifying every failure is the point
            kind = "refused" if isinstance(e, adaround.AdaRoundError) else "crash"
            tb = traceback.extract_tb(e.__traceback__)[-6:]
            frames = [f"{f.filename}:{f.lineno} {f.name}: {f.line}" for f in tb]
            rec["errors"][key] = {"kind": kind, "type": type(e).__qualname__,
                                  "message": str(e)[:1500], "frames": frames}
            if kind == "refused" and "m" in state:  # does the message say which module?
                names = [n for n, _ in state["m"].named_modules() if "." in n or len(n) > 3]
                rec["errors"][key]["names_module"] = any(n in str(e) for n in names)
            ok = False
        rec["seconds"][key] = round(time.perf_counter() - t0, 3)
        rec.pop("running")
        dump()
        return ok

    x, xe = spec.inputs(N_CALIB, 0), spec.inputs(N_EVAL, 1)
    tmp = Path(tempfile.mkdtemp(prefix=f"zoo_{name}_"))

    def build():
        m = spec.build().eval()
        if not spec.text:
            randomize_norms(m, x)
        with torch.no_grad():
            state["y"], state["ye"] = out_tensor(m(x)), out_tensor(m(xe))
        state["m"] = m

    def prepare():
        fp = state["fp"] = prepare_float(state["m"], x, adaround.QuantConfig(weight_bits=8))[0]
        with torch.no_grad():
            rec["prepared_float_rel_err"] = e = rel_err(fp(x), state["y"])
            rec["w8_reference_rel_err"] = rel_err(reference_w8(fp)(xe), state["ye"])
        if not e <= PREP_TOL:
            # the network's own float32 noise: its error when every weight moves by one ulp
            # (deep nets reach 1e-4 that way); an exact rewrite stays within a few times it
            noisy = copy.deepcopy(state["m"])
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for prm in noisy.parameters():
                    prm.mul_(1 + torch.randn(prm.shape, generator=gen) * 2.0**-23)
                rec["float_noise_rel_err"] = rel_err(noisy(x), state["y"])
            if e > NOISE_FACTOR * rec["float_noise_rel_err"]:
                rec["first_diff_prepared"] = first_diff(state["m"], fp, x[:4], PREP_TOL)

    def quant(key, **kw):
        q = adaround.quantize(state["m"], x, adaround.QuantConfig(**kw))
        with torch.no_grad():
            y = out_tensor(q(xe))
        rec[f"{key}_rel_err"] = rel_err(y, state["ye"])
        rec[f"{key}_finite"] = bool(torch.isfinite(y).all())
        return q

    def w8():
        q = state["q8"] = quant("w8_nearest", weight_bits=8, per_channel=True, rounding="nearest")
        if not w8_ok(rec):  # against the prepared network: folded layers differ from the user's
            rec["first_diff_w8"] = first_diff(state["fp"], q, x[:4], W8_LAYER_TOL)

    def onnx():
        import onnxruntime as ort

        from adaround.export import exact_session_options

        q, xi = state["q8"], xe[:1]
        # token ids: the export's dict form (named inputs, as a tokenizer gives them)
        example = xi if xi.is_floating_point() else {"input_ids": xi}
        adaround.export_onnx(q, example, tmp / "m.onnx")
        with torch.no_grad():
            ref = out_tensor(q(xi))
        # default options; QDQ fusions off; ORT's MatMulNBits fusion (DQ+MatMul, 8-bit too since
        # ORT 1.2x) computing in float instead of its default int8 activations (accuracy level 4);
        # the documented options (docs/onnxruntime.md), which decide the class
        for key, entry, value in (("onnx_rel_err", None, None),
                                  ("onnx_noqdq_rel_err", "session.disable_quant_qdq", "1"),
                                  ("onnx_acc0_rel_err", "session.qdq_matmulnbits_accuracy_level",
                                   "0"),
                                  ("onnx_exact_rel_err", "exact", None)):
            so = exact_session_options() if entry == "exact" else ort.SessionOptions()
            so.intra_op_num_threads = threads
            if entry and entry != "exact":
                so.add_session_config_entry(entry, value)
            sess = ort.InferenceSession(str(tmp / "m.onnx"), so, providers=["CPUExecutionProvider"])
            y = sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0]
            rec[key] = rel_err(torch.from_numpy(np.asarray(y)), ref)

    def reload():
        adaround.save(state["q8"], tmp / "m.pt")
        loaded = adaround.load(tmp / "m.pt", state["m"])
        with torch.no_grad():
            d = (out_tensor(loaded(xe)) - out_tensor(state["q8"](xe))).abs().max().item()
        rec["reload_max_abs_diff"] = d
        rec["reload_identical"] = d == 0

    ok = stage("build", build)
    ok = ok and stage("prepare", prepare)
    if ok and stage("w8", w8):
        stage("onnx", onnx)
        stage("reload", reload)
    if ok:
        stage("w4a8", lambda: quant("w4a8", weight_bits=4, act_bits=8, rounding="nearest"))
        stage("w4_nearest", lambda: quant("w4_nearest", weight_bits=4, per_channel=True,
                                          rounding="nearest"))
    if ok and not no_adaround:
        stage("w4_adaround", lambda: quant("w4_adaround", weight_bits=4, per_channel=True,
                                           rounding="adaround", iters=ITERS, lr=3 / ITERS,
                                           batch_size=BATCH, seed=0))
    rec["done"] = True
    dump()


# ---------------------------------------------------------------- parent: loop, classify, table
def classify(rec: dict) -> tuple[str, str]:
    """(class, reason): the first anomaly in stage order decides."""
    checks = {
        "prepare": lambda: rec.get("prepared_float_rel_err", 0) <= max(
            PREP_TOL, NOISE_FACTOR * rec.get("float_noise_rel_err", 0)),
        "w8": lambda: w8_ok(rec),
        # onnxruntime with the session options docs/onnxruntime.md gives for weight-only QDQ
        "onnx": lambda: rec.get("onnx_exact_rel_err", rec.get("onnx_rel_err", 0)) <= ONNX_TOL,
        "reload": lambda: rec.get("reload_identical", True),
        "w4a8": lambda: rec.get("w4a8_finite", True),
    }
    for key in STAGES:
        err = rec["errors"].get(key)
        if err:
            cls = "refused" if err["kind"] == "refused" else "CRASH"
            if key == "build":
                cls = "BENCH_ERROR"
            return cls, f"{key}: {err['type']}: {err['message'][:300]}"
        if rec.get("timeout_stage") == key:
            return ("TIMEOUT" if key in CORE else "correct"), f"timeout in {key}"
        if key in checks and not checks[key]():
            if key == "onnx" and rec.get("onnx_acc0_rel_err", 1) <= ONNX_TOL:
                return "WRONG", ("onnx: onnxruntime's default MatMulNBits fusion computes with "
                                 "int8 activations (qdq_matmulnbits_accuracy_level=0: "
                                 f"{rec['onnx_acc0_rel_err']:.1e})")
            return "WRONG", f"{key} above threshold"
    return "correct", ""


def git_commit(module_file: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(module_file).parent), "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_all(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo_models import BY_NAME, MODELS

    names = args.models or [m.name for m in MODELS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        sys.exit(f"unknown models {unknown}; known: {sorted(BY_NAME)}")
    missing = _missing({BY_NAME[n].source for n in names})
    if missing:
        sys.exit(f"bench/zoo.py needs {', '.join(missing)}: pip install them in a separate venv "
                 "(torch==2.14.1 torchvision==0.29.1 timm transformers onnx onnxruntime); "
                 "CI does not need them")
    spec = importlib.util.find_spec("adaround")
    if spec is None:
        sys.exit("adaround not importable: set PYTHONPATH=<checkout>/src")
    commit = git_commit(spec.origin)
    print(f"adaround from {spec.origin} at {commit}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            partial = f.name
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", name, "--partial", partial,
               "--threads", str(args.threads)] + (["--no-adaround"] if args.no_adaround else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            stderr, rc = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stderr, rc = (e.stderr or b"").decode(errors="replace") if isinstance(
                e.stderr, bytes) else (e.stderr or ""), "timeout"
        try:
            rec = json.loads(Path(partial).read_text())
        except (OSError, ValueError):
            rec = {"model": name, "source": BY_NAME[name].source, "seconds": {}, "errors": {}}
        os.unlink(partial)
        if rc == "timeout":  # "exit": killed after its last stage, while shutting down
            rec["timeout_stage"] = rec.pop("running", "exit" if rec["seconds"] else "build")
        elif not rec.get("done"):  # the child died (segfault, OOM) inside a stage
            stage = rec.pop("running", "build")
            rec["errors"][stage] = {"kind": "crash", "type": f"exit code {rc}",
                                    "message": stderr[-1500:], "frames": []}
        rec["total_seconds"] = round(time.perf_counter() - t0, 1)
        rec["adaround_commit"], rec["threads"] = commit, args.threads
        rec["class"], rec["reason"] = classify(rec)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        diff = rec.get("first_diff_prepared") or rec.get("first_diff_w8") or {}
        print(f"{name:32s} {rec['class']:8s} {rec['total_seconds']:6.1f}s  {rec['reason'][:110]}"
              + (f"  first diff: {diff.get('module')} ({diff.get('class')})" if diff else ""),
              flush=True)


COLUMNS = [("prepared FP", "prepared_float_rel_err"), ("W8 ref", "w8_reference_rel_err"),
           ("W8 near", "w8_nearest_rel_err"), ("W4 near", "w4_nearest_rel_err"),
           ("W4 AdaRound", "w4_adaround_rel_err"), ("ONNX", "onnx_exact_rel_err"),
           ("ONNX default session", "onnx_rel_err"), ("reload", "reload_identical"),
           ("W4A8", "w4a8_rel_err")]
CLASSES = ["correct", "refused", "WRONG", "CRASH", "TIMEOUT", "BENCH_ERROR"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.0f}" if v >= 1 else f"{v:.1e}"
    return str(v)


def _seconds(r: dict) -> str:
    """Total seconds, and the W4 AdaRound stage's (or why it has none)."""
    ada = r["seconds"].get("w4_adaround")
    if ada is None:
        ada = "timeout" if r.get("timeout_stage") else "skipped"
    else:
        ada = f"{ada:.0f}"
    return f"{r.get('total_seconds', 0):.0f} ({ada})"


def table(files: list[str]) -> None:
    recs = {}
    for file in files:
        for line in Path(file).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                prev = recs.get(r["model"])  # a later line for the same model replaces it,
                if prev and "w4_adaround_rel_err" not in r and "w4_adaround_rel_err" in prev:
                    for key in ("w4_adaround_rel_err", "w4_nearest_rel_err"):  # except a W4
                        r.setdefault(key, prev.get(key))  # stage it skipped: kept, with its
                    r["w4_from"] = prev.get("adaround_commit", "?")  # commit in the note
                recs[r["model"]] = r
    head = ["model", "source", "class", *(c for c, _ in COLUMNS), "s (AdaRound)", "commit",
            "note"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    counts = dict.fromkeys(CLASSES, 0)
    for r in recs.values():
        r["class"], r["reason"] = classify(r)  # with this version's thresholds
        counts[r["class"]] += 1
        note = r["reason"][:120].replace("|", "/").replace("\n", " ")
        if r.get("w4_from"):
            note += f" (W4 at {r['w4_from']})"
        diff = r.get("first_diff_prepared") or r.get("first_diff_w8")
        if diff:
            note += f"; first diff `{diff['module']}` ({diff['class']})"
        cells = [r["model"], r["source"], r["class"], *(_fmt(r.get(k)) for _, k in COLUMNS),
                 _seconds(r), r.get("adaround_commit", "?"), note]
        print("| " + " | ".join(cells) + " |")
    n = len(recs)
    shown = ", ".join(f"{k}: {v}" for k, v in counts.items() if v or k in CLASSES[:4])
    print(f"\n{shown}; {n} models, {100 * counts['correct'] / max(n, 1):.0f} % correct")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", help="subset of the zoo (default: all)")
    p.add_argument("--out", default="bench/results/zoo.jsonl", help="JSONL file (appended to)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-adaround", action="store_true", help="skip the W4 AdaRound stage")
    p.add_argument("--table", nargs="+", metavar="FILE", help="print the markdown table of FILEs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.table:
        table(args.table)
    elif args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        sys.path.insert(0, str(Path(__file__).parent))
        run_child(args.child, args.partial, args.threads, args.no_adaround)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
