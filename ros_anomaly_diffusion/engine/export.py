"""`ros-anomaly-diffusion export`: what a variant runs, as ONNX for TensorRT's own tool (trtexec
on a Jetson, where torch-tensorrt is missing for most families).

- `export_onnx()`: the denoiser net(x, t) of the pixel and latent variants;
- `export_frame_graph()`: a feature family's whole frame graph (FrameGraphs: backbone, model,
  maps);
each with a fixed or free batch, fp32 or fp16, at the opset JetPack's TensorRT parses
(TRT_OPSET), with the shape guards TensorRT's parser rejects folded (`fold_shape_guards`).
`trtexec_command()` is the command line that builds an engine from the file. Which module a
variant exports is its scorer's `export_target`.
"""
from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.networks.backends import Timestepped, onnx_export

# The default opset of `export`: the highest that the TensorRT of every current JetPack release
# parses. Source: the ONNX-TensorRT operator support matrix, docs/operators.md of
# github.com/onnx/onnx-tensorrt: "TensorRT 8.5 supports operators up to Opset 17" and "TensorRT 8.6
# supports operators up to Opset 17" (branches release/8.5-GA, release/8.6-GA; JetPack 5.1 ships
# TensorRT 8.5, JetPack 6.0 TensorRT 8.6), "TensorRT 10.0 supports operators in the inclusive range
# of opset 9 to opset 20" (release/10.0-GA; JetPack 6.1 and 6.2 ship TensorRT 10.3). A robot on
# TensorRT 10 only may export with --opset 20.
TRT_OPSET = 17
EXPORT_PRECISIONS = ("fp32", "fp16")
FRAME_OUTPUTS = ("maps", "frames")  # a frame graph's outputs: pixel maps, and frame scores where it has them


@dataclass(frozen=True)
class Exported:
    """An ONNX file written for deployment: its inputs and outputs (name -> (dtype, shape); the
    batch dimension, shape[0], is None where it is free), its precision and opset."""
    path: Path
    inputs: dict[str, tuple[str, tuple]]
    outputs: dict[str, tuple[str, tuple]]
    precision: str
    opset: int

    @property
    def dynamic_batch(self) -> bool:
        return next(iter(self.inputs.values()))[1][0] is None

    def summary(self) -> str:
        def dims(shape):
            return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"

        lines = [f"{self.path} ({self.precision} graph, opset {self.opset})"]
        for kind, tensors in (("input ", self.inputs), ("output", self.outputs)):
            lines += [f"  {kind} {name:<6} {dtype:<7} {dims(shape)}" for name, (dtype, shape) in tensors.items()]
        return "\n".join(lines)


def trtexec_command(exported: Exported, max_batch: int = 1) -> str:
    """The trtexec command line that builds a TensorRT engine (<file>.plan beside it) from
    `exported`. An fp32 graph: --fp16, TensorRT picks fp16 kernels layer by layer where they are
    faster (weakly typed, TensorRT 8.x and 10.x); an fp16 graph: --stronglyTyped, the graph's own
    types (TensorRT 10.x; the only mode of TensorRT 11, which has no --fp16). A free batch needs an
    optimisation profile: batch 1 to `max_batch`, tuned for `max_batch` (the cameras of a
    multi-camera node)."""
    cmd = ["trtexec", f"--onnx={exported.path}", f"--saveEngine={exported.path.with_suffix('.plan')}",
           "--fp16" if exported.precision == "fp32" else "--stronglyTyped"]
    if exported.dynamic_batch:
        for flag, batch in (("min", 1), ("opt", max_batch), ("max", max_batch)):
            shapes = ",".join(f"{name}:" + "x".join(str(d) for d in (batch, *shape[1:]))
                              for name, (_, shape) in exported.inputs.items())
            cmd.append(f"--{flag}Shapes={shapes}")
    return " ".join(shlex.quote(c) for c in cmd)


class _HalfNetworks(nn.Module):
    """A frame graph with float16 inputs and outputs whose networks (its child modules: backbone,
    denoiser) run in float16 -- nearly all of its weights and arithmetic -- while the arithmetic
    between and after them stays float32: the standardisation by ID statistics, the nearest-
    neighbour search, the latent NLL (a sum over every cell and channel, ~6e4 for an ID frame at
    256x320, next to float16's largest value 65504) and the maps in [0, 1]."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph.float()
        for name, child in list(graph.named_children()):
            setattr(graph, name, _InHalf(child))

    def forward(self, x: torch.Tensor):
        out = self.graph(x.float())
        return tuple(o.half() for o in out) if isinstance(out, tuple) else out.half()


class _InHalf(nn.Module):
    """`net` in float16 between float32 tensors (other arguments, e.g. a timestep, unchanged)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.half()

    def forward(self, *args):
        return self.net(*(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)).float()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _export_for_deployment(module: nn.Module, args: tuple[torch.Tensor, ...], path: str | Path,
                           input_names: tuple[str, ...], output_names: tuple[str, ...], precision: str,
                           opset: int, dynamic_batch: bool) -> Exported:
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"precision must be one of {EXPORT_PRECISIONS}, got {precision!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        onnx_export(module, args, path, input_names, dynamic_batch=dynamic_batch, opset=opset,
                     output_names=output_names[:len(out)])
    _tidy_for_tensorrt(path)

    def described(names, tensors):
        return {n: (_dtype_name(t), ((None,) if dynamic_batch else tuple(t.shape[:1])) + tuple(t.shape[1:]))
                for n, t in zip(names, tensors)}

    return Exported(path, described(input_names, args), described(output_names, out), precision, opset)


