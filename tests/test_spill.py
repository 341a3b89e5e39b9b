import logging
from pathlib import Path

import pytest
import torch
from tiny_models import images, tiny_resnet

import adaround
from adaround import QuantConfig, QuantLayer
from adaround.errors import ConfigError
from adaround.reconstruct import spill
from adaround.reconstruct.spill import SpillStore


def test_spilled_tensor_reads_back_whole_by_rows_slices_and_chunks(tmp_path: Path) -> None:
    store = SpillStore(0, directory=str(tmp_path))
    t = torch.randn(10, 3, 4)
    s = store.put(t)
    assert s.shape == t.shape and s.nbytes == t.nbytes and len(s) == 10
    assert torch.equal(s.load(), t)
    idx = torch.tensor([7, 0, 7, 3])
    assert torch.equal(s[idx], t[idx])
    assert torch.equal(s[2:9][1:3].load(), t[3:5])
    assert [c.shape[0] for c in s[1:].split(4)] == [4, 4, 1]
    assert torch.equal(torch.cat(list(s.split(4))), t)
    rows = store.write_rows(t.split(3))
    assert torch.equal(rows.load(), t)
    store.close()
    assert not any(tmp_path.iterdir())


def test_fit_spills_the_largest_values_first_until_within_budget(tmp_path: Path) -> None:
    store = SpillStore(budget_bytes=2000, directory=str(tmp_path))
    env = {"big": torch.zeros(1000), "mid": torch.zeros(500), "small": torch.zeros(100),
           "kept": torch.zeros(2000)}
    store.fit([env], keys=lambda k: k != "kept")  # 6400 bytes counted: "kept" is not cached
    assert isinstance(env["big"], spill.Spilled) and isinstance(env["mid"], spill.Spilled)
    assert isinstance(env["small"], torch.Tensor) and isinstance(env["kept"], torch.Tensor)
    store.close()


def _codes(qmodel: torch.nn.Module) -> list[torch.Tensor]:
    return [m.codes for m in qmodel.modules() if isinstance(m, QuantLayer)]


@pytest.mark.parametrize("options", [
    dict(loss="sampled"), dict(loss="quadratic"),
    dict(act_bits=4, method="qdrop"),  # the unit loop: a block and single layers
])
def test_a_memory_budget_spills_to_disk_and_gives_the_same_codes(options, caplog) -> None:  # type: ignore[no-untyped-def]
    model, x = tiny_resnet(), images(96)
    cfg = dict(weight_bits=3, iters=60, batch_size=16, **options)
    free = adaround.quantize(model, x, QuantConfig(**cfg))
    with caplog.at_level(logging.INFO, logger="adaround"):
        tight = adaround.quantize(model, x, QuantConfig(memory_budget_mb=0.01, **cfg))
    assert "of cached activations to disk" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(_codes(free), _codes(tight)))
    assert [r.loss_adaround for r in free.adaround_report] == pytest.approx(
        [r.loss_adaround for r in tight.adaround_report], rel=1e-5)


def test_memory_budget_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        QuantConfig(memory_budget_mb=0)
