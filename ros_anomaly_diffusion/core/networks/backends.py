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

Writing ONNX files for TensorRT's own tool (trtexec on a robot) is engine/export.py's.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "trt"
ONNX_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "onnx"
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ONNX_BACKENDS = ("onnxruntime", "openvino")  # the backends that run exported ONNX files


def cache_key(net: nn.Module, shape: tuple[int, ...], precision: str) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(f"{tuple(shape)}:{precision}:{torch.__version__}".encode())
    return h.hexdigest()[:24]


class Timestepped(nn.Module):
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
            wrapped = Timestepped(copy.deepcopy(net).half().eval())  # `net` stays fp32: the fallback, the cache key
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


def onnx_export(module: nn.Module, args: tuple, path: Path, input_names: tuple[str, ...],
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
        module = Timestepped(self.net) if len(args) == 2 else self.net
        # a concurrent process (two detector nodes starting at once) never reads a half-written file
        tmp = path.with_suffix(f".{os.getpid()}.{id(self)}.tmp")
        with torch.inference_mode(False), torch.no_grad():
            onnx_export(module, tuple(a.cpu() for a in args), tmp, self.inputs, dynamic_batch=True,
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
    dependency of the package; faster than torch eager, docs/variants.md "Backends") where its export
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
