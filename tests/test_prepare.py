import copy

import pytest
import torch
from tiny_models import images, sequences, tiny_mixed, tiny_resnet
from torch import nn

from adaround.config import QuantConfig
from adaround.errors import ModelError
from adaround.prepare import fold_batchnorms, plan_layers
from adaround.trace import trace_model


@pytest.mark.parametrize("make, data", [(tiny_resnet, images), (tiny_mixed, sequences)])
def test_folding_batchnorm_leaves_outputs_unchanged(make, data) -> None:  # type: ignore[no-untyped-def]
    model = make()
    x = data(32)
    with torch.no_grad():
        before = model(x)
    folded_model = copy.deepcopy(model)
    folded = fold_batchnorms(folded_model, trace_model(folded_model, x[:2]))
    with torch.no_grad():
        after = folded_model(x)
    assert len(folded) == (4 if make is tiny_resnet else 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded_model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_plan_include_exclude_and_first_last_bits() -> None:
    model = tiny_resnet()
    trace = trace_model(model, images(2))
    names = lambda cfg: [p.name for p in plan_layers(model, trace, cfg)]  # noqa: E731
    assert names(QuantConfig(exclude=("block.*",))) == ["stem", "dw", "fc"]
    assert names(QuantConfig(include=("block.*", "fc"))) == ["block.conv1", "block.conv2", "fc"]
    bits = {p.name: p.bits for p in plan_layers(model, trace, QuantConfig(first_last_bits=8))}
    assert bits == {"stem": 8, "block.conv1": 4, "block.conv2": 4, "dw": 4, "fc": 8}
    with pytest.raises(ModelError, match="leave no layer"):
        plan_layers(model, trace, QuantConfig(include=("nothing*",)))


def test_model_without_quantizable_layers_is_refused() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(ModelError, match="no quantizable layer"):
        plan_layers(model, trace_model(model, torch.randn(2, 3)), QuantConfig())
