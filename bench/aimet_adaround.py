"""AdaRound with aimet-torch (the authors' toolkit) on CIFAR-10 ResNet-20/56 or EfficientNet-Lite0.

Run it with the python of the throwaway venv made by ``bench/aimet_venv.sh`` (never a
dependency of this project; adaround is not installed there):

    bash bench/aimet_venv.sh /work/aimet-venv
    OMP_NUM_THREADS=1 /work/aimet-venv/bin/python bench/aimet_adaround.py --threads 1 \
        --bits 4 --num-calib 1024 --iters 2000

It uses the same model, calibration images and test set as
``bench/bench_weights.py --model resnet20 --grid tensor --rounding adaround``: the pretrained
ResNet-20 from the shared data, ``--num-calib`` images of ``cifar10_train5k.npz`` picked by
``torch.randperm`` seeded with ``--seed``, and the CIFAR-10 test split. Only the repo's
data/model loaders are imported (``adaround.models``, ``adaround.data``), without running the
package ``__init__``, so none of our quantization code is loaded.

The aimet flow is the one its AdaRound documentation recommends: ``prepare_model`` (functional
ReLUs become modules, so the loss is taken after the activation where one follows), batch-norm
folding with ``fold_all_batch_norms``, ``Adaround.apply_adaround``, then a ``QuantizationSimModel``
of the AdaRounded model with the exported parameter encodings set and frozen.

Weights: ``--bits`` (default 4), symmetric, one scale per tensor (``--grid tensor``), all Conv
and Linear layers, biases unquantized: aimet's ``default_config.json``, passed explicitly to
every QuantSim and to AdaRound (with no config file aimet 2.x takes its per-channel config;
the script checks that each weight quantizer has one scale). The range is aimet's
``--quant-scheme`` (default ``tf_enhanced``, aimet's AdaRound default, an SQNR range search
comparable to our MSE search; ``tf`` is min/max). Nearest rounding is evaluated on the same grid
(the same scheme on the same folded weights; the script checks that the scales agree, and logs
how many weights AdaRound rounds differently).

Activations stay FP32, as in bench_weights.py: aimet's AdaRound always removes the input and
output quantizers of its own QuantSim; aimet's config files cannot switch output quantization
off in their defaults ("not supported"), so the two evaluation QuantSims get their input/output
quantizers removed the same way after construction.

Logs go to stderr (aimet's logger writes to stdout, so fd 1 is pointed at stderr while the
run is in progress); stdout gets one JSON line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

START = time.perf_counter()
REPO_SRC = Path(__file__).resolve().parents[1] / "src"
log = logging.getLogger("aimet_adaround")


def _repo_helpers():  # type: ignore[no-untyped-def]
    """Import the repo's model and data loaders from ``src`` without installing adaround.

    A bare ``adaround`` package module (path = src/adaround) is registered so that importing
    ``adaround.models.cifar_resnet`` and ``adaround.data.files`` does not run
    ``adaround/__init__.py`` (which imports the quantization code); they need only torch,
    numpy and pillow.
    """
    if "adaround" not in sys.modules:
        pkg = types.ModuleType("adaround")
        pkg.__path__ = [str(REPO_SRC / "adaround")]
        sys.modules["adaround"] = pkg
    from adaround.data import files
    from adaround.models import cifar_resnet

    return files, cifar_resnet


def default_data_root() -> str:
    env = os.environ.get("ADAROUND_DATA")
    if env:
        return env
    files, _ = _repo_helpers()
    return str(files.data_root())


def load_cifar(root: Path, n_calib: int, seed: int, n_eval: int | None,  # type: ignore[no-untyped-def]
               name: str = "resnet20"):
    """ResNet-20/56, calibration images and test set exactly as bench_weights.load_cifar."""
    import torch

    files, cifar = _repo_helpers()
    weights = root / "cifar10" / f"{name}.th"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is absent: pass --data-root or set ADAROUND_DATA")
    model = getattr(cifar, name)(weights)
    pool, _ = files.load_array_file(root / "cifar10" / "cifar10_train5k.npz",
                                    mean=cifar.CIFAR_MEAN, std=cifar.CIFAR_STD)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n_calib]
    x_test, y_test = files.load_array_file(root / "cifar10" / "cifar10_test.npz",
                                           mean=cifar.CIFAR_MEAN, std=cifar.CIFAR_STD)
    if n_eval is not None:
        x_test, y_test = x_test[:n_eval], y_test[:n_eval]
    return model, pool[pick].contiguous(), x_test, y_test


def load_effnet(root: Path, n_calib: int, seed: int, n_eval: int | None):  # type: ignore[no-untyped-def]
    """EfficientNet-Lite0 and the ImageNet sample exactly as bench_weights.load_effnet (the
    same 200 / 800 split), with its TensorFlow-"SAME" convolutions rewritten for aimet."""
    import torch

    _repo_helpers()
    from adaround.data.files import imagenet_sample_split
    from adaround.models.efficientnet import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        efficientnet_lite0,
    )

    model = efficientnet_lite0()
    x_calib, x_eval, y_eval = imagenet_sample_split(
        root / "imagenet-sample", n_calib=n_calib, seed=seed, mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD)
    if n_eval is not None:
        x_eval, y_eval = x_eval[:n_eval], y_eval[:n_eval]
    plain = plain_same_convs(copy.deepcopy(model))
    with torch.no_grad():  # the rewrite computes the same network
        gap = (plain(x_eval[:8]) - model(x_eval[:8])).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"rewritten EfficientNet-Lite0 differs from the package's by {gap}")
    return plain, x_calib, x_eval, y_eval


def plain_same_convs(model):  # type: ignore[no-untyped-def]
    """Each ``Conv2dStaticSamePadding`` (an nn.Conv2d subclass that pads in its own forward,
    which aimet's quantized Conv2d would drop) as ``Sequential(ZeroPad2d, Conv2d)`` with the
    same weights; the ReLU6 instances the package shares between activations made distinct."""
    from torch import nn

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ == "Conv2dStaticSamePadding":
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 stride=child.stride, padding=0, dilation=child.dilation,
                                 groups=child.groups, bias=child.bias is not None)
                conv.load_state_dict({k: v for k, v in child.state_dict().items()
                                      if not k.startswith("static_padding")})
                pad = child.static_padding
                setattr(module, child_name, nn.Sequential(
                    nn.ZeroPad2d(pad.padding) if isinstance(pad, nn.ZeroPad2d) else nn.Identity(),
                    conv))
            elif isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.ReLU6())
    return model.eval()


def top1(model, x, y, batch_size: int = 250) -> float:  # type: ignore[no-untyped-def]
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


def disable_activation_quantizers(sim) -> dict:  # type: ignore[no-untyped-def]
    """Weights only: drop every input/output quantizer; return {module name: weight quantizer}.

    aimet's config rejects ``is_output_quantized: False`` in its defaults ("not supported"), so
    this does what aimet's own AdaRound does to its QuantSim (``_compute_param_encodings``):
    the input and output quantizer lists become ``None`` entries.
    """
    from aimet_torch.nn import BaseQuantizationMixin
    from torch import nn

    out = {}
    for name, m in sim.model.named_modules():
        if isinstance(m, BaseQuantizationMixin):
            m.input_quantizers = nn.ModuleList([None for _ in m.input_quantizers])
            m.output_quantizers = nn.ModuleList([None for _ in m.output_quantizers])
            q = m.param_quantizers["weight"] if "weight" in m.param_quantizers else None
            if q is not None:
                out[name] = q
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None,
                   help="shared data folder (default: $ADAROUND_DATA or ../shared/data)")
    p.add_argument("--model", choices=["resnet20", "resnet56", "efficientnet_lite0"],
                   default="resnet20")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32,
                   help="calibration data-loader batch size (aimet's AdaRound draws 32 samples "
                        "per iteration from the cached activations whatever this is)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-eval", type=int, default=None,
                   help="evaluate on the first N test images (default: all 10000)")
    p.add_argument("--grid", choices=["tensor", "channel"], default="tensor",
                   help="one weight scale per tensor (the comparison's setting) or per channel")
    p.add_argument("--quant-scheme", choices=["tf_enhanced", "tf"], default="tf_enhanced",
                   help="aimet's weight range setting (tf_enhanced: aimet's AdaRound default)")
    args = p.parse_args()

    # aimet's loggers write to stdout: point fd 1 at stderr for the run, keep the real stdout
    # for the final JSON line.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    t_import = time.perf_counter()
    from importlib.metadata import version

    from aimet_torch.adaround import Adaround, AdaroundParameters
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.common.quantsim_config.utils import (
        get_path_for_per_channel_config,
        get_path_for_per_tensor_config,
    )
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    aimet_version = version("aimet-torch")
    log.info("aimet-torch %s, torch %s, %d threads (aimet import %.1f s)", aimet_version,
             torch.__version__, torch.get_num_threads(), time.perf_counter() - t_import)

    root = Path(args.data_root or default_data_root())
    try:
        if args.model == "efficientnet_lite0":
            model, calib, x_test, y_test = load_effnet(root, args.num_calib, args.seed,
                                                       args.num_eval)
        else:
            model, calib, x_test, y_test = load_cifar(root, args.num_calib, args.seed,
                                                      args.num_eval, args.model)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    log.info("data %s: %d calibration images, %d test images", root, len(calib), len(x_test))
    scheme = QuantScheme.from_str(args.quant_scheme)
    # aimet's config files: symmetric weights, biases unquantized. Pass one explicitly: with
    # config_file=None aimet 2.x takes default_config_per_channel.json, per-channel weights.
    per_channel = args.grid == "channel"
    config = (get_path_for_per_channel_config() if per_channel
              else get_path_for_per_tensor_config())
    dummy = calib[:1].clone()

    fp_top1 = top1(model, x_test, y_test)
    log.info("FP32 top-1 %.2f", fp_top1)

    prepared = prepare_model(copy.deepcopy(model).eval())
    folded = fold_all_batch_norms(prepared, input_shapes=tuple(dummy.shape), dummy_input=dummy)
    log.info("folded %d batch norms; folded FP32 top-1 %.2f", len(folded),
             top1(prepared, x_test, y_test))

    def calib_forward(m, _):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for i in range(0, len(calib), args.batch_size):
                m(calib[i:i + args.batch_size])

    with tempfile.TemporaryDirectory(prefix="aimet_adaround_") as tmp:
        # nearest rounding on aimet's grid
        near = QuantizationSimModel(copy.deepcopy(prepared), dummy_input=dummy,
                                    quant_scheme=scheme, default_param_bw=args.bits,
                                    config_file=config)
        near_q = disable_activation_quantizers(near)
        near.compute_encodings(calib_forward, None)
        for name, q in near_q.items():
            scale = q.get_scale()
            if scale is None or (scale.numel() > 1) != per_channel:
                raise RuntimeError(f"{name}: the weight quantizer is not per-{args.grid} "
                                   f"(scale {None if scale is None else tuple(scale.shape)})")
        nearest_top1 = top1(near.model, x_test, y_test)
        log.info("nearest W%d per-%s (%s, %d weight quantizers) top-1 %.2f", args.bits,
                 args.grid, args.quant_scheme, len(near_q), nearest_top1)
        near_scales = {n: q.get_scale().detach().clone() for n, q in near_q.items()}
        del near

        # AdaRound
        loader = torch.utils.data.DataLoader(calib, batch_size=args.batch_size, shuffle=False)
        params = AdaroundParameters(data_loader=loader, num_batches=len(loader),
                                    default_num_iterations=args.iters)
        t0 = time.perf_counter()
        ada_model = Adaround.apply_adaround(model=prepared, dummy_input=dummy, params=params,
                                            path=tmp, filename_prefix="adaround",
                                            default_param_bw=args.bits,
                                            default_quant_scheme=scheme,
                                            default_config_file=config)
        adaround_seconds = time.perf_counter() - t0
        log.info("AdaRound (%d iterations per layer): %.1f s", args.iters, adaround_seconds)

        sim = QuantizationSimModel(ada_model, dummy_input=dummy, quant_scheme=scheme,
                                   default_param_bw=args.bits, config_file=config)
        ada_q = disable_activation_quantizers(sim)
        # aimet's documented AdaRound flow (deprecated in 2.x in favour of quantizer state
        # dicts, which apply_adaround does not return): load the exported weight encodings
        # and freeze them. The soft-rounded weights it returns are then rounded onto the grid.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sim.set_and_freeze_param_encodings(os.path.join(tmp, "adaround.encodings"))
        sim.compute_encodings(calib_forward, None)
        same_grid = True
        flipped = total = 0
        fp_modules = dict(prepared.named_modules())
        ada_modules = dict(ada_model.named_modules())
        for name, q in ada_q.items():
            scale = q.get_scale().detach()
            if not torch.allclose(scale, near_scales[name], rtol=1e-5):
                same_grid = False
                log.warning("%s: AdaRound scale %s differs from the nearest grid %s", name,
                            scale.flatten().tolist(), near_scales[name].flatten().tolist())
            w_fp = fp_modules[name].weight.detach()
            w_ada = ada_modules[name].weight.detach()
            flipped += int((torch.round(w_fp / scale) != torch.round(w_ada / scale)).sum())
            total += w_fp.numel()
        log.info("AdaRound rounded %.2f %% of the %d weights differently from nearest",
                 100.0 * flipped / max(total, 1), total)
        adaround_top1 = top1(sim.model, x_test, y_test)
        log.info("AdaRound W%d per-%s top-1 %.2f", args.bits, args.grid, adaround_top1)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "tool": "aimet-torch", "version": aimet_version, "model": args.model,
        "bits": args.bits, "grid": args.grid, "quant_scheme": args.quant_scheme,
        "num_calib": len(calib), "iters": args.iters, "batch_size": args.batch_size,
        "eval_samples": len(x_test), "seed": args.seed, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "fp_top1": fp_top1, "nearest_top1": nearest_top1,
        "adaround_top1": adaround_top1, "same_grid": same_grid,
        "flipped_fraction": round(flipped / max(total, 1), 5),
        "adaround_seconds": round(adaround_seconds, 3),
        "total_seconds": round(time.perf_counter() - START, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
    }
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    return 0 if all(math.isfinite(v) for v in (fp_top1, nearest_top1, adaround_top1)) else 1


if __name__ == "__main__":
    sys.exit(main())
