"""Post-training quantization of PyTorch networks with AdaRound: the `adaround` command.

Each command turns its arguments into a config and calls the library's API.

Exit codes: 0 success, 1 internal error, 2 bad input or usage, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from adaround import distributed
from adaround.allocator import keep_freed_memory
from adaround.cli_act import act_config_kwargs, add_act_options
from adaround.cli_checks import (
    EXIT_TERMINATED,
    Terminated,
    UsageError,
    call_factory,
    check_args,
    sigterm_as_interrupt,
)
from adaround.cli_env import choose_threads
from adaround.config import QuantConfig
from adaround.errors import AdaRoundError
from adaround.hf.cli import add_hf_options

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("adaround")


def load_model(ref: str, weights: str | None) -> nn.Module:
    """Build a model from `package.module:factory`, then load an optional weights file."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"model reference {ref!r} must look like package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} ({exc}): check the model reference "
                         "and that its package is installed or on PYTHONPATH") from exc
    except AttributeError as exc:
        raise UsageError(f"{module_name} has no attribute {attr!r}: check the model reference")\
            from exc
    model = call_factory(factory, ref)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{ref} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        from adaround.models.weights import load_weights

        model = load_weights(model, weights)
    return model.eval()


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"{text!r} is not a comma-separated list of numbers") from exc


def load_data(args: argparse.Namespace, path: str, limit: int | None, offset: int = 0
              ) -> tuple[Tensor, Tensor | None]:
    """Inputs (and labels, where the file has them) from a tensor file or an image folder."""
    from adaround.data.files import load_array_file, load_image_folder

    mean, std = _floats(args.mean), _floats(args.std)
    if Path(path).is_dir():
        return load_image_folder(path, size=args.image_size, resize=args.resize, mean=mean,
                                 std=std, limit=limit, offset=offset)
    return load_array_file(path, mean=mean, std=std, limit=limit, offset=offset)


