"""Where the networks run (Settings.backend): torch eager, ONNX Runtime, OpenVINO, or TensorRT.

- `with_backend(net, backend, device, inputs)`: the one switch. "torch" returns the module;
  "onnxruntime" and "openvino" wrap it in an `OnnxModule` (exported to ONNX once per weights and
  input shape, batch dynamic, cached on disk, run by ONNX Runtime's CPU provider or compiled by
  OpenVINO's CPU plugin per batch size); "tensorrt" compiles with
  torch-tensorrt (`compile_cached`). A backend whose package or device is missing is refused with
  a ValueError saying what to install.
- `compile_cached()` compiles with torch-tensorrt (fp16), caching the compiled module under a
  key of (weights, input shape, precision), and warms it up; a compiler failure returns the
  eager module and the one-line reason.
- `export_onnx()` / `export_frame_graph()`: what a variant runs as ONNX for TensorRT's own tool
  (trtexec on a Jetson, where torch-tensorrt is missing for most families): the denoiser net(x, t)
  of the pixel and latent variants, or a feature family's whole frame graph (FrameGraphs); fixed
  or free batch, fp32 or fp16, at the opset JetPack's TensorRT parses (TRT_OPSET).
  `trtexec_command()` is the command line that builds an engine from the file.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "trt"
ONNX_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "onnx"
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ONNX_BACKENDS = ("onnxruntime", "openvino")  # the backends that run exported ONNX files
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


def cache_key(net: nn.Module, shape: tuple[int, ...], precision: str) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(f"{tuple(shape)}:{precision}:{torch.__version__}".encode())
    return h.hexdigest()[:24]


class _Timestepped(nn.Module):
    """net(x, t) with t as a tensor input, the form exporters and compilers trace."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


