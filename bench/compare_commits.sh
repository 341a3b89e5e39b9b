#!/usr/bin/env bash
# The same bench_weights rows from two commits, one after the other in one run, to show that a
# change leaves results unchanged. Usage: bench/compare_commits.sh OLD_REV [NEW_REV] [OUT.jsonl]
# (NEW_REV defaults to HEAD; each commit is checked out in a temporary git worktree).
set -euo pipefail
old=${1:?old revision}; new=${2:-HEAD}; out=${3:-bench/results/compare_commits.jsonl}
repo=$(git rev-parse --show-toplevel); out=$(realpath -m "$out")
for rev in "$old" "$new"; do
  tree=$(mktemp -d); git -C "$repo" worktree add -q --detach "$tree" "$rev"
  trap 'git -C "$repo" worktree remove --force "$tree"' EXIT
  for args in "--model resnet20 --bits 4 --grid tensor --iters 2000 --num-calib 1024" \
              "--model efficientnet_lite0 --bits 4 --grid channel --iters 500 --num-calib 200"; do
    # shellcheck disable=SC2086
    PYTHONPATH="$tree/src" OMP_NUM_THREADS=1 python "$tree/bench/bench_weights.py" $args \
        --threads 1 --json "$out"
  done
  git -C "$repo" worktree remove --force "$tree"; trap - EXIT
done
