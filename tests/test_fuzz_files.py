"""Fuzz: saved files (bit flips, truncation), output paths, permissions, symlinks, leftovers
of killed runs, and checkpoints (resume at several points, mismatches refused)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from fuzz_helpers import assert_fix, refused
from tiny_models import images, tiny_resnet

import adaround
import adaround.checkpoint as ck
from adaround import QuantConfig, SaveFileError
from adaround.checks import check_output_path
from adaround.errors import AdaRoundError, CheckpointError, OutputPathError
from adaround.io import atomic_write
from adaround.leftovers import SPILL_PREFIX, make_spill_folder

FAST = QuantConfig(iters=4, lr=0.5, batch_size=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("q") / "q.pt"
    adaround.save(adaround.quantize(tiny_resnet(), images(64), FAST), path)
    return path


def _header_span(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("seed", range(4))
def test_header_bit_flips_give_save_file_error(saved: Path, tmp_path: Path, seed: int) -> None:
    """Random single-bit flips in the JSON header: refused as SaveFileError, never a raw
    KeyError (a flip inside a float of the JSON may also leave an equal value: then it loads)."""
    data = saved.read_bytes()
    rng = random.Random(seed)
    model = tiny_resnet()
    for _ in range(40):
        flipped = bytearray(data)
        pos = rng.randrange(8, _header_span(data))
        flipped[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / "f.pt"
        path.write_bytes(bytes(flipped))
        try:
            adaround.load(path, model)
        except AdaRoundError as exc:
            assert isinstance(exc, SaveFileError), f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("keep", [0, 5, 9, 100, -1])
def test_truncated_files_refused(saved: Path, tmp_path: Path, keep: int) -> None:
    data = saved.read_bytes()
    path = tmp_path / "t.pt"
    path.write_bytes(data[:keep] if keep >= 0 else data[:-7])
    refused(SaveFileError, lambda: adaround.load(path, tiny_resnet()))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == mode


def test_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    out.chmod(0o640)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert out.stat().st_mode & 0o777 == 0o640 and out.read_bytes() == b"new"


def test_save_onto_a_symlink_writes_through(saved: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    real.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(real.name)
    qmodel = adaround.load(saved, tiny_resnet())
    adaround.save(qmodel, link)
    assert link.is_symlink() and real.read_bytes() == saved.read_bytes()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_tmp_of_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".out.bin.p{_dead_pid()}-abc.tmp"
    live = tmp_path / f".out.bin.p{os.getppid()}-def.tmp"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    atomic_write(tmp_path / "out.bin", lambda tmp: Path(tmp).write_bytes(b"z"))
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.bin", live.name])


def test_spill_folder_of_a_killed_run_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"{SPILL_PREFIX}p{_dead_pid()}-xyz"
    dead.mkdir()
    (dead / "1.bin").write_bytes(b"0" * 1000)
    mine = make_spill_folder(tmp_path)
    assert not dead.exists() and mine.exists()


def _under_a_file(folder: Path) -> Path:
    (folder / "file").write_text("x")
    return folder / "file" / "sub" / "out.pt"


@pytest.mark.parametrize("make, word", [
    (lambda d: d, "directory"),
    (lambda d: d / ".", "directory"),
    (_under_a_file, "file, not a folder"),
])
def test_unwritable_output_paths_refused(tmp_path: Path, make, word: str) -> None:  # type: ignore[no-untyped-def]
    refused(OutputPathError, lambda: check_output_path(make(tmp_path)), word)


def test_read_only_file_system_refused(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """EROFS as the kernel reports it (root may write anywhere else, so simulated)."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    refused(OutputPathError, lambda: check_output_path(tmp_path / "out.pt"), "Read-only")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    refused(OutputPathError, lambda: check_output_path(tmp_path / "new" / "out.pt"),
            "not writable")


def test_missing_output_folders_are_fine(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out.pt"
    check_output_path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"1"))
    assert out.read_bytes() == b"1"


def _digest(qmodel: torch.nn.Module, path: Path) -> str:
    adaround.save(qmodel, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Stop(Exception):
    pass


RESUME = {  # the config, and after how many checkpoint writes the run is stopped
    "layers": (QuantConfig(iters=30, lr=0.1, batch_size=16), (1, 3)),
    "float-inputs": (QuantConfig(iters=30, lr=0.1, batch_size=16, inputs="float"), (1,)),
    "float-sampled": (QuantConfig(iters=30, lr=0.1, batch_size=16, inputs="float",
                                  loss="sampled"), (2,)),
    "sampled": (QuantConfig(iters=30, lr=0.1, batch_size=16, loss="sampled"), (1, 4)),
    "qdrop-w4a4": (QuantConfig(iters=10, lr=0.1, batch_size=16, act_bits=4, method="qdrop"),
                   (1, 2)),
    "brecq-lsq": (QuantConfig(iters=10, lr=0.1, batch_size=16, act_bits=4, method="brecq",
                              learn_act_scale=True), (1, 2)),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_interrupted_run_resumes_to_identical_file(name: str, tmp_path: Path,
                                                   monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (cfg, stops), model, x = RESUME[name], tiny_resnet(), images(64)
    reference = _digest(adaround.quantize(model, x, cfg), tmp_path / "ref.pt")
    record = ck.Checkpoint.record
    for stop_after in stops:
        folder = tmp_path / f"ck{stop_after}"
        calls = []

        def stopping(self, *args, _calls=calls, _stop=stop_after, **kwargs):  # type: ignore[no-untyped-def]
            record(self, *args, **kwargs)
            _calls.append(1)
            if len(_calls) == _stop:
                raise _Stop

        monkeypatch.setattr(ck.Checkpoint, "record", stopping)
        with pytest.raises(_Stop):
            adaround.quantize(model, x, cfg, checkpoint_dir=folder)
        monkeypatch.setattr(ck.Checkpoint, "record", record)
        resumed = adaround.quantize(model, x, cfg, checkpoint_dir=folder)
        assert _digest(resumed, tmp_path / "res.pt") == reference, stop_after


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("ck")
    adaround.quantize(tiny_resnet(), images(64), FAST, checkpoint_dir=folder)
    return folder


@pytest.mark.parametrize("change, word", [
    (lambda: (tiny_resnet(seed=5), images(64), FAST), "model weights"),
    (lambda: (tiny_resnet(), images(64, seed=2), FAST), "calibration data"),
    (lambda: (tiny_resnet(), images(64), QuantConfig(iters=5, lr=0.5, batch_size=16)),
     "options"),
])
def test_checkpoint_of_another_run_refused(checkpointed: Path, change, word: str) -> None:  # type: ignore[no-untyped-def]
    model, x, cfg = change()
    refused(CheckpointError, lambda: adaround.quantize(model, x, cfg,
                                                       checkpoint_dir=checkpointed), word)


def test_memory_budget_may_change_between_resumes(checkpointed: Path) -> None:
    cfg = QuantConfig(iters=4, lr=0.5, batch_size=16, memory_budget_mb=64)
    adaround.quantize(tiny_resnet(), images(64), cfg, checkpoint_dir=checkpointed)


def test_corrupted_checkpoint_refused(tmp_path: Path) -> None:
    (tmp_path / ck.FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        adaround.quantize(tiny_resnet(), images(64), FAST, checkpoint_dir=tmp_path)
    assert_fix(info.value, CheckpointError, "delete")


def test_checkpoint_under_a_file_refused_before_work(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    refused(OutputPathError, lambda: adaround.quantize(tiny_resnet(), images(64), FAST,
                                                       checkpoint_dir=tmp_path / "f" / "ck"))