def compile_cached(net: nn.Module, shape: tuple[int, ...], device: torch.device, trt,
                   cache_dir: Path = DEFAULT_CACHE, warmup: int = 3) -> tuple[nn.Module, str]:
    """Compile `net` with the torch_tensorrt module `trt` (fp16), or load the engine cached
    for these weights and this shape; warm it up. Any failure: the eager fp32 net."""
    example = (torch.randn(shape, device=device, dtype=torch.half),
               torch.full((shape[0],), 500, device=device, dtype=torch.long))
    path = Path(cache_dir) / f"{cache_key(net, shape, 'fp16')}.ep"
    try:
        if path.is_file():
            compiled, how = trt.load(str(path)).module(), "cached"
        else:
            wrapped = _Timestepped(copy.deepcopy(net).half().eval())  # `net` stays fp32: the fallback, the cache key
            compiled = trt.compile(wrapped, ir="dynamo", inputs=list(example), enabled_precisions={torch.half})
            path.parent.mkdir(parents=True, exist_ok=True)
            trt.save(compiled, str(path), inputs=list(example))
            how = "compiled"
        with torch.inference_mode():
            for _ in range(warmup):
                compiled(*example)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # any compiler failure: the eager model still works
        return net, f"TensorRT compilation failed ({type(err).__name__}: {err})"

    class _Runner(nn.Module):  # keep the net(x, t) interface, run half precision inside
        def forward(self, x, t):
            if not torch.is_tensor(t):
                t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            return compiled(x.half(), t).to(x.dtype)

    return _Runner(), f"tensorrt fp16 ({how}, {path})"


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
        _onnx_export(module, args, path, input_names, dynamic_batch=dynamic_batch, opset=opset,
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
    return _export_for_deployment(_Timestepped(net), example, path, ("x", "t"), ("out",), precision, opset,
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


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: tuple[str, ...],
                 dynamic_batch: bool = False, opset: int = 18, output_names: tuple[str, ...] = ("out",)) -> None:
    """torch.onnx.export with the package's names; with dynamic_batch, dimension 0 of every
    input and output is free."""
    dynamic = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():  # python-side checks and loops traced as constants, as intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic)


class OnnxModule(nn.Module):
    """A module run by an ONNX runtime on the CPU: same call, same outputs (within float rounding).

    The wrapped module is exported on the first call with each input shape (batch dynamic) to
    `cache_dir/<weights and shape key>.onnx`, reused by later processes. A denoiser's integer
    timestep argument becomes a (batch,) int64 tensor, as in the export. A module with several
    outputs (`outputs` names them) returns a tuple. `signature`: whatever else the module bakes
    into its graph as constants (not in its state_dict), part of the cache key. Attributes
    other than the call (e.g. a denoiser's `config`) are the wrapped module's. Subclasses
    load an exported file (`_load`) and run it (`_run`)."""

    def __init__(self, net: nn.Module, inputs: tuple[str, ...] = ("x",), cache_dir: Path | None = None,
                 threads: int | None = None, outputs: tuple[str, ...] = ("out",), signature: str = ""):
        super().__init__()
        self.net, self.inputs, self.cache_dir = net.eval(), tuple(inputs), Path(cache_dir or ONNX_CACHE)
        self.outputs, self.signature = tuple(outputs), signature
        self._threads = threads or torch.get_num_threads()
        self._runners: dict[tuple, object] = {}
        self.exported: list[Path] = []  # files this instance exported (not found in the cache)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def _onnx_file(self, args: tuple[torch.Tensor, ...]) -> Path:
        shape = (0, *args[0].shape[1:])  # batch free
        path = self.cache_dir / f"{cache_key(self.net, shape, 'onnx' + self.signature)}.onnx"
        if not path.is_file():
            self._export(args, path)
        return path

    def _export(self, args: tuple[torch.Tensor, ...], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        module = _Timestepped(self.net) if len(args) == 2 else self.net
        # a concurrent process (two detector nodes starting at once) never reads a half-written file
        tmp = path.with_suffix(f".{os.getpid()}.{id(self)}.tmp")
        with torch.inference_mode(False), torch.no_grad():
            _onnx_export(module, tuple(a.cpu() for a in args), tmp, self.inputs, dynamic_batch=True,
                         output_names=self.outputs)
        tmp.replace(path)
        self.exported.append(path)
        log.info("exported %s for %s: %s", type(self.net).__name__, type(self).__name__, path)

    def _shape_key(self, args: tuple[torch.Tensor, ...]) -> tuple:
        """Inputs that share a runner: the same shapes but the batch (the export's batch is dynamic)."""
        return tuple(tuple(a.shape[1:]) for a in args)

    def _load(self, path: Path, args: tuple[torch.Tensor, ...]):
        raise NotImplementedError

    def _run(self, runner, feed: dict) -> list:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor | tuple[torch.Tensor, ...]:
        args = (x, *rest)
        if len(args) == 2 and not torch.is_tensor(args[1]):  # a denoiser's integer timestep
            args = (x, torch.full((x.shape[0],), int(args[1]), dtype=torch.long))
        key = self._shape_key(args)
        if key not in self._runners:
            self._runners[key] = self._load(self._onnx_file(args), args)
        feed = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, args)}
        out = tuple(torch.from_numpy(o).to(x.device) for o in self._run(self._runners[key], feed))
        return out if len(self.outputs) > 1 else out[0]


class OrtModule(OnnxModule):
    """OnnxModule on ONNX Runtime's CPU provider: one session per input shape, any batch."""

    def __init__(self, net: nn.Module, inputs: tuple[str, ...] = ("x",), **options):
        import onnxruntime

        super().__init__(net, inputs, **options)
        self._ort = onnxruntime

    def _load(self, path: Path, args: tuple[torch.Tensor, ...]):
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        # threads spin inside a run (2 ms of 15 for inversion) but stop when it returns: spinning
        # between runs took the cores from the resize and post-processing around them
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return self._ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, session, feed: dict) -> list:
        return session.run(None, feed)


