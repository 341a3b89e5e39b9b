import pytest
import torch
import torch.nn.functional as F
from tiny_models import images, sequences, tiny_mixed, tiny_resnet
from torch import nn

from adaround.config import QuantConfig
from adaround.prepare import fold_batchnorms
from adaround.trace import trace_model


def test_execution_order_batchnorms_and_activations_of_a_residual_net() -> None:
    model = tiny_resnet()
    trace = trace_model(model, images(2))
    assert trace.names() == ["stem", "block.conv1", "block.conv2", "dw", "fc"]
    bns = {i.name: i.batchnorm for i in trace.layers}
    assert bns == {"stem": "bn", "block.conv1": "block.bn1", "block.conv2": "block.bn2",
                   "dw": "dw_bn", "fc": None}
    fold_batchnorms(model, trace)
    acts = {i.name: i.activation_name for i in trace_model(model, images(2)).layers}
    # conv2 feeds the residual addition, not an activation; ReLU6 is a hardtanh
    assert acts == {"stem": "relu", "block.conv1": "relu", "block.conv2": None,
                    "dw": "hardtanh", "fc": None}


def test_activation_replays_with_its_arguments_and_not_in_place() -> None:
    model = tiny_mixed()
    fold_batchnorms(model, trace_model(model, sequences(2)))
    layers = {i.name: i for i in trace_model(model, sequences(2)).layers}
    assert layers["conv1d"].activation_name == "tanh"
    leaky = layers["up"].activation
    assert layers["up"].activation_name == "leaky_relu"
    t = torch.tensor([-1.0, 2.0])
    assert leaky(t).tolist() == pytest.approx([-0.1, 2.0]) and t.tolist() == [-1.0, 2.0]
    assert layers["fc"].activation_name == "gelu"
    assert layers["head"].activation is None


def test_output_used_twice_gets_no_activation() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return F.relu(y) + y

    trace = trace_model(TwoUsers(), torch.randn(2, 4))
    assert trace.layers[0].activation is None


def test_modules_called_out_of_definition_order_and_shared_layers() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 4)
            self.early = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(self.early(x)))

    trace = trace_model(Reordered(), torch.randn(2, 4))
    assert trace.names() == ["early", "late"]
    assert [i.calls for i in trace.layers] == [2, 1]
    assert QuantConfig()  # config import kept for symmetry with other tests