def _tidy_for_tensorrt(path: Path) -> None:
    """The exported file with its shape guards folded and its outputs' static sizes written."""
    import onnx

    model = onnx.load(str(path))
    fold_shape_guards(model)
    dims = _static_dims(model)
    for output in model.graph.output:  # e.g. the maps' size behind a free batch, unnamed by the exporter
        for d, size in zip(output.type.tensor_type.shape.dim, dims.get(output.name, [])):
            if size is not None and not d.HasField("dim_value") and d.dim_param != "batch":
                d.dim_value = size
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _static_dims(model) -> dict[str, list[int | None]]:
    """value name -> its sizes (None where unknown), by ONNX shape inference with data propagation,
    which follows sizes through Shape, Gather and Concat into a Resize."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.value_info, *inferred.input, *inferred.output)}


def fold_shape_guards(model) -> int:
    """Replace in the ONNX model each If whose condition the graph's static shapes decide by the
    branch it takes; returns how many. torch's exporter guards squeeze(dim) by If(size == 1,
    Squeeze, Identity) where it cannot see that size (after a Resize to computed sizes, as the
    frame graphs' maps), and TensorRT rejects an If whose branches differ in rank unless its
    parser sees the condition as a constant, which a Shape never is there."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    dims = _static_dims(model)
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def value(name):  # a constant, or a size from a static shape; None where unknown
        if name in initializers:
            return initializers[name]
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Shape" and not node.attribute:  # sizes still unknown (the batch) are None
            shape = dims.get(node.input[0])
            return None if shape is None else np.array(shape, dtype=object)
        if node.op_type == "Gather":
            data, index = value(node.input[0]), value(node.input[1])
            if data is None or index is None:
                return None
            picked = np.take(data, index, axis=next((a.i for a in node.attribute if a.name == "axis"), 0))
            return None if any(v is None for v in np.ravel(picked)) else picked.astype(data.dtype)
        if node.op_type == "Equal":
            a, b = value(node.input[0]), value(node.input[1])
            unknown = a is None or b is None or any(v is None for v in (*np.ravel(a), *np.ravel(b)))
            return None if unknown else np.equal(a.astype(np.int64), b.astype(np.int64))
        return None

    nodes, folded = [], 0
    for node in graph.node:
        cond = value(node.input[0]) if node.op_type == "If" else None
        if cond is None or cond.size != 1:
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond.item() else "else_branch"))
        rename = {b.name: o for b, o in zip(branch.output, node.output)}
        made = {o for n in branch.node for o in n.output}
        for inner in branch.node:
            inner = copy.deepcopy(inner)
            inner.output[:] = [rename.get(o, o) for o in inner.output]
            nodes.append(inner)
        nodes += [onnx.helper.make_node("Identity", [b], [o]) for b, o in rename.items() if b not in made]
        graph.initializer.extend(branch.initializer)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    return folded


def _live(nodes: list, wanted: set[str]) -> list:
    """`nodes` less those whose outputs nothing uses (the folded conditions)."""
    used, keep = set(wanted), []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            keep.append(node)
            used.update(node.input)
            for a in node.attribute:  # names a subgraph takes from the enclosing graph
                if a.type == a.GRAPH:
                    used.update(i for n in a.g.node for i in n.input)
    return keep[::-1]


def _example_batch(batch: int, dynamic_batch: bool) -> int:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 2 if dynamic_batch else batch  # a free batch traced at 2: nothing specialises on a batch of 1


def export_onnx(net: nn.Module, shape: tuple[int, ...], path: str | Path, opset: int = TRT_OPSET,
                dynamic_batch: bool = False, precision: str = "fp32") -> Exported:
    """The denoiser net(x, t) as ONNX: inputs x (shape: batch, C, H, W) and t (batch,) int64,
    output `out`. The batch is shape[0], or free with dynamic_batch. precision "fp16": the whole
    denoiser in float16 (weights, x and out)."""
    dtype = torch.half if precision == "fp16" else torch.float
    net = copy.deepcopy(net).float().eval().cpu().to(dtype)
    b = _example_batch(shape[0], dynamic_batch)
    example = (torch.randn((b, *shape[1:]), dtype=dtype), torch.full((b,), 500, dtype=torch.long))
    return _export_for_deployment(Timestepped(net), example, path, ("x", "t"), ("out",), precision, opset,
                                  dynamic_batch)


def export_frame_graph(graph: nn.Module, shape: tuple[int, ...], path: str | Path, opset: int = TRT_OPSET,
                       dynamic_batch: bool = False, precision: str = "fp32") -> Exported:
    """A feature family's frame graph (FrameGraphs: frames in [0, 1] -> maps, and frame scores
    where it has them) as ONNX: input x (shape: batch, 3, H, W at the model size), outputs
    FRAME_OUTPUTS. The batch is shape[0], or free with dynamic_batch. precision "fp16": float16
    inputs, outputs and network weights, the arithmetic around the networks float32 (_HalfNetworks)."""
    graph = copy.deepcopy(graph).float().eval().cpu()
    module, dtype = (_HalfNetworks(graph), torch.half) if precision == "fp16" else (graph, torch.float)
    b = _example_batch(shape[0], dynamic_batch)
    example = torch.rand((b, *shape[1:]), generator=torch.Generator().manual_seed(0)).to(dtype)
    return _export_for_deployment(module, (example,), path, ("x",), FRAME_OUTPUTS, precision, opset, dynamic_batch)
