"""Backends on a CPU machine: ONNX Runtime for real (parity with torch on real RUGD frames, the
export cache), TensorRT refused with what it needs; ONNX export that loads and matches."""
import sys

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.networks import deploy
from ros_anomaly_diffusion.core.networks.deploy import OnnxModule, OrtModule, cache_key, with_backend
from ros_anomaly_diffusion.core.settings import Settings


def test_backends_refuse_what_cannot_run_here_and_say_why(monkeypatch):
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    assert with_backend(net, "torch", "cpu") == (net, "torch eager")
    with pytest.raises(ValueError, match="backend 'tensorrt' needs a CUDA device, got cpu"):
        with_backend(net, "tensorrt", "cpu", shape=(1, 3, 32, 40))
    with pytest.raises(ValueError, match="backend must be one of"):
        with_backend(net, "tflite", "cpu")
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ValueError, match=f"backend '{backend}' runs on the CPU here, not on cuda"):
            with_backend(net, backend, "cuda")
    with pytest.raises(ValueError, match="precision 'bf16' runs on backend 'openvino' only"):
        with_backend(net, "onnxruntime", "cpu", precision="bf16")
    with pytest.raises(ValueError, match="precision='bf16' runs on backend 'openvino' only"):
        Settings(backend="torch", precision="bf16").validate()
    for backend in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, backend, None)  # as if not installed
        with pytest.raises(ValueError, match=f"needs the {backend} package: pip install {backend}"):
            with_backend(net, backend, "cpu")


def test_onnxruntime_matches_torch_and_exports_once(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "ONNX_CACHE", tmp_path)
    torch.manual_seed(0)
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3)).eval()
    x = torch.randn(2, 3, 32, 40)
    ort_net, how = with_backend(net, "onnxruntime", "cpu")
    assert isinstance(ort_net, OrtModule) and how == "onnxruntime (CPU)"
    with torch.inference_mode():
        for t in (999, torch.tensor([10, 500])):  # an int timestep or one per sample
            np.testing.assert_allclose(ort_net(x, t).numpy(), net(x, t).numpy(), atol=1e-4)
        ort_net(x[:1], 3)  # another batch size: the same export (batch is dynamic)
    assert len(ort_net.exported) == 1 and ort_net.exported[0].parent == tmp_path
    assert ort_net.config == net.config  # the denoiser's attributes pass through
    again = OrtModule(net, ("x", "t"))
    with torch.inference_mode():
        again(x, 5)
    assert again.exported == []  # a later process finds the cached export


@pytest.mark.parametrize("backend, precision, tolerance", [("onnxruntime", "fp32", 1e-4), ("openvino", "fp32", 1e-4),
                                                          ("openvino", "bf16", 0.05)])
def test_onnx_backends_give_the_same_maps_on_real_frames(backend, precision, tolerance, rugd_sample,
                                                         family_checkpoint, tmp_path, monkeypatch):
    """knn (the shipped model: backbone only) and inversion (backbone, denoiser calls and scores
    in one graph) on real RUGD frames, one at a time and batched as several cameras are: ONNX
    Runtime / OpenVINO and torch agree to float rounding; OpenVINO's bf16 (where the CPU has
    it) within a few hundredths of the [0, 1] scores."""
    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.detector import Detector

    monkeypatch.setattr(deploy, "ONNX_CACHE", tmp_path)
    frames = [f.rgb() for f in list(open_dataset(rugd_sample))[:3]]
    for variant, ck in (("knn", ""), ("inversion", str(family_checkpoint("feature_diffusion")))):
        torch_det, onnx_det = (Detector(ck, variant_settings(variant, checkpoint=ck, backend=b, precision=p,
                                                             segments="none"))
                               for b, p in (("torch", "fp32"), (backend, precision)))
        want = [torch_det.process(f).score for f in frames]
        got = [onnx_det.process(f).score for f in frames] + [r.score for r in onnx_det.process_batch(frames)]
        diff = max(float(np.abs(w - g).max()) for w, g in zip(want * 2, got))
        print(f"{variant}: max |score difference| torch vs {backend} {precision} {diff:.2e}")
        assert diff < tolerance, variant
        # one graph per frame (backbone, model and scores), exported once (the batch of 3 reuses it)
        graph = onnx_det.scorer.graph
        assert isinstance(graph, OnnxModule) and len(graph.exported) == 1, variant
        assert not isinstance(onnx_det.scorer.features, OnnxModule)


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
