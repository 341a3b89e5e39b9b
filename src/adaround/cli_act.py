"""`adaround quantize` options for activation quantization, block reconstruction and QDrop."""

from __future__ import annotations

import argparse
from typing import Any

from adaround.act_config import ACT_RANGES, METHODS, UNITS


def add_act_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "activations and reconstruction unit",
        "W/A quantization (e.g. --act-bits 8 is the paper's W4A8) with layer-wise AdaRound, "
        "BRECQ (--method brecq) or QDrop (--method qdrop)")
    g.add_argument("--act-bits", type=int, help="quantize every layer's input to these bits "
                   "(2-8; default: activations stay float)")
    g.add_argument("--act-range", choices=ACT_RANGES,
                   help="activation ranges from the calibration data (default: minmax for "
                   "adaround, mse for brecq/qdrop)")
    g.add_argument("--act-percentile", type=float, default=99.99,
                   help="percentile of |x| for --act-range percentile (99.99)")
    g.add_argument("--input-act-bits", type=int, help="bits of the model input (default: "
                   "--act-bits)")
    g.add_argument("--last-act-bits", type=int, help="bits of the last layer's input "
                   "(default: --act-bits)")
    g.add_argument("--first-last-act-bits", type=int, help="both of the above (the "
                   "literature keeps them at 8 for W4A4 and below, with --first-last-bits 8)")
    g.add_argument("--method", choices=METHODS,
                   help="shorthand: adaround (layer-wise), brecq (blocks, learned act steps), "
                   "qdrop (brecq + QDrop 0.5)")
    g.add_argument("--unit", choices=UNITS, help="reconstruct layer by layer or block by block")
    g.add_argument("--block", action="append", default=[], dest="blocks", metavar="NAME",
                   help="module name or glob to reconstruct as one block (repeatable; default: "
                   "blocks found automatically)")
    g.add_argument("--fisher", action="store_true",
                   help="weight the block output error by the diagonal Fisher (BRECQ)")
    g.add_argument("--qdrop", type=float, nargs="?", const=0.5,
                   help="QDrop: keep each activation quantized with this probability during "
                   "reconstruction (0.5 without a value)")
    g.add_argument("--learn-act-scale", action="store_const", const=True,
                   dest="learn_act_scale", help="learn the activation steps with the rounding")
    g.add_argument("--fixed-act-scale", action="store_const", const=False,
                   dest="learn_act_scale", help="keep the calibrated activation steps")
    g.add_argument("--act-lr", type=float, default=4e-5,
                   help="Adam learning rate of the activation steps (4e-5)")


def act_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """QuantConfig keyword arguments from the options above."""
    both = args.first_last_act_bits
    return dict(
        act_bits=args.act_bits, act_range=args.act_range, act_percentile=args.act_percentile,
        input_act_bits=args.input_act_bits if args.input_act_bits is not None else both,
        last_act_bits=args.last_act_bits if args.last_act_bits is not None else both,
        method=args.method, unit=args.unit, blocks=tuple(args.blocks), fisher=args.fisher,
        qdrop=args.qdrop, learn_act_scale=args.learn_act_scale, act_lr=args.act_lr,
    )
