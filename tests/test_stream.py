import copy

import pytest
import torch
from tiny_models import (
    TinyMobileNet,
    TinyTransformer,
    images,
    sequences,
    tiny_mixed,
    tiny_resnet,
    tokens,
)
from torch import nn

import adaround
from adaround.api import prepare_float
from adaround.config import QuantConfig
from adaround.prepare import plan_layers, swap_in_quant_layers
from adaround.reconstruct.stream import GraphEngine, RerunEngine, make_engine
from adaround.reconstruct.units import units_of


def _prepared(model: nn.Module, x: torch.Tensor, cfg: QuantConfig):  # type: ignore[no-untyped-def]
    """FP model with BN folded, its trace and layer plans, and a quantized twin (all layers
    float)."""
    fp, trace, _ = prepare_float(model, x, cfg)
    plans = plan_layers(fp, trace, cfg)
    return fp, trace, plans, swap_in_quant_layers(copy.deepcopy(fp), plans, cfg)


def _two_engines(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """(fp, plans, qmodel, the one-pass engine, the rerun engine) on x in chunks of 16."""
    fp, _, plans, qmodel = _prepared(model, x, QuantConfig(weight_bits=3))
    chunks = list(x.split(16))
    graph = make_engine(fp, qmodel, chunks, [p.name for p in plans])
    return fp, plans, qmodel, graph, RerunEngine(fp, qmodel, chunks)


@pytest.mark.parametrize("make, data", [(tiny_resnet, images), (tiny_mixed, sequences)])
def test_one_pass_engine_gives_the_same_layer_data_as_rerunning(make, data) -> None:  # type: ignore[no-untyped-def]
    x = data(40)
    fp, _, plans, qmodel = _prepared(make(), x, QuantConfig(weight_bits=3))
    chunks = list(x.split(16))  # several chunks, the last one partial
    names = [p.name for p in plans]
    graph = make_engine(fp, qmodel, chunks, names)
    rerun = RerunEngine(fp, qmodel, chunks)
    assert isinstance(graph, GraphEngine)
    for plan in plans:
        act = plan.info.activation if plan.info else None
        xq_graph, t_graph = graph.layer_data(plan.name, act)
        xq_rerun, t_rerun = rerun.layer_data(plan.name, act)
        # the one-pass engine runs image batches channels-last (`faster_layout`), the rerun
        # engine as given, and the targets come from the FP layer run by fx or by the module:
        # convolution kernels that differ in the last bit
        torch.testing.assert_close(xq_graph, xq_rerun, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t_graph, t_rerun, rtol=1e-5, atol=1e-6)
        layer = qmodel.get_submodule(plan.name)
        layer.set_codes(layer.nearest_codes())  # later layers see a quantized stream
    # only live values are kept: at the end at most a handful of tensors per chunk
    assert all(len(env) <= 4 for env in graph.q_stream.envs)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.b(y)


def test_untraceable_network_falls_back_to_rerunning() -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(64, 4)
    fp, trace, _ = prepare_float(model, x, QuantConfig())
    plans = plan_layers(fp, trace, QuantConfig())
    qmodel = swap_in_quant_layers(copy.deepcopy(fp), plans, QuantConfig())
    assert isinstance(make_engine(fp, qmodel, [x], ["a", "b"]), RerunEngine)
    qmodel = adaround.quantize(model, x, QuantConfig(weight_bits=3, iters=100, batch_size=16))
    assert [r.name for r in qmodel.adaround_report] == ["a", "b"]


@pytest.mark.parametrize("make, data", [(tiny_resnet, images), (tiny_mixed, sequences)])
def test_both_engines_give_the_fp_and_quantized_inputs_chunk_by_chunk(make, data) -> None:  # type: ignore[no-untyped-def]
    fp, plans, qmodel, graph, rerun = _two_engines(make(), data(40))
    for plan in plans:
        xq, _ = graph.layer_data(plan.name, None)
        for engine in (graph, rerun):
            pairs = list(engine.input_chunks(plan.name))
            assert [len(q) for q, _ in pairs] == [16, 16, 8]
            exact = dict(rtol=0, atol=0) if engine is graph else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.cat([q for q, _ in pairs]), xq, **exact)
            layer = fp.get_submodule(plan.name)
            torch.testing.assert_close(torch.cat([layer(f) for _, f in pairs]),
                                       graph.layer_data(plan.name, None)[1], **exact)
        qlayer = qmodel.get_submodule(plan.name)
        qlayer.set_codes(qlayer.nearest_codes())
    first = next(iter(graph.input_chunks(plans[-1].name)))
    assert not torch.equal(*first)  # the streams differ once earlier layers are rounded