def positions_or_all(text: str) -> int | str:
    """--moment-positions: a whole number, or "all" (exact moments)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a whole number nor 'all': pass e.g. 131072, or all for "
            "exact moments") from None


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    from adaround.config import FAST_PRESET

    # options the user left unset: the --fast preset's value where it has one, else the default
    preset = FAST_PRESET if getattr(args, "fast", False) else {}
    chosen = {name: getattr(args, name) if getattr(args, name, None) is not None else
              preset.get(name, getattr(QuantConfig, name))
              for name in ("iters", "lr", "loss", "moment_positions")}
    if chosen["moment_positions"] == "all":
        chosen["moment_positions"] = None
    return QuantConfig(
        weight_bits=args.bits, per_channel=args.per_channel, symmetric=not args.asymmetric,
        rounding=args.rounding, batch_size=args.batch_size, seed=args.seed, **chosen,
        scale_method=args.scale_method, first_last_bits=args.first_last_bits,
        include=tuple(args.include), exclude=tuple(args.exclude), fold_bn=not args.no_fold_bn,
        loss_after_activation=not args.no_activation_loss,
        early_stop=not args.no_early_stop, memory_budget_mb=args.memory_budget_mb,
        compile=args.compile, inputs=args.inputs, step_precision=args.step_precision,
        group_size=getattr(args, "group_size", None),
        **act_config_kwargs(args),
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    import adaround

    cfg = config_from_args(args)
    if args.hf_model:
        from adaround.hf.cli import quantize_hf_from_args

        if args.model:
            raise UsageError("pass either a model reference or --hf-model, not both")
        return quantize_hf_from_args(args, cfg)
    if not args.model or not args.calib:
        raise UsageError("quantize needs a model reference and --calib (or --hf-model FOLDER "
                         "--calib-text FILE for a Hugging Face model)")
    model = load_model(args.model, args.weights)
    calib, _ = load_data(args, args.calib, args.num_calib, args.calib_offset)
    log.info("calibrating on %d samples of shape %s; %s", len(calib), tuple(calib.shape[1:]), cfg)
    start = time.perf_counter()
    qmodel = adaround.quantize(model, calib, cfg, progress=not args.quiet,
                               checkpoint_dir=args.checkpoint)
    if distributed.rank() > 0:  # under torchrun: process 0 writes and reports
        return EXIT_OK
    from adaround.checkpoint import save_then_remove

    save_then_remove(qmodel, args.output, args.checkpoint)
    print(f"quantized {len(qmodel.adaround_meta['layers'])} layers in "
          f"{time.perf_counter() - start:.1f}s -> {args.output}")
    if cfg.act_bits is not None:
        from adaround.act_calibration import describe_convention

        print(describe_convention(cfg, list(qmodel.adaround_meta["layers"])))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import adaround
    from adaround.evaluate import accuracy

    model = load_model(args.model, args.weights)
    if args.quantized:
        model = adaround.load(args.quantized, model)
    x, y = load_data(args, args.data, args.limit)
    if y is None:
        raise UsageError(f"{args.data} has no labels: evaluation needs a labelled set")
    top = accuracy(model, x, y, topk=(1, 5) if _num_classes(model, x) > 5 else (1,),
                   progress=not args.quiet)
    print("  ".join(f"top-{k}: {v:.2f}%" for k, v in top.items()) + f"  ({len(x)} samples)")
    return EXIT_OK


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def cmd_demo(args: argparse.Namespace) -> int:
    from adaround.demo import format_table, run_demo

    rows = run_demo(bits=tuple(args.bits), iters=args.iters, n_calib=args.num_calib,
                    progress=not args.quiet, lr=args.lr)
    print(format_table(rows))
    return EXIT_OK


def _subset(x: Tensor, y: Tensor | None, n: int | None, seed: int
            ) -> tuple[Tensor, Tensor | None]:
    """A seeded random subset (files may be sorted by class, so never a prefix)."""
    if n is None or n >= len(x):
        return x, y
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[pick], None if y is None else y[pick]


def cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from adaround.analysis import AnalysisConfig, analyze, format_summary, format_table

    cfg = AnalysisConfig(
        layer=args.layer, bits=tuple(args.bits), per_channel=args.per_channel,
        samples=args.samples, hessian=args.hessian, hessian_samples=args.hessian_samples,
        max_classes=args.max_classes, task_samples=args.task_samples, sweeps=args.sweeps,
        iters=args.iters, batch_size=args.batch_size, all_layers=not args.no_all_layers,
        all_layers_iters=args.all_layers_iters, max_dense=args.max_dense, seed=args.seed,
        lr=args.lr)
    model = load_model(args.model, args.weights)
    calib, calib_y = _subset(*load_data(args, args.calib, None), args.num_calib, args.seed)
    x_eval, y_eval = _subset(*load_data(args, args.data, None), args.num_eval, args.seed + 1)
    if y_eval is None:
        raise UsageError(f"{args.data} has no labels: the analysis needs a labelled set")
    labelled = calib_y is not None and calib_y.dtype == torch.long and not args.unlabelled
    ablations = analyze(model, calib, x_eval, y_eval, cfg,
                        calib_labels=calib_y if labelled else None,
                        name=args.model.rpartition(":")[2])
    print("\n\n".join(format_table(a) for a in ablations))
    if len(ablations) > 1:
        print("\n" + format_summary(ablations))
    if args.plot_dir:
        from adaround.analysis.plot import plot_qubo_vs_accuracy

        for a in ablations:
            name = f"{a.model}_{a.layer or 'model'}_w{a.bits}.png".replace("/", "_")
            print(f"plot -> {plot_qubo_vs_accuracy(a, Path(args.plot_dir) / name)}")
    if args.json:
        from adaround.io import atomic_write

        text = json.dumps([a.to_dict() for a in ablations], indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return EXIT_OK


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise UsageError(f"{text!r} is not a comma-separated list of integers") from exc
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape {text} must list positive sizes, e.g. 3,32,32")
    return shape


def cmd_export(args: argparse.Namespace) -> int:
    import adaround

    shape = _shape(args.input_shape)
    if shape is None and args.format in ("onnx", "aimet"):
        raise UsageError(f"--format {args.format} needs --input-shape (one sample, without "
                         "the batch dimension, e.g. 3,32,32)")
    example = None if shape is None else torch.randn((1, *shape),
                                                     generator=torch.Generator().manual_seed(0))
    qmodel = adaround.load(args.quantized, load_model(args.model, args.weights))
    if args.format == "onnx":
        adaround.export_onnx(qmodel, example, args.output)
    elif args.format == "packed":
        adaround.save(qmodel, args.output)
    elif args.format == "aimet":
        return _export_aimet(qmodel, example, args)
    else:
        adaround.export_encodings(qmodel, args.output, example)
        if args.float_onnx:
            if example is None:
                raise UsageError("--float-onnx needs --input-shape")
            adaround.export_onnx(qmodel, example, args.float_onnx, qdq=False)
            print(f"float graph -> {args.float_onnx}")
    print(f"{args.format} -> {args.output} ({Path(args.output).stat().st_size} bytes)")
    return EXIT_OK


def _export_aimet(qmodel: nn.Module, example: Tensor, args: argparse.Namespace) -> int:
    import adaround

    paths = adaround.export_aimet(qmodel, example, args.output, prefix=args.prefix,
                                  encoding_version=args.encoding_version)
    for kind, path in paths.items():
        print(f"aimet {kind} -> {path} ({path.stat().st_size} bytes)")
    return EXIT_OK


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", help="per-channel mean to subtract, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", help="per-channel std to divide by, e.g. 0.229,0.224,0.225")
    p.add_argument("--image-size", type=int, default=224, help="centre crop of image folders")
    p.add_argument("--resize", type=int, default=256, help="short side before the crop")


def _add_model_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if optional else None,
                   help="model factory as package.module:function")
    p.add_argument("--weights", help="state-dict file to load into the model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaround", description=__doc__.splitlines()[0],
                                     epilog="adaround COMMAND --help lists a command's options")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores "
                        "not busy with other work, from the load average; OMP_NUM_THREADS "
                        "wins if set)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = QuantConfig()

    q = sub.add_parser("quantize", help="quantize a model's weights (and activations) with "
                       "AdaRound, BRECQ or QDrop and save the result")
    _add_model_options(q, optional=True)
    q.add_argument("--calib", help=".npz/.pt/.npy file or folder of images")
    q.add_argument("--num-calib", type=int, default=1024,
                   help="calibration samples or sentences (1024)")
    q.add_argument("--calib-offset", type=int, default=0, help="skip this many samples first")
    q.add_argument("--output", "-o", required=True, help="where to write the quantized model")
    q.add_argument("--bits", type=int, default=d.weight_bits, help="weight bits, 2-8 (4)")
    q.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    q.add_argument("--group-size", type=int, help="one scale per this many input weights of "
                   "an output channel (Linear layers; e.g. 32, 64, 128)")
    q.add_argument("--asymmetric", action="store_true", help="unsigned grid with zero point")
    q.add_argument("--rounding", choices=["adaround", "nearest"], default=d.rounding,
                   help="adaround: learn each weight's rounding (default); nearest: round to "
                   "the nearest grid point (the baseline, same grid)")
    q.add_argument("--fast", action="store_true", help="the time-to-accuracy preset "
                   "(QuantConfig.fast(): 100 steps at lr 0.03, moments "
                   "from at most 32768 positions); options given beside it win")
    q.add_argument("--iters", type=int, help=f"iterations per layer ({d.iters})")
    q.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"calibration samples per optimisation step ({d.batch_size})")
    q.add_argument("--lr", type=float, help="Adam's learning rate for V (1e-3, "
                   "the paper's for 10000 iterations; about 3 / iters for short runs)")
    q.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the batch draws and initialisation ({d.seed}): same seed, "
                   "same result")
    q.add_argument("--scale-method", choices=["mse", "minmax"], default=d.scale_method,
                   help="weight grid: mse (default) searches the scale minimising the "
                   "rounding error; minmax takes the largest weight")
    q.add_argument("--first-last-bits", type=int, help="keep first/last layer at these bits")
    q.add_argument("--include", action="append", default=[], help="module-name glob to include")
    q.add_argument("--exclude", action="append", default=[], help="module-name glob to skip")
    q.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm")
    q.add_argument("--no-activation-loss", action="store_true",
                   help="take the loss before the following activation")
    q.add_argument("--loss", choices=["auto", "sampled", "quadratic", "quadratic_warmup"],
                   help="sampled: the paper's; quadratic: from second moments, "
                   "all data every step, before the activation; auto (default): quadratic "
                   "where its step is cheaper, else sampled")
    q.add_argument("--moment-positions", type=positions_or_all, help="estimate each layer's "
                   "moments (quadratic loss) from at most this many positions, a seeded "
                   "uniform subset (default and 'all': every position, exact)")
    q.add_argument("--step-precision", choices=["auto", "float32", "bfloat16"],
                   default=d.step_precision, help="the steps' matrix products: auto (default) "
                   "in bfloat16 between exact refreshes for layers with rows of 512+ on CPUs "
                   "with bfloat16 units (AMX, AVX512-BF16), float32 always exact")
    q.add_argument("--memory-budget-mb", type=float, help="keep cached activations within "
                   "this many MB, spilling the rest to temporary files on disk")
    q.add_argument("--inputs", choices=["quantized", "float"], default=d.inputs,
                   help="each layer's input from the partly quantized network (paper eq. 25, "
                   "default) or the FP one (layers independent, same shapes batched)")
    q.add_argument("--compile", action="store_true", help="fuse BRECQ/QDrop's activation "
                   "quantizers with torch.compile (pays off on large activations and long runs)")
    q.add_argument("--no-early-stop", action="store_true",
                   help="run every iteration even once the rounding is final")
    q.add_argument("--checkpoint", metavar="DIR", help="save the progress here after each "
                   "layer or block; run the same command again to resume an interrupted run "
                   "(removed once the output is written)")
    add_act_options(q)
    _add_data_options(q)
    add_hf_options(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="top-1 (top-5) accuracy of an FP or quantized model")
    _add_model_options(e)
    e.add_argument("--quantized", help="file written by `adaround quantize`")
    e.add_argument("--data", required=True, help="labelled .npz/.pt file or image folder")
    e.add_argument("--limit", type=int, help="evaluate on the first N samples only")
    _add_data_options(e)
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("analyze", help="the paper's first-layer ablation: QUBOs, stochastic "
                       "rounding, relaxation")
    _add_model_options(a)
    a.add_argument("--calib", required=True, help=".npz/.pt/.npy file or folder of images")
    a.add_argument("--data", required=True, help="labelled evaluation file or image folder")
    a.add_argument("--num-calib", type=int, default=1024, help="random calibration subset")
    a.add_argument("--num-eval", type=int, help="random evaluation subset (default: all)")
    a.add_argument("--unlabelled", action="store_true",
                   help="ignore calibration labels: task loss against the FP predictions")
    a.add_argument("--layer", help="module name to analyse (default: the first layer)")
    a.add_argument("--bits", type=int, nargs="+", default=[4])
    a.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    a.add_argument("--samples", type=int, default=100, help="stochastic roundings (100)")
    a.add_argument("--hessian", choices=["gauss_newton", "fisher", "exact"],
                   default="gauss_newton")
    a.add_argument("--hessian-samples", type=int, default=512)
    a.add_argument("--max-classes", type=int, help="Gauss-Newton over the top classes only")
    a.add_argument("--task-samples", type=int, help="calibration samples for the task loss")
    a.add_argument("--sweeps", type=int, default=200, help="annealing sweeps of the QUBO solver")
    a.add_argument("--iters", type=int, default=2000, help="relaxation iterations")
    a.add_argument("--lr", type=float, help="Adam's lr of the relaxation (1e-3; about "
                   "3 / iters for short runs)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--no-all-layers", action="store_true", help="skip the all-layers runs")
    a.add_argument("--all-layers-iters", type=int, help="relaxation iterations per layer there")
    a.add_argument("--max-dense", type=int, default=4096,
                   help="largest dense QUBO block, in weights (4096: 128 MiB)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--plot-dir", help="write the QUBO-vs-accuracy scatter PNGs here")
    a.add_argument("--json", help="write every result as JSON here")
    _add_data_options(a)
    a.set_defaults(func=cmd_analyze)

    x = sub.add_parser("export", help="write a quantized model as ONNX QDQ, a packed weight "
                       "file, an encodings JSON or the files AIMET loads")
    _add_model_options(x)
    x.add_argument("--quantized", required=True, help="file written by `adaround quantize`")
    x.add_argument("--format", required=True,
                   choices=["onnx", "packed", "encodings", "aimet"],
                   help="onnx: QDQ graph with INT4/INT8 weights; packed: adaround.save's file; "
                   "encodings: AIMET/Qualcomm encodings JSON for the float ONNX graph; aimet: "
                   "a folder with what aimet-torch's QuantizationSimModel loads "
                   "(docs/aimet.md)")
    x.add_argument("--output", "-o", required=True,
                   help="where to write it (--format aimet: a folder)")
    x.add_argument("--prefix", default="model", help="aimet: file name stem (model)")
    x.add_argument("--encoding-version", choices=["1.0.0", "0.6.1"], default="1.0.0",
                   help="aimet: format of <prefix>.encodings (1.0.0, aimet-torch's current)")
    x.add_argument("--input-shape", help="one input without the batch dimension, e.g. "
                   "3,32,32 (needed for onnx, and to name tensors in encodings)")
    x.add_argument("--float-onnx", help="encodings: also write the float graph they name here")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="FP / nearest / AdaRound on Fashion-MNIST, offline")
    m.add_argument("--bits", type=int, nargs="+", default=[4, 3],
                   help="weight bit widths to compare, one row each (4 3)")
    m.add_argument("--iters", type=int, default=None, help="iterations per layer")
    m.add_argument("--num-calib", type=int, default=None, help="calibration images")
    m.add_argument("--lr", type=float, default=None, help="Adam's lr for V (3 / iters)")
    m.set_defaults(func=cmd_demo)
    for command in (q, e, a, x, m):  # also accepted after the command: adaround quantize -q
        command.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars or logs")
    return parser



@contextmanager
def _terminal_logging(quiet: bool) -> Iterator[None]:
    """Library logs to stderr as plain lines for the duration of a command, then restored."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if distributed.rank() > 0:  # under torchrun: logs from process 0, errors from any
        log.setLevel(logging.ERROR)
    log.propagate = False
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while starting up ends as quietly as during a run
        parser = build_parser()
        args = parser.parse_args(argv)
        keep_freed_memory()
        # below 1: refused by check_args; unset: chosen from the machine's load
        threads = args.threads if args.threads and args.threads > 0 else choose_threads()
        if threads:
            torch.set_num_threads(threads)
    except KeyboardInterrupt:
        print("adaround: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    with distributed.launched_group():  # under torchrun: join its process group
        args.quiet = args.quiet or distributed.rank() > 0  # progress bars from process 0
        with sigterm_as_interrupt(), _terminal_logging(args.quiet):
            return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):
            check_args(args)
            return int(args.func(args))
    except (AdaRoundError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"adaround: error: {distributed.where()}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except distributed.DistributedError as exc:
        print(f"adaround: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print("adaround: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("adaround: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: keep the traceback for the report
        log.exception("internal error: %s", exc)
        return EXIT_INTERNAL

