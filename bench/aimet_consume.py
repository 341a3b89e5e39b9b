"""AIMET hand-over, aimet side: load `export_aimet`'s files into aimet-torch as a user would
and compare its QuantSim's predictions with adaround's simulated model.

Run with the python of the throwaway venv (bench/aimet_venv.sh; adaround is not installed
there, only the repo's ResNet-20 and data loaders are imported from src/):

    python bench/aimet_export.py --out /tmp/aimet_handover --iters 300 --threads 1
    OMP_NUM_THREADS=1 /work/aimet-venv/bin/python bench/aimet_consume.py \
        --dir /tmp/aimet_handover --threads 1

For every setting folder: the user's ResNet-20 (pretrained weights), aimet's `prepare_model`
and `fold_all_batch_norms`, `load_state_dict(torch.load("model.pth"))` (strict),
`QuantizationSimModel(model, dummy, config_file="model_quantsim_config.json")`,
`sim.load_encodings("model_torch.encodings", strict=True, partial=False)`: the code block of
docs/aimet.md, read from that page and run as it is. Then top-1 of the sim on the CIFAR-10
test set, the number of predictions that differ from adaround's (`logits.npy`) and the largest
logit difference. One JSON line per setting on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from aimet_adaround import default_data_root, load_cifar  # noqa: E402

log = logging.getLogger("aimet_consume")


DOC = Path(__file__).resolve().parents[1] / "docs" / "aimet.md"


def doc_snippet(heading: str = "## Load (aimet-torch side)") -> str:
    """The first python block under `heading` in docs/aimet.md: the loading code users copy."""
    text = DOC.read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def load_into_aimet(folder: Path, model, dummy):  # type: ignore[no-untyped-def]
    """Run docs/aimet.md's loading code on the user's model; returns its `sim`."""
    scope = {"model": model, "dummy": dummy, "folder": str(folder)}
    exec(compile(doc_snippet(), str(DOC), "exec"), scope)  # noqa: S102
    return scope["sim"]


def count_quantizers(sim) -> dict:  # type: ignore[no-untyped-def]
    from aimet_torch.nn import BaseQuantizationMixin

    counts = {"param": 0, "input": 0, "output": 0}
    for m in sim.model.modules():
        if isinstance(m, BaseQuantizationMixin):
            counts["param"] += sum(q is not None for q in m.param_quantizers.values())
            counts["input"] += sum(q is not None for q in m.input_quantizers)
            counts["output"] += sum(q is not None for q in m.output_quantizers)
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="output folder of bench/aimet_export.py")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # aimet logs to stdout
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.data_root or default_data_root())
    for folder in sorted(Path(args.dir).iterdir()):
        if not (folder / "model.pth").exists():
            continue
        start = time.perf_counter()
        model, _, x_test, y_test = load_cifar(root, 1, 0, None)
        sim = load_into_aimet(folder, model, x_test[:1].clone())
        with torch.no_grad():
            out = torch.cat([sim.model(x_test[i:i + 500]) for i in range(0, len(x_test), 500)])
        out = out.as_subclass(torch.Tensor).numpy()
        ours = np.load(folder / "logits.npy")
        setting = json.loads((folder / "setting.json").read_text())
        row = {
            "setting": folder.name, "n": len(x_test),
            "aimet_top1": round(float((out.argmax(1) == y_test.numpy()).mean() * 100), 2),
            "adaround_top1": round(setting["top1"], 2),
            "prediction_differences": int((out.argmax(1) != ours.argmax(1)).sum()),
            "max_logit_diff": float(np.abs(out - ours).max()),
            "quantizers": count_quantizers(sim),
            "seconds": round(time.perf_counter() - start, 1),
        }
        json_out.write(json.dumps(row) + "\n")
        json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
