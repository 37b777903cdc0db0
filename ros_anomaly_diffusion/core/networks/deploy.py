"""Where the networks run (Settings.backend): torch eager, ONNX Runtime, or TensorRT.

- `with_backend(net, backend, device, inputs)`: the one switch. "torch" returns the module;
  "onnxruntime" wraps it in `OrtModule` (exported to ONNX once per weights and input shape,
  batch dynamic, cached on disk, run by ONNX Runtime's CPU provider); "tensorrt" compiles with
  torch-tensorrt (`compile_cached`). A backend whose package or device is missing is refused with
  a ValueError saying what to install.
- `compile_cached()` compiles with torch-tensorrt (fp16), caching the compiled module under a
  key of (weights, input shape, precision), and warms it up; a compiler failure returns the
  eager module and the one-line reason.
- `export_onnx()`: the denoiser as ONNX for other runtimes (TensorRT's trtexec on a Jetson).
"""
from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "trt"
ONNX_CACHE = Path.home() / ".cache" / "ros_anomaly_diffusion" / "onnx"
BACKENDS = ("torch", "onnxruntime", "tensorrt")


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


def export_onnx(net: nn.Module, shape: tuple[int, ...], path: str | Path, opset: int = 18) -> Path:
    """The denoiser as ONNX with inputs x (shape) and t (batch,), output the model output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.randn(shape), torch.full((shape[0],), 500, dtype=torch.long))
    _onnx_export(_Timestepped(net.float().eval().cpu()), example, path, ("x", "t"), opset=opset)
    return path


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: tuple[str, ...],
                 dynamic_batch: bool = False, opset: int = 18) -> None:
    """torch.onnx.export with the package's names (inputs as given, output "out"); with
    dynamic_batch, dimension 0 of every input and the output is free."""
    dynamic = {n: {0: "batch"} for n in (*input_names, "out")} if dynamic_batch else None
    torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=["out"],
                      opset_version=opset, dynamo=False, dynamic_axes=dynamic)


class OrtModule(nn.Module):
    """A module run by ONNX Runtime (CPU): same call, same outputs (within float rounding).

    The wrapped module is exported on the first call with each input shape (batch dynamic) to
    `cache_dir/<weights and shape key>.onnx`, reused by later processes. A denoiser's integer
    timestep argument becomes a (batch,) int64 tensor, as in the export. Attributes other than
    the call (e.g. a denoiser's `config`) are the wrapped module's."""

    def __init__(self, net: nn.Module, inputs: tuple[str, ...] = ("x",), cache_dir: Path | None = None,
                 threads: int | None = None):
        import onnxruntime

        super().__init__()
        self.net, self.inputs, self.cache_dir = net.eval(), tuple(inputs), Path(cache_dir or ONNX_CACHE)
        self._ort, self._threads = onnxruntime, threads or torch.get_num_threads()
        self._sessions: dict[tuple, object] = {}
        self.exported: list[Path] = []  # files this instance exported (not found in the cache)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def _session(self, args: tuple[torch.Tensor, ...]):
        key = tuple(tuple(a.shape[1:]) for a in args)
        if key not in self._sessions:
            path = self.cache_dir / f"{cache_key(self.net, (0, *key[0]), 'onnx')}.onnx"
            if not path.is_file():
                self._export(args, path)
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self._threads
            # no busy-waiting between runs: ORT's spinning threads would take the cores from
            # the torch ops (resize, analysis) that run between its calls
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[key] = self._ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def _export(self, args: tuple[torch.Tensor, ...], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        module = _Timestepped(self.net) if len(args) == 2 else self.net
        tmp = path.with_suffix(f".{id(self)}.tmp")  # a concurrent process never reads a half-written file
        with torch.inference_mode(False), torch.no_grad():
            _onnx_export(module, tuple(a.cpu() for a in args), tmp, self.inputs, dynamic_batch=True)
        tmp.replace(path)
        self.exported.append(path)
        log.info("exported %s for ONNX Runtime: %s", type(self.net).__name__, path)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        args = (x, *rest)
        if len(args) == 2 and not torch.is_tensor(args[1]):  # a denoiser's integer timestep
            args = (x, torch.full((x.shape[0],), int(args[1]), dtype=torch.long))
        feed = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, args)}
        out = self._session(args).run(None, feed)[0]
        return torch.from_numpy(out).to(x.device)


def with_backend(net: nn.Module, backend: str, device: torch.device | str, inputs: tuple[str, ...] = ("x", "t"),
                 shape: tuple[int, ...] | None = None) -> tuple[nn.Module, str]:
    """(module to run, how it runs) for Settings.backend; ValueError when the backend cannot
    run here (package not installed, wrong device). `shape` (TensorRT only): the input shape."""
    device = torch.device(device)
    if backend == "torch":
        return net, "torch eager"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backend 'onnxruntime' runs on the CPU here, not on {device}: use backend "
                             "'tensorrt' (or 'torch') on a GPU")
        try:
            return OrtModule(net, inputs), "onnxruntime (CPU)"
        except ImportError:
            raise ValueError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from None
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
