"""GPU deployment path on a CPU machine: eager with a reason; ONNX export that loads and matches."""
import torch

from conftest import make_checkpoint
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.networks.deploy import accelerate, cache_key


def test_cpu_runs_eager_and_says_why():
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    out, reason = accelerate(net, (1, 3, 32, 40), torch.device("cpu"))
    assert out is net and "not CUDA" in reason


def test_engine_cache_key_follows_weights_shape_and_precision():
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    k = cache_key(net, (1, 3, 32, 40), "fp16")
    assert k == cache_key(net, (1, 3, 32, 40), "fp16")
    assert k != cache_key(net, (1, 3, 64, 80), "fp16") and k != cache_key(net, (1, 3, 32, 40), "int8")
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert k != cache_key(net, (1, 3, 32, 40), "fp16")


def test_export_writes_a_valid_onnx_denoiser(tmp_path):
    import onnx

    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert cli(["-q", "export", "--variant", "ddim", "--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx")]) == 0
    model = onnx.load(str(tmp_path / "onnx" / "ddim_denoiser.onnx"))
    onnx.checker.check_model(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["x", "t"] and dims == [1, 3, 32, 40]


class _FakeTensorRT:
    """Stands in for torch_tensorrt (no CUDA here): 'compiles' to the module itself and
    'saves' the engine as a marker file, counting calls, so the cache logic is checked."""

    def __init__(self, fail: bool = False):
        self.fail, self.compiled, self.loaded = fail, 0, 0
        self.module_ = None

    def compile(self, module, ir, inputs, enabled_precisions):
        if self.fail:
            raise RuntimeError("unsupported operator")
        assert ir == "dynamo" and enabled_precisions == {torch.half} and inputs[0].dtype == torch.half
        self.compiled += 1
        self.module_ = module
        return module

    def save(self, module, path, inputs):
        open(path, "wb").write(b"engine")

    def load(self, path):
        self.loaded += 1
        module = self.module_
        return type("Exported", (), {"module": lambda _self: module})()


def test_tensorrt_engine_is_compiled_once_then_loaded_from_the_cache(tmp_path):
    from ros_anomaly_diffusion.core.networks.deploy import compile_cached

    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        want = net(x, 500)
    trt = _FakeTensorRT()
    runner, how = compile_cached(net, (1, 3, 32, 40), torch.device("cpu"), trt, tmp_path, warmup=1)
    assert how.startswith("tensorrt fp16 (compiled") and trt.compiled == 1 and len(list(tmp_path.glob("*.ep"))) == 1
    with torch.no_grad():
        got = runner(x, 500)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-2)  # fp16 inside
    _, how = compile_cached(net, (1, 3, 32, 40), torch.device("cpu"), trt, tmp_path, warmup=1)
    assert how.startswith("tensorrt fp16 (cached") and trt.compiled == 1 and trt.loaded == 1
    _, how = compile_cached(net, (1, 3, 64, 80), torch.device("cpu"), trt, tmp_path, warmup=1)
    assert "compiled" in how and trt.compiled == 2  # another input shape: another engine


def test_failed_tensorrt_compilation_falls_back_to_the_eager_fp32_model(tmp_path):
    from ros_anomaly_diffusion.core.networks.deploy import compile_cached

    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    out, how = compile_cached(net, (1, 3, 32, 40), torch.device("cpu"), _FakeTensorRT(fail=True), tmp_path)
    assert out is net and next(net.parameters()).dtype == torch.float32
    assert how == "TensorRT compilation failed (RuntimeError: unsupported operator)"
    assert not list(tmp_path.glob("*.ep"))