@pytest.mark.parametrize("make, data", [
    (tiny_resnet, images),
    (lambda: TinyMobileNet().eval(), images),
    (lambda: TinyTransformer(post_norm=True).eval(), tokens),  # blocks of two arguments
])
def test_one_pass_engine_gives_the_same_unit_data_as_rerunning(make, data) -> None:  # type: ignore[no-untyped-def]
    x = data(40)
    cfg = QuantConfig(weight_bits=3, act_bits=4, unit="block")
    fp, trace, plans, qmodel = _prepared(make(), x, cfg)
    units = units_of(fp, trace, plans, x, cfg)
    assert any(u.kind == "block" for u in units)
    chunks = list(x.split(16))
    graph = make_engine(fp, qmodel, chunks, [u.name for u in units],
                        blocks=frozenset(u.name for u in units if u.kind == "block"))
    rerun = RerunEngine(fp, qmodel, chunks)
    assert isinstance(graph, GraphEngine)
    for unit in units:
        got, want = graph.unit_inputs(unit.name), rerun.unit_inputs(unit.name)
        assert got.per_sample == want.per_sample and got.count == want.count == 40
        # to the last bit of the convolutions, which run channels-last in the one-pass engine
        for a, b in zip(got.leaves, want.leaves):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graph.unit_target(unit.name, torch.relu),
                                   rerun.unit_target(unit.name, torch.relu), rtol=1e-5,
                                   atol=1e-6)
        for name in unit.layers:  # later units see the rounded unit
            layer = qmodel.get_submodule(name)
            layer.set_codes(layer.nearest_codes())


@pytest.mark.parametrize("make, data", [(tiny_resnet, images), (tiny_mixed, sequences)])
def test_both_engines_give_chosen_rows_of_the_layer_data(make, data) -> None:  # type: ignore[no-untyped-def]
    from adaround.reconstruct.loop import eval_rows

    _, plans, qmodel, graph, rerun = _two_engines(make(), data(40))
    picks = [torch.tensor([0, 5, 17, 31, 39]), torch.tensor([20]), eval_rows(40, 0, 40)]
    for plan in plans:
        act = plan.info.activation if plan.info else None
        for engine in (graph, rerun):
            xq, target = engine.layer_data(plan.name, act)
            assert engine.samples == 40
            for at in picks:
                rows_q, rows_t = engine.layer_rows(plan.name, act, at)
                torch.testing.assert_close(rows_q, xq[at], rtol=0, atol=0)
                torch.testing.assert_close(rows_t, target[at], rtol=1e-5, atol=1e-6)
            none_q, none_t = engine.layer_rows(plan.name, act, torch.tensor([], dtype=torch.long))
            assert none_q.shape == (0, *xq.shape[1:]) and none_t.shape == (0, *target.shape[1:])
        qlayer = qmodel.get_submodule(plan.name)
        qlayer.set_codes(qlayer.nearest_codes())


class ViewsAConvOutput(nn.Module):
    """`view` of a convolution's output: fails on a channels-last batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


def test_image_streams_run_channels_last_where_the_network_takes_it() -> None:
    torch.manual_seed(0)
    x = images(24)
    for model, turned in ((tiny_resnet(), True), (ViewsAConvOutput(), False)):
        fp, _, plans, qmodel = _prepared(model, x, QuantConfig(weight_bits=3))
        engine = make_engine(fp, qmodel, list(x.split(16)), [p.name for p in plans])
        assert isinstance(engine, GraphEngine)
        layout = engine.fp_stream.chunks[0].is_contiguous(memory_format=torch.channels_last)
        assert layout == turned
        # the layer data are the user's layout's, to float rounding
        rerun = RerunEngine(fp, qmodel, list(x.split(16)))
        for plan in plans:
            ours, theirs = engine.layer_data(plan.name, None), rerun.layer_data(plan.name, None)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    quantized = adaround.quantize(ViewsAConvOutput(), x, QuantConfig(iters=10, batch_size=8))
    assert [r.name for r in quantized.adaround_report] == ["conv", "fc"]
