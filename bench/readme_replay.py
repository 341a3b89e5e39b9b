"""Run the README's shell blocks as written, in a fresh clone, and time each.

The clone goes beside the shared data (so `../shared/data` in the README resolves), each
```bash block runs with `bash -e` in the clone's root, one after another, as a user would
follow the page. One JSON line per block: its first command, exit code, seconds, last lines
of output.

    python bench/readme_replay.py --clone /work/replay --venv /work/replay-venv --skip 2 \
        --json bench/results/readme.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def blocks(readme: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.S | re.M)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clone", type=Path, required=True, help="fresh clone folder (replaced)")
    ap.add_argument("--skip", type=int, nargs="*", default=[], help="block numbers to skip")
    ap.add_argument("--venv", type=Path, help="fresh virtual environment to run in (replaced)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.venv:
        if args.venv.exists():
            shutil.rmtree(args.venv)
        subprocess.run(["python3", "-m", "venv", str(args.venv)], check=True)
        env["PATH"] = f"{args.venv / 'bin'}:{env['PATH']}"
        env["VIRTUAL_ENV"] = str(args.venv)
    if args.clone.exists():
        shutil.rmtree(args.clone)
    subprocess.run(["git", "clone", "-q", str(REPO), str(args.clone)], check=True)
    for number, block in enumerate(blocks(args.clone / "README.md"), start=1):
        if number in args.skip:
            continue
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-e", "-c", block], cwd=args.clone, text=True,
                              capture_output=True, env=env)
        row = {"block": number, "command": block.strip().splitlines()[0][:100],
               "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
               "load": round(os.getloadavg()[0], 1),
               "tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:]}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
