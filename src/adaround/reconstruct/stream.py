"""Advance the FP and the quantized activations through the network once, layer by layer.

The network is traced with torch.fx (quantizable layers kept as leaves). Each stream holds,
for every calibration chunk, the values of the graph nodes that are still needed, and executes
nodes only up to the next layer to reconstruct. So each layer's inputs come from the cached
outputs of the layers before it, not from re-running the network from its input: the whole
calibration costs one network pass per stream instead of one per layer. Values are freed as
soon as their last user has run.

Networks that torch.fx cannot trace (data-dependent control flow) fall back to
`RerunEngine`, which runs the network again for every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn

from adaround.equivalence import (
    CHECK_SAMPLES,
    TOLERANCE,
    flatten_tensors,
    relative_error,
    run_outputs,
)
from adaround.nn.quant_layer import QUANTIZABLE, QuantLayer
from adaround.reconstruct.block_data import (
    UnitInputs,
    capture_inputs,
    capture_outputs,
    stack_outputs,
)
from adaround.reconstruct.cache import collect_input_chunks, collect_layer_data, layer_target
from adaround.reconstruct.spill import SpillStore, materialize

log = logging.getLogger(__name__)

Activation = Callable[[Tensor], Tensor] | None


class _LeafTracer(fx.Tracer):
    """Quantizable layers, and the modules named in `leaves` (reconstruction blocks), stay
    single nodes of the graph."""

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaves or isinstance(m, (QuantLayer, *QUANTIZABLE))
                or super().is_leaf_module(m, module_qualified_name))


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class Stream:
    """Node values of one network for every calibration chunk, advanced node by node."""

    def __init__(self, graph: fx.Graph, root: nn.Module, chunks: list[Tensor],
                 after_node: Callable[[], None] | None = None,
                 constants: dict[str, Tensor] | None = None) -> None:
        self.root = root
        self.constants = constants or {}
        self.after_node = after_node
        self.nodes = list(graph.nodes)
        self.chunks = chunks
        self.envs: list[dict[fx.Node, Any]] = [{} for _ in chunks]
        self.pos = 0
        index = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((index[u] for u in node.users), default=index[node])
                         for node in self.nodes}

    def run_until(self, stop: int) -> None:
        """Execute nodes[pos:stop] on every chunk."""
        with torch.no_grad():
            for i in range(self.pos, stop):
                node = self.nodes[i]
                dead = [n for n in node.all_input_nodes if self.last_use[n] == i]
                for env, chunk in zip(self.envs, self.chunks):
                    env[node] = self._execute(node, env, chunk)
                    for n in dead:
                        env.pop(n, None)
                    if not node.users and node.op != "output":
                        env.pop(node, None)
                if self.after_node is not None:
                    self.after_node()
        self.pos = max(self.pos, stop)

    def _execute(self, node: fx.Node, env: dict[fx.Node, Any], chunk: Tensor) -> Any:
        if node.op == "placeholder":
            return chunk if node is self.nodes[0] else (node.args[0] if node.args else None)
        if node.op == "get_attr":
            target = str(node.target)
            if target in self.constants:
                return self.constants[target]
            return _fetch_attr(self.root, target)
        args, kwargs = self.arguments(node, env)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        return args[0]  # output

    @staticmethod
    def arguments(node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The node's (args, kwargs) with the values of its input nodes in `env`."""
        args = fx.node.map_arg(node.args, lambda n: materialize(env[n]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: materialize(env[n]))
        return tuple(args), dict(kwargs)

    def input_chunks(self, node: fx.Node) -> Iterator[Tensor]:
        arg = node.args[0]
        assert isinstance(arg, fx.Node)
        return (materialize(env[arg]) for env in self.envs)

    def input_of(self, node: fx.Node) -> Tensor:
        return torch.cat(list(self.input_chunks(node)))


def _cached(node: fx.Node) -> bool:
    """Values the budget covers: node outputs, not the calibration input or parameters."""
    return node.op.startswith("call_")


class GraphEngine:
    """Layer data from two streams (FP and quantized) that advance together through the graph."""

    def __init__(self, graph: fx.Graph, fp: nn.Module, qmodel: nn.Module,
                 chunks: list[Tensor], store: SpillStore | None = None,
                 constants: dict[str, Tensor] | None = None) -> None:
        self.store = store
        after = self._fit_budget if store is not None else None
        self.fp_stream = Stream(graph, fp, chunks, after, constants)
        self.q_stream = Stream(graph, qmodel, chunks, after, constants)
        self.fp = fp
        self.position = {}
        for i, node in enumerate(self.fp_stream.nodes):
            if node.op == "call_module":
                self.position.setdefault(str(node.target), i)

    def _advance_to(self, name: str) -> fx.Node:
        node_index = self.position[name]
        self.fp_stream.run_until(node_index)
        self.q_stream.run_until(node_index)
        return self.fp_stream.nodes[node_index]

    def _fit_budget(self) -> None:
        """Spill cached node values (never inputs or parameters) down to the budget."""
        assert self.store is not None
        self.store.fit(self.fp_stream.envs + self.q_stream.envs, keys=_cached)

    def layer_data(self, name: str, activation: Activation) -> tuple[Tensor, Tensor]:
        """(x^, target) for all calibration samples; with a memory budget, written to disk
        chunk by chunk where they take more than half of it, and counted against it else."""
        node = self._advance_to(name)
        layer = self.fp.get_submodule(name)
        x_q = self.q_stream.input_chunks(node)
        targets = (layer_target(layer, x, activation) for x in self.fp_stream.input_chunks(node))
        if self.store is None:
            return torch.cat(list(x_q)), torch.cat(list(targets))
        first = next(self.fp_stream.input_chunks(node))[:1]
        per_sample = first.nbytes + layer_target(layer, first, activation).nbytes
        size = per_sample * sum(len(chunk) for chunk in self.fp_stream.chunks)
        if size > self.store.budget // 2:
            return self.store.write_rows(x_q), self.store.write_rows(targets)  # type: ignore[return-value]
        self.store.fit(self.fp_stream.envs + self.q_stream.envs, keys=_cached, reserve=size)
        return torch.cat(list(x_q)), torch.cat(list(targets))

    def input_chunks(self, name: str) -> Iterator[tuple[Tensor, Tensor]]:
        """(x^, x) chunk by chunk: the layer's quantized- and FP-stream inputs, uncopied."""
        node = self._advance_to(name)
        yield from zip(self.q_stream.input_chunks(node), self.fp_stream.input_chunks(node))

    def layer_rows(self, name: str, activation: Activation, at: Tensor) -> tuple[Tensor, Tensor]:
        """`layer_data` of the samples `at` only."""
        return rows_data(self.fp.get_submodule(name), self.input_chunks(name), activation, at)

    @property
    def samples(self) -> int:
        return sum(len(chunk) for chunk in self.fp_stream.chunks)

    def unit_inputs(self, name: str) -> UnitInputs:
        """Every argument of unit `name` in the quantized stream, which stops before the unit
        (it runs the unit later, once the unit is rounded)."""
        node = self._advance_to(name)
        stream = self.q_stream
        return UnitInputs.from_calls([stream.arguments(node, env) for env in stream.envs])

    def unit_target(self, name: str, activation: Activation) -> Tensor:
        """Unit `name`'s FP output (then `activation`, if given) for every chunk."""
        index = self.position[name]
        self.fp_stream.run_until(index + 1)
        node = self.fp_stream.nodes[index]
        return stack_outputs([materialize(env[node]) for env in self.fp_stream.envs], activation)


class RerunEngine:
    """Fallback: run both networks from their input up to the layer, for every layer."""

    def __init__(self, fp: nn.Module, qmodel: nn.Module, chunks: list[Tensor]) -> None:
        self.fp, self.qmodel, self.chunks = fp, qmodel, chunks

    def layer_data(self, name: str, activation: Activation) -> tuple[Tensor, Tensor]:
        return collect_layer_data(self.fp, self.qmodel, name, self.chunks, activation)

    def input_chunks(self, name: str) -> Iterator[tuple[Tensor, Tensor]]:
        """(x^, x) chunk by chunk, each chunk from its own pair of forward passes."""
        return collect_input_chunks(self.fp, self.qmodel, name, self.chunks)

    def layer_rows(self, name: str, activation: Activation, at: Tensor) -> tuple[Tensor, Tensor]:
        """`layer_data` of the samples `at` only."""
        return rows_data(self.fp.get_submodule(name), self.input_chunks(name), activation, at)

    @property
    def samples(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def unit_inputs(self, name: str) -> UnitInputs:
        return capture_inputs(self.qmodel, name, self.chunks)

    def unit_target(self, name: str, activation: Activation) -> Tensor:
        return capture_outputs(self.fp, name, self.chunks, activation)


def rows_data(layer: nn.Module, chunks: Iterator[tuple[Tensor, Tensor]], activation: Activation,
              at: Tensor) -> tuple[Tensor, Tensor]:
    """(x^, target) of the samples `at` (indices over all chunks, in order) from (x^, x)
    chunks: the target computed on those samples only."""
    picked, offset = [], 0
    for x_q, x_fp in chunks:
        local = at[(at >= offset) & (at < offset + len(x_q))] - offset
        if len(local) or not picked:  # an empty pick keeps the shapes where `at` is empty
            picked.append((x_q[local], x_fp[local]))
        offset += len(x_q)
    return (torch.cat([q for q, _ in picked]),
            torch.cat([layer_target(layer, f, activation) for _, f in picked]))


def _take_constants(graph: fx.Graph, traced: nn.Module) -> dict[str, Tensor]:
    """Tensors that torch.fx computed while tracing (e.g. a frozen norm's scale, made from its
    buffers outside any traced value) and stored on the traced module as `_tensor_constantN`:
    moved into a table that both streams read, off the user's module."""
    constants = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and target.startswith("_tensor_constant"):
            constants[target] = getattr(traced, target)
            delattr(traced, target)
    return constants


def _through_wrappers(graph: fx.Graph, traced: nn.Module) -> None:
    """Model code that reads a wrapped layer's weight itself (`self.conv.weight`) is traced as
    `conv.layer.weight`, which the FP network does not have and which, in the quantized one,
    is the float weight. Read it as `conv.weight` instead: the FP layer's weight there, the
    weight the QuantLayer computes with here."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        parts, module, kept = str(node.target).split("."), traced, []
        for i, part in enumerate(parts):
            if isinstance(module, QuantLayer) and part == "layer" and i < len(parts) - 1:
                module = module.layer
                continue
            kept.append(part)
            module = getattr(module, part, None)
        node.target = ".".join(kept)


def _graph_matches_eager(graph: fx.Graph, fp: nn.Module, sample: Tensor,
                         constants: dict[str, Tensor], eager: Any) -> bool:
    """The traced graph, run on the FP network on `sample`, gives `eager`, the eager
    forward's outputs on the sample as the caller gave it: fx bakes whatever it cannot trace
    through into constants, which would make every layer's data wrong without a sign."""
    stream = Stream(graph, fp, [sample], constants=constants)
    try:
        stream.run_until(len(stream.nodes))
        traced = flatten_tensors(stream.envs[0][stream.nodes[-1]])
    except Exception as exc:  # noqa: BLE001 - any failure: use the eager path
        log.info("the torch.fx graph does not run (%s: %s)", type(exc).__name__, exc)
        return False
    return relative_error(eager, traced) <= TOLERANCE


def faster_layout(graph: fx.Graph, fp: nn.Module, chunks: list[Tensor],
                  constants: dict[str, Tensor], eager: Any) -> list[Tensor]:
    """Image batches channels-last where the graph runs on them to the same outputs: CPU
    convolutions run faster on it and the moments copy their patches from it (ResNet-20,
    1024 images: the streams' passes 1.5 -> 1.1 s). A network that cannot take them (a
    `view` of a convolution's output, say) keeps the layout it was given."""
    if chunks[0].dim() != 4 or chunks[0].device.type != "cpu":
        return chunks
    turned = [c.contiguous(memory_format=torch.channels_last) for c in chunks]
    if not _graph_matches_eager(graph, fp, turned[0][:CHECK_SAMPLES], constants, eager):
        return chunks
    return turned


def make_engine(fp: nn.Module, qmodel: nn.Module, chunks: list[Tensor],
                names: list[str], store: SpillStore | None = None,
                blocks: frozenset[str] = frozenset()) -> GraphEngine | RerunEngine:
    """The one-pass engine where torch.fx can trace the network, else the re-run fallback.
    `names` are the layers (or units) to visit, in order; `blocks` are kept whole in the graph."""
    try:
        graph = _LeafTracer(blocks).trace(qmodel)
    except Exception as exc:  # any tracing failure just means: use the slow path
        log.info("torch.fx cannot trace %s (%s: %s); re-running the network for each layer",
                 type(qmodel).__name__, type(exc).__name__, str(exc).splitlines()[0][:120])
        return RerunEngine(fp, qmodel, chunks)
    _through_wrappers(graph, qmodel)
    constants = _take_constants(graph, qmodel)
    eager = run_outputs(fp, chunks[0][:CHECK_SAMPLES])  # one eager pass for both checks
    if not _graph_matches_eager(graph, fp, chunks[0][:CHECK_SAMPLES], constants, eager):
        log.warning("the torch.fx graph of %s computes other outputs than its forward (code "
                    "that fx records as constants); re-running the network for each layer",
                    type(qmodel).__name__)
        return RerunEngine(fp, qmodel, chunks)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    engine = GraphEngine(graph, fp, qmodel, faster_layout(graph, fp, chunks, constants, eager),
                         store, constants)
    order = [engine.position.get(name, -1) for name in names]
    extra_inputs = any(not p.args for p in placeholders[1:])
    if extra_inputs or min(order, default=0) < 0 or order != sorted(order):
        log.info("the traced graph does not match the execution order; re-running the "
                 "network for each layer instead")
        return RerunEngine(fp, qmodel, chunks)
    return engine
