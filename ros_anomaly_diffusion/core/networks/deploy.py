"""GPU deployment: TensorRT compilation of a denoiser, with an on-disk engine cache, and
ONNX export for other runtimes.

`accelerate()` compiles with torch-tensorrt (fp16) when CUDA and torch_tensorrt are both
present, caching the compiled module under a key of (weights, input shape, precision),
and warms it up; otherwise it returns the eager module and the one-line reason.
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


def accelerate(net: nn.Module, shape: tuple[int, ...], device: torch.device,
               cache_dir: Path = DEFAULT_CACHE, warmup: int = 3) -> tuple[nn.Module, str]:
    """(module to run, reason it runs eager or 'tensorrt fp16 (cached|compiled)')."""
    if device.type != "cuda":
        return net, f"device {device} is not CUDA"
    try:
        import torch_tensorrt
    except ImportError:
        return net, "torch_tensorrt is not installed"
    return compile_cached(net, shape, device, torch_tensorrt, cache_dir, warmup)


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
    torch.onnx.export(_Timestepped(net.float().eval().cpu()), example, str(path), input_names=["x", "t"],
                      output_names=["out"], opset_version=opset, dynamo=False)
    return path
