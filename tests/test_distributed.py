"""Two processes on gloo (127.0.0.1 only) give the codes one process gives.

Each test spawns 2 processes of one thread each; the 1-process reference runs here, on one
thread too (bit-for-bit equality needs the same thread count: a multi-threaded element-wise
kernel splits its tensor at other places)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import TinyResNet, randomize_bn

import adaround
from adaround import distributed
from adaround.nn.quant_layer import QuantLayer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIGS = {
    # quadratic loss everywhere: rows split, early stop decided over all rows
    "quadratic": dict(weight_bits=3, per_channel=True, iters=500, lr=0.1, reg_weight=0.3,
                      loss="quadratic"),
    # the paper's sampled loss: batches split, gradients all-reduced
    "sampled": dict(weight_bits=3, iters=60, lr=3e-2, loss="sampled", batch_size=32),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_data() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    x = torch.randn(320, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x  # 320 samples: chunks of 128, 128, 64 -> shards of 128 and 192


def _codes(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def _run(name: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    model, x = _model_and_data()
    qmodel = adaround.quantize(model, x, adaround.QuantConfig(**CONFIGS[name]))
    return _codes(qmodel), [r.iters for r in qmodel.adaround_report]


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        if mode == "fail":
            if rank == 1:
                return  # leaves without a word: process 0 must fail, not hang
            try:
                _run("quadratic")
            except distributed.DistributedError as exc:
                Path(out, "error.txt").write_text(str(exc))
            return
        results = {name: _run(name) for name in CONFIGS}
        torch.save(results, Path(out, f"rank{rank}.pt"))
    finally:
        if mode != "fail":
            dist.destroy_process_group()


def _spawn(tmp: Path, mode: str) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp), mode), nprocs=2, join=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _spawn(tmp, "codes")
    return {r: torch.load(tmp / f"rank{r}.pt") for r in range(2)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_one_process_codes(name: str, two_processes: dict) -> None:
    reference, iters = _run(name)
    for rank in range(2):
        codes, dist_iters = two_processes[rank][name]
        assert codes.keys() == reference.keys()
        differ = sum(int((codes[k] != reference[k]).sum()) for k in codes)
        total = sum(c.numel() for c in codes.values())
        if name == "quadratic":  # rows split: bit for bit, the early stops at the same steps
            assert differ == 0, f"rank {rank}: {differ} of {total} codes differ"
            assert dist_iters == iters
            assert min(iters) < CONFIGS[name]["iters"]  # the shared early stop was exercised
        else:  # gradients summed in another order: a few codes may differ
            assert differ <= 0.01 * total, f"rank {rank}: {differ} of {total} codes differ"
    # every process holds the same whole model
    for k in two_processes[0][name][0]:
        assert torch.equal(two_processes[0][name][0][k], two_processes[1][name][0][k])


def test_a_process_that_leaves_stops_the_others(tmp_path: Path) -> None:
    _spawn(tmp_path, "fail")
    message = (tmp_path / "error.txt").read_text()
    assert "process 0 of 2" in message and "another process" in message


def test_rows_split_as_groups_and_channels() -> None:
    # no process group: one process owns everything
    assert distributed.owned_rows(16, 1) == (0, 16)
    assert distributed.owned_rows(16, 16) == (0, 16)
