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
import tiny_models
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import TinyResNet, randomize_bn
from torch import nn

import adaround
from adaround import distributed
from adaround.nn.quant_layer import QuantLayer
from adaround.primitives import hard_codes
from adaround.reconstruct import loop
from adaround.reconstruct.quadratic import accumulate_moments

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIGS = {
    # quadratic loss everywhere: rows split (every layer, ROW_SPLIT_MIN 0 in `_run`), early
    # stop decided over all rows
    "quadratic": dict(weight_bits=3, per_channel=True, iters=500, lr=0.1, reg_weight=0.3,
                      loss="quadratic"),
    # the same with the tiny layers stepped whole on every process (the default threshold)
    "quadratic_whole": dict(weight_bits=3, per_channel=True, iters=500, lr=0.1,
                            reg_weight=0.3, loss="quadratic"),
    # the paper's sampled loss: batches split, gradients all-reduced
    "sampled": dict(weight_bits=3, iters=60, lr=3e-2, loss="sampled", batch_size=32),
    # BRECQ: blocks and learned activation steps, batches split, gradients all-reduced
    "brecq": dict(weight_bits=3, act_bits=4, method="brecq", iters=40, lr=3e-2),
    # inputs="float": whole layers per process, codes gathered
    "float": dict(weight_bits=3, per_channel=True, iters=300, lr=0.1, reg_weight=0.3,
                  loss="quadratic", inputs="float"),
    # QDrop: each process keeps its rows of the whole batch's masks
    "qdrop": dict(weight_bits=3, act_bits=4, method="qdrop", iters=40, lr=3e-2),
    # Fisher-weighted blocks: the weights normalised by all-reduced means
    "fisher": dict(weight_bits=3, act_bits=4, method="brecq", fisher=True, iters=40, lr=3e-2),
}
EXACT = ("quadratic", "hf_quadratic", "float")  # the 1-process codes bit for bit
RESUMED = ["quadratic", "brecq"]  # interrupted after STOP_AFTER units, then resumed
STOP_AFTER = {"quadratic": 2, "brecq": 2, "hf_quadratic": 1}  # the tiny Llama: 2 blocks


HF_CONFIGS = {  # run where transformers is installed
    "hf_quadratic": dict(iters=100, lr=3e-2, loss="quadratic", per_channel=True),
    "hf_sampled": dict(iters=40, lr=5e-2, loss="sampled", per_channel=True),
}
try:
    import transformers  # noqa: F401
    CONFIGS.update(HF_CONFIGS)
    RESUMED.append("hf_quadratic")
except ImportError:
    pass


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
    """Each layer's codes, and its grid under "<name>#scale" and "<name>#zero_point" (fitted
    by one process each on N processes: `distributed.fit_grids`)."""
    out = {}
    for n, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            out.update({n: m.codes.clone(), f"{n}#scale": m.scale.clone(),
                        f"{n}#zero_point": m.zero_point.clone()})
    return out


def _run(name: str, checkpoint_dir: Path | None = None
         ) -> tuple[dict[str, torch.Tensor], list[int]]:
    if name.startswith("hf_"):
        return _run_hf(name, checkpoint_dir)
    model, x = _model_and_data()
    threshold = distributed.ROW_SPLIT_MIN
    distributed.ROW_SPLIT_MIN = 0 if name == "quadratic" else threshold
    try:
        qmodel = adaround.quantize(model, x, adaround.QuantConfig(**CONFIGS[name]),
                                   checkpoint_dir=checkpoint_dir)
    finally:
        distributed.ROW_SPLIT_MIN = threshold
    return _codes(qmodel), [r.iters for r in qmodel.adaround_report]