class OvModule(OnnxModule):
    """OnnxModule on OpenVINO's CPU plugin, compiled for each full input shape (batch included):
    static shapes let it plan its kernels; a new batch size costs one compilation of the cached
    ONNX file. precision "bf16" runs bf16 arithmetic where the CPU has it (AMX, AVX512-BF16),
    fp32 elsewhere (logged once)."""

    def __init__(self, net: nn.Module, inputs: tuple[str, ...] = ("x",), precision: str = "fp32", **options):
        import openvino

        super().__init__(net, inputs, **options)
        self._ov, self._core, self.precision = openvino, openvino.Core(), precision

    def _shape_key(self, args: tuple[torch.Tensor, ...]) -> tuple:
        return tuple(tuple(a.shape) for a in args)

    def _load(self, path: Path, args: tuple[torch.Tensor, ...]):
        model = self._core.read_model(str(path))
        model.reshape({name: self._ov.PartialShape(list(a.shape)) for name, a in zip(self.inputs, args)})
        # explicit f32: OpenVINO's own default is bf16 on CPUs that have it, which changes the numbers
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self._threads,
                  "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[self.precision]}
        compiled = self._core.compile_model(model, "CPU", config)
        runs = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.precision == "bf16" and "bf16" not in runs and not self._runners:
            log.warning("precision bf16 asked, but this CPU runs OpenVINO in %s (no AMX or AVX512-BF16)", runs)
        return compiled.create_infer_request()

    def _run(self, request, feed: dict) -> list:
        request.infer(feed)
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def auto_backend(device: torch.device | str, tensorrt: bool = False) -> str:
    """The backend `auto` (Settings.backend's default) picks: tensorrt on CUDA where
    torch_tensorrt imports and the family runs on it (`tensorrt`), onnxruntime on a CPU (a
    dependency of the package; faster than torch eager, README "Backends") where its export
    cache can be written, torch otherwise (CUDA without torch_tensorrt, onnxruntime missing,
    a read-only cache folder)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "tensorrt" if tensorrt and _importable("torch_tensorrt") and _writable(DEFAULT_CACHE) else "torch"
    if device.type != "cpu" or not _importable("onnxruntime"):
        return "torch"
    if not _writable(ONNX_CACHE):
        log.warning("backend auto: %s is not writable, so nothing can be exported for ONNX Runtime: running torch "
                    "eager", ONNX_CACHE)
        return "torch"
    return "onnxruntime"


def with_backend(net: nn.Module, backend: str, device: torch.device | str, inputs: tuple[str, ...] = ("x", "t"),
                 shape: tuple[int, ...] | None = None, precision: str = "fp32",
                 **onnx_options) -> tuple[nn.Module, str]:
    """(module to run, how it runs) for Settings.backend and Settings.precision; ValueError when
    the backend cannot run here (package not installed, wrong device). `shape` (TensorRT only):
    the input shape; onnx_options: OnnxModule's `outputs` and `signature`."""
    device = torch.device(device)
    if backend == "auto":
        backend = auto_backend(device, tensorrt=shape is not None)
    if precision != "fp32" and backend != "openvino":
        raise ValueError(f"precision {precision!r} runs on backend 'openvino' only, not {backend!r}")
    if backend == "torch":
        return net, "torch eager"
    if backend in ONNX_BACKENDS:
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU here, not on {device}: use backend "
                             "'tensorrt' (or 'torch') on a GPU")
        try:
            if backend == "onnxruntime":
                return OrtModule(net, inputs, **onnx_options), "onnxruntime (CPU)"
            return OvModule(net, inputs, precision, **onnx_options), f"openvino (CPU, {precision})"
        except ImportError:
            raise ValueError(f"backend {backend!r} needs the {backend} package: pip install {backend}") from None
    if backend == "tensorrt":
        if device.type != "cuda":
            raise ValueError(f"backend 'tensorrt' needs a CUDA device, got {device}")
        try:
            import torch_tensorrt
        except ImportError:
            raise ValueError("backend 'tensorrt' needs torch_tensorrt (JetPack's or pip install torch-tensorrt); "
                             "or export ONNX (`ros-anomaly-diffusion export`) for trtexec") from None
        if shape is None:
            raise ValueError("backend 'tensorrt' is available for the pixel family's denoiser only; export the "
                             "others as ONNX for trtexec")
        return compile_cached(net, shape, device, torch_tensorrt)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