def _run_hf(name: str, checkpoint_dir: Path | None = None
            ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A tiny random Llama, block by block (quantize_hf): 4 batches of padded sentences."""
    from tiny_hf import padded_batch, tiny_llama

    from adaround.hf import HFOptions, quantize_hf

    model = tiny_llama()
    qmodel = quantize_hf(model, padded_batch(32, 10),
                         adaround.QuantConfig(**HF_CONFIGS[name]), HFOptions(forward_batch=8),
                         checkpoint_dir=checkpoint_dir)
    return _codes(qmodel), [r.iters for r in qmodel.adaround_report]


class _Stopped(Exception):
    """Raised on every process after STOP_AFTER units: the job killed there."""


def _interrupt_and_resume(name: str, out: Path, rank: int
                          ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A 2-process run stopped after STOP_AFTER[name] units (each process raises once the unit is
    recorded, as a job killed then), its progress kept for the 1-process resume below, then
    the same run again: it resumes from the folder both processes share."""
    from adaround import checkpoint

    folder = out / f"ck_{name}"
    record = checkpoint.Checkpoint.record

    def stop_after(self: checkpoint.Checkpoint, *args: object) -> None:
        record(self, *args)
        if len(self.done) == STOP_AFTER[name]:
            raise _Stopped

    checkpoint.Checkpoint.record = stop_after  # type: ignore[method-assign]
    try:
        _run(name, folder)
        raise AssertionError("the run was not interrupted")
    except _Stopped:
        pass
    finally:
        checkpoint.Checkpoint.record = record  # type: ignore[method-assign]
    dist.barrier()  # a restarted job: process 0's last write is done
    if rank == 0:
        partial = out / f"partial_{name}"
        partial.mkdir()
        (partial / checkpoint.FILE).write_bytes((folder / checkpoint.FILE).read_bytes())
    return _run(name, folder)


def _local_folders(out: Path, rank: int) -> str:
    """Each process given a folder of its own (not shared): process 0's holds progress, process
    1's none; refused on both."""
    folder = out / f"local{rank}"
    folder.mkdir()
    if rank == 0:
        (folder / "progress.pt").write_bytes((out / "partial_quadratic/progress.pt").read_bytes())
    model, x = _model_and_data()
    try:
        adaround.quantize(model, x, adaround.QuantConfig(**CONFIGS["quadratic"]),
                          checkpoint_dir=folder)
        return "accepted"
    except distributed.DistributedError as exc:
        return str(exc)


def _shard_fisher_weights() -> tuple[int, torch.Tensor]:
    """This process's Fisher weights at the residual block: (first sample, weights)."""
    from adaround.distributed_units import shared_mean
    from adaround.reconstruct.block_data import fisher_weights

    model, x = _model_and_data()
    part = distributed.shard(list(x.split(128)))
    return part.offset, fisher_weights(model.eval(), "block", part.chunks, shared_mean)


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
        results: dict = {name: _run(name) for name in CONFIGS}
        for name in RESUMED:
            results[f"resumed_{name}"] = _interrupt_and_resume(name, Path(out), rank)
        results["not_shared"] = _local_folders(Path(out), rank)
        results["fisher_weights"] = _shard_fisher_weights()
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
    return {"folder": tmp, **{r: torch.load(tmp / f"rank{r}.pt") for r in range(2)}}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_give_the_one_process_codes(name: str, two_processes: dict) -> None:
    reference, iters = _run(name)
    for rank in range(2):
        codes, dist_iters = two_processes[rank][name]
        codes = dict(codes)  # the fixture's stays whole for the other tests
        assert codes.keys() == reference.keys()
        for k in [k for k in codes if "#" in k]:  # the grids: the 1-process ones, exactly
            assert torch.equal(codes.pop(k), reference[k]), f"rank {rank}: {k}"
        differ = sum(int((codes[k] != reference[k]).sum()) for k in codes)
        total = sum(c.numel() for c in codes.values())
        if name in EXACT:  # rows split or whole layers:
            # bit for bit, same steps
            assert differ == 0, f"rank {rank}: {differ} of {total} codes differ"
            assert dist_iters == iters
            if name == "quadratic":  # the shared early stop was exercised
                assert min(iters) < CONFIGS[name]["iters"]
        else:  # gradients summed in another order: a few codes may differ
            assert dist_iters == iters
            assert differ <= 0.01 * total, f"rank {rank}: {differ} of {total} codes differ"
    # every process holds the same whole model
    for k in two_processes[0][name][0]:
        assert torch.equal(two_processes[0][name][0][k], two_processes[1][name][0][k])


@pytest.mark.parametrize("name", RESUMED)
def test_an_interrupted_two_process_run_resumes_to_the_one_process_codes(
        name: str, two_processes: dict) -> None:
    reference, iters = _run(name)
    total = sum(c.numel() for c in reference.values())
    for rank in range(2):
        codes, resumed_iters = two_processes[rank][f"resumed_{name}"]
        # the resumed run is the uninterrupted 2-process run, bit for bit ...
        uninterrupted, _ = two_processes[rank][name]
        for k in codes:
            assert torch.equal(codes[k], uninterrupted[k]), f"rank {rank}: {k}"
        # ... which is the 1-process run (rows split: exactly; blocks: a few codes may differ)
        assert resumed_iters == iters
        differ = sum(int((codes[k] != reference[k]).sum()) for k in codes)
        assert differ <= (0 if name in EXACT else 0.01 * total), f"{differ} differ"


@pytest.mark.parametrize("name", RESUMED)
def test_a_two_process_checkpoint_resumes_in_one_process(
        name: str, two_processes: dict, tmp_path: Path) -> None:
    """The number of processes may change between runs: the codes do not depend on it."""
    partial = two_processes["folder"] / f"partial_{name}" / "progress.pt"
    (tmp_path / "progress.pt").write_bytes(partial.read_bytes())
    assert len(torch.load(partial, weights_only=False)["done"]) == STOP_AFTER[name]
    codes, resumed_iters = _run(name, tmp_path)
    reference, iters = _run(name)
    differ = sum(int((codes[k] != reference[k]).sum()) for k in codes)
    total = sum(c.numel() for c in codes.values())
    assert resumed_iters == iters
    assert differ <= (0 if name in EXACT else 0.01 * total), f"{differ} differ"


def test_fisher_weights_are_normalised_over_all_processes(two_processes: dict) -> None:
    """Each process's rows of the 1-process weights (means of |g| and of the damped weights
    over all data, not over the shard: here a shard's own means move weights by up to 1 %)."""
    from adaround.reconstruct.block_data import fisher_weights

    model, x = _model_and_data()
    whole = fisher_weights(model.eval(), "block", list(x.split(128)))
    for rank in range(2):
        offset, weights = two_processes[rank]["fisher_weights"]
        torch.testing.assert_close(weights, whole[offset:offset + len(weights)], rtol=1e-5,
                                   atol=0)


def test_a_checkpoint_folder_not_shared_is_refused(two_processes: dict) -> None:
    for rank in range(2):
        message = two_processes[rank]["not_shared"]
        assert f"process {rank} of 2" in message
        assert "process 0: 2, process 1: 0" in message and "storage all processes" in message


def test_a_process_that_leaves_stops_the_others(tmp_path: Path) -> None:
    _spawn(tmp_path, "fail")
    message = (tmp_path / "error.txt").read_text()
    assert "process 0 of 2" in message and "another process" in message


@pytest.mark.parametrize("c_out, groups", [(16, 1), (7, 1), (24, 24), (30, 5), (2, 2)])
def test_rows_split_into_contiguous_runs_of_whole_groups(c_out: int, groups: int) -> None:
    for w in (1, 2, 3, 8):
        runs = [distributed.owned_rows(c_out, groups, r, w) for r in range(w)]
        assert runs[0][0] == 0 and runs[-1][1] == c_out
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(runs, runs[1:]))
        if groups > 1:  # whole groups: a group shares one moment matrix
            assert all(lo % (c_out // groups) == 0 for lo, _ in runs)


LAYERS = [  # (layer, input shape): rows whose boundaries fall off the CPU vector stride
    (nn.Linear(300, 100), (64, 300)),
    (nn.Conv2d(20, 30, 3, groups=5), (16, 20, 8, 8)),
    (nn.Conv2d(24, 24, 3, padding=1, groups=24), (16, 24, 8, 8)),  # depthwise
]


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_each_share_steps_its_weights_bit_for_bit_as_the_whole_layer(
        index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only the codes: V itself, after every step, equals the 1-process V (it would not
    without the ALIGN windows: the last elements of a tensor take a scalar path)."""
    layer, shape = LAYERS[index]
    torch.manual_seed(index)
    qlayer = QuantLayer(layer, 3, True, True)
    qlayer.fit_grid("mse")
    x = torch.randn(shape)
    moments = accumulate_moments(layer, [(x + 0.1 * torch.randn(shape), x)])
    final_v: list[torch.Tensor] = []

    def keep_v(w_floor: torch.Tensor, v: torch.Tensor, *args: object) -> torch.Tensor:
        final_v.append(v.reshape(-1).clone())
        return hard_codes(w_floor, v, *args)

    monkeypatch.setattr(loop, "hard_codes", keep_v)
    cfg = adaround.QuantConfig(weight_bits=3, per_channel=True, iters=120, lr=1e-2,
                               early_stop=False)
    whole = loop.run_rounding(qlayer, loop.Objective(loop.QuadraticLoss(qlayer, moments)),
                              cfg)[0].reshape(-1)
    for r in range(2):
        owned, codes, _ = distributed.round_share(qlayer, moments, cfg, r, 2)
        start = owned.start // distributed.ALIGN * distributed.ALIGN
        v = final_v[-1][owned.start - start:owned.stop - start]
        assert torch.equal(v, final_v[0][owned]), f"share {r}: V differs from the whole layer's"
        assert torch.equal(codes, whole[owned])


def test_torchrun_command_line_writes_the_one_process_file(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m adaround quantize ... --checkpoint DIR`: one file, from
    process 0, with the 1-process codes; each layer logged once; the progress folder removed
    once the file is written."""
    import subprocess
    import sys

    import numpy as np

    from adaround.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (320, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 4, 320))
    args = ["quantize", "tiny_models:tiny_resnet", "--calib", str(data), "--num-calib", "320",
            "--bits", "3", "--per-channel", "--loss", "quadratic", "--iters", "300",
            "--lr", "0.02"]
    assert main(["-q", *args, "-o", str(tmp_path / "one.pt")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                           *[p for p in sys.path if p.endswith("src")],
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "adaround", "--threads", "1", *args, "-o", str(tmp_path / "two.pt"),
         "--checkpoint", str(tmp_path / "progress")],
        env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("quantized 5 layers") == 1
    assert run.stderr.count("block.conv1 (W3") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "one.pt", "two.pt"]
    one = adaround.load(tmp_path / "one.pt", tiny_models.tiny_resnet())
    two = adaround.load(tmp_path / "two.pt", tiny_models.tiny_resnet())
    assert _codes(one).keys() == _codes(two).keys()
    for name, codes in _codes(one).items():
        assert torch.equal(codes, _codes(two)[name]), name


@pytest.mark.parametrize("shape, channels_last", [((8, 4, 3, 5), True), ((8, 4, 3, 5), False),
                                                  ((8 * 3, 7), False)])
def test_qdrop_rows_are_the_rows_of_the_whole_batch_mask(shape: tuple, channels_last: bool
                                                         ) -> None:
    """A process holding samples 1, 4 and 5 of a batch of 8 keeps the elements one process
    keeps there, and leaves the generator where one process leaves it."""
    from adaround.nn.act_quant import BatchRows, qdrop_mask, qdrop_rows

    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    per = shape[0] // 8  # rows of x per sample: 3 for the [samples * tokens, features] input
    g_one, g_part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = qdrop_mask(x, 0.5, g_one)
    positions = torch.tensor([1, 4, 5])
    rows = torch.cat([torch.arange(p * per, (p + 1) * per) for p in positions.tolist()])
    mine = x[rows]  # in the layout one process's activations have: the same ops made them
    if channels_last:
        mine = mine.contiguous(memory_format=torch.channels_last)
    part = qdrop_rows(mine, 0.5, g_part, BatchRows(positions, 8))
    assert torch.equal(part, whole[rows])
    assert torch.equal(g_one.get_state(), g_part.get_state())


def test_qdrop_refuses_an_activation_not_batch_first() -> None:
    from adaround.nn.act_quant import BatchRows, qdrop_rows

    with pytest.raises(adaround.ConfigError, match="batch first"):
        qdrop_rows(torch.randn(5, 3), 0.5, None, BatchRows(torch.tensor([0, 1]), 4))


def test_whole_layers_go_to_the_least_loaded_process() -> None:
    from adaround.distributed_whole import assign

    assert assign([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]
    assert assign([5, 5, 5], 2) == [0, 1, 0]
    assert assign([3], 4) == [0]


def test_qdrop_split_refuses_an_activation_shared_by_all_samples() -> None:
    """An input that does not grow with the batch (a table every sample shares) has no rows
    per sample to keep: refused by name before any step."""
    from adaround.nn.act_quant import ActQuant
    from adaround.reconstruct.block import check_batch_first

    per_sample, shared = ActQuant(4, True), ActQuant(4, True)
    table = torch.randn(5, 3)

    class Objective:
        target = torch.zeros(4, 3)

        def loss(self, params: dict, idx: torch.Tensor) -> None:
            per_sample(torch.randn(len(idx) * 2, 3))  # two rows per sample: fine
            shared(table)

    check_batch_first(Objective(), {"block.fc": per_sample})  # type: ignore[arg-type]
    with pytest.raises(adaround.ConfigError, match="input of block.table does not grow"):
        check_batch_first(Objective(), {"block.fc": per_sample,  # type: ignore[arg-type]
                                        "block.table": shared})


@pytest.mark.parametrize("local, count, cpus, threads, expected", [
    (1, 2, [0, 1, 2, 3], 2, [2, 3]),  # process 1 of 2 on 4 CPUs: the second pair
    (0, 2, [4, 5], 1, [4]),  # the CPUs this process may use, not 0..n
    (1, 2, [0, 1, 2], 1, None),  # 3 CPUs do not split in 2: left alone
    (0, 2, [0, 1], 2, None),  # 2 threads would share 1 CPU: left alone
    (0, 1, [0, 1], 1, None),  # one process: left alone
])
def test_pin_to_cores_gives_each_local_process_its_own_cpus(
        local: int, count: int, cpus: list[int], threads: int, expected: list[int] | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: list[list[int]] = []
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(count))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mask: pinned.append(list(mask)),
                        raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    distributed.pin_to_cores()
    assert pinned == ([] if expected is None else [expected])
