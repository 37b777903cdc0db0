"""Backends on a CPU machine: ONNX Runtime for real (parity with torch on real RUGD frames, the
export cache), TensorRT refused with what it needs; the `export` command's ONNX for TensorRT (frame
graphs and denoisers; fixed or free batch; fp32 or fp16) that checks, loads and matches torch."""
import sys

import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core.networks import backends
from ros_anomaly_diffusion.core.networks.backends import OnnxModule, OrtModule, cache_key, with_backend
from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.settings import Settings
from ros_anomaly_diffusion.engine import export


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
        Settings.of(backend="torch", precision="bf16").validate()
    for backend in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, backend, None)  # as if not installed
        with pytest.raises(ValueError, match=f"needs the {backend} package: pip install {backend}"):
            with_backend(net, backend, "cpu")


def test_onnxruntime_matches_torch_and_exports_once(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "ONNX_CACHE", tmp_path)
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

    monkeypatch.setattr(backends, "ONNX_CACHE", tmp_path)
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
        graph = onnx_det.scorer.export_target(onnx_det.model_size).module
        assert isinstance(graph, OnnxModule) and len(graph.exported) == 1, variant
        assert not any(isinstance(m, OnnxModule) for m in graph.net.modules())  # no part exported apart


def test_engine_cache_key_follows_weights_shape_and_precision():
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    k = cache_key(net, (1, 3, 32, 40), "fp16")
    assert k == cache_key(net, (1, 3, 32, 40), "fp16")
    assert k != cache_key(net, (1, 3, 64, 80), "fp16") and k != cache_key(net, (1, 3, 32, 40), "int8")
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert k != cache_key(net, (1, 3, 32, 40), "fp16")


def _onnx_io(model) -> dict[str, tuple[str, list]]:
    """name -> (element type, dims: an int, or the name of a free dimension) of each input and output."""
    import onnx

    return {v.name: (onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*model.graph.input, *model.graph.output)}


def _conv_weight_types(model) -> set[str]:
    import onnx

    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {onnx.TensorProto.DataType.Name(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in inits}


def _export(tmp_path, capsys, *args) -> tuple[object, str, str]:
    """Runs `export`; (the loaded and checked ONNX model, its path, the printed text)."""
    import onnx

    out = tmp_path / "onnx"
    assert cli(["-q", "export", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    path = next(out.glob("*.onnx"))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model, str(path), printed


@pytest.mark.parametrize("options, batch, dtype", [([], 1, "FLOAT"), (["--batch", "2"], 2, "FLOAT"),
                                                   (["--dynamic-batch"], "batch", "FLOAT"),
                                                   (["--precision", "fp16", "--opset", "18"], 1, "FLOAT16")])
def test_export_writes_a_valid_onnx_denoiser(options, batch, dtype, tmp_path, capsys):
    """A pixel variant exports its denoiser net(x, t): fixed batch 1 by default, --batch N, a free
    batch, or the whole denoiser in float16; at TensorRT's opset unless told; ONNX Runtime runs
    it as torch does; the trtexec line names the file, with the shape range of a free batch."""
    import onnxruntime

    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector

    ckpt = make_checkpoint(tmp_path / "ckpt")
    model, path, printed = _export(tmp_path, capsys, "--variant", "ddim", "--checkpoint", str(ckpt), *options)
    assert path.endswith("ddim_denoiser.onnx")
    assert _onnx_io(model) == {"x": (dtype, [batch, 3, 32, 40]), "t": ("INT64", [batch]),
                               "out": (dtype, [batch, 3, 32, 40])}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (18 if "--opset" in options else 17)  # default: what JetPack 5.1/6.0's TensorRT parses
    assert _conv_weight_types(model) == {dtype}
    trtexec = f"trtexec --onnx={path} --saveEngine={path[:-5]}.plan " + ("--fp16" if dtype == "FLOAT" else
                                                                         "--stronglyTyped")
    if batch == "batch":  # the optimisation profile a free batch needs: 1 to 4 (the default MAX)
        trtexec += " --minShapes=x:1x3x32x40,t:1 --optShapes=x:4x3x32x40,t:4 --maxShapes=x:4x3x32x40,t:4"
    assert printed.splitlines()[-1].strip() == trtexec
    net = Detector(str(ckpt), variant_settings("ddim", checkpoint=str(ckpt))).scorer.networks()["denoiser"]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in ((1, 3) if batch == "batch" else (batch,)):
        x, t = torch.randn(n, 3, 32, 40), torch.tensor([10, 500, 999][:n] if n > 1 else [500])
        with torch.no_grad():
            want = net(x, t).numpy()
        got = session.run(None, {"x": x.numpy().astype(np.float16 if dtype == "FLOAT16" else np.float32),
                                 "t": t.numpy()})[0]
        assert np.abs(got.astype(np.float32) - want).max() < (1e-2 if dtype == "FLOAT16" else 1e-4)


@pytest.mark.parametrize("variant", ["knn", "inversion", "feature_edit"])
@pytest.mark.parametrize("options", [[], ["--dynamic-batch"], ["--batch", "2"], ["--precision", "fp16"]])
def test_export_writes_the_frame_graph_that_onnxruntime_runs_as_torch(variant, options, rugd_sample,
                                                                      family_checkpoint, tmp_path, capsys):
    """knn (the shipped model: no --checkpoint), inversion and feature_edit (its draws' noise a
    constant of the graph) export what the node runs per frame, their whole frame graph: input
    x, outputs maps (and frames). On a real RUGD frame at the model
    size (and its mirror images, batched) ONNX Runtime gives torch's maps and frame scores within
    1e-4 (float16 graph: 1e-2), at the fixed batch, or any batch where it is free; no If is left
    (TensorRT refuses the exporter's squeeze guard, whose branches differ in rank)."""
    import cv2
    import onnxruntime

    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.detector import Detector

    ckpt = "" if variant == "knn" else str(family_checkpoint("feature_diffusion"))
    model, path, printed = _export(tmp_path, capsys, "--variant", variant, *(["--checkpoint", ckpt] if ckpt else []),
                                   *options)
    det = Detector(ckpt, variant_settings(variant, checkpoint=ckpt))  # torch: the reference
    h, w = det.model_size
    ah, aw = det.settings.geometry.size
    batch = {"--dynamic-batch": "batch", "--batch": 2}.get(next(iter(options), None), 1)
    dtype = "FLOAT16" if "fp16" in options else "FLOAT"
    outputs = {"maps": (dtype, [batch, ah, aw])} | ({"frames": (dtype, [batch])} if variant == "inversion" else {})
    assert path.endswith(f"{variant}_frame.onnx") and _onnx_io(model) == {"x": (dtype, [batch, 3, h, w]), **outputs}
    assert [o.name for o in model.graph.output] == list(outputs)
    assert _conv_weight_types(model) == {dtype}  # fp16: the networks' weights
    assert "If" not in {n.op_type for n in model.graph.node}
    shapes = "".join(f" --{k}Shapes=x:{n}x3x{h}x{w}" for k, n in (("min", 1), ("opt", 4), ("max", 4))
                     if batch == "batch")  # the profile a free batch needs: 1 to 4 (the default MAX)
    flag = "--fp16" if dtype == "FLOAT" else "--stronglyTyped"
    assert printed.splitlines()[-1].strip() == f"trtexec --onnx={path} --saveEngine={path[:-5]}.plan {flag}{shapes}"

    rgb = next(iter(open_dataset(rugd_sample))).rgb()
    x = torch.from_numpy(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([x, x.flip(-1), x.flip(-2)])
    with torch.no_grad():
        want = det.scorer.export_target((h, w)).module(x)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in ((1, 3) if batch == "batch" else (batch,)):
        got = session.run(None, {"x": x[:n].numpy().astype(np.float16 if dtype == "FLOAT16" else np.float32)})
        diff = max(float(np.abs(g.astype(np.float32) - ref[:n]).max()) for g, ref in zip(got, want))
        print(f"{variant} {' '.join(options)} batch {n}: max |ONNX Runtime - torch| {diff:.1e}")
        assert len(got) == len(want) and diff < (1e-2 if dtype == "FLOAT16" else 1e-4)


class _SumsCells(torch.nn.Module):
    """A frame graph in miniature: a network, then arithmetic whose intermediate value (a sum over
    every cell, ~1.5e5, as the inversion NLL) is beyond float16 while its outputs are not."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        torch.nn.init.constant_(self.features.weight, 0.1)

    def forward(self, x):
        f = self.features(x)
        total = (f.square() + 10.0).sum((1, 2, 3))
        return torch.sigmoid(f.mean(1)), total / 1e5


def test_fp16_frame_graph_keeps_the_arithmetic_around_its_networks_in_float32(tmp_path):
    """precision fp16: float16 input, outputs and network weights, but the arithmetic between and
    after the networks in float32, where a sum may exceed float16's 65504 (all in float16, the
    frame score would be inf)."""
    import onnx
    import onnxruntime

    graph = _SumsCells().eval()
    exported = export.export_frame_graph(graph, (1, 3, 40, 48), tmp_path / "g.onnx", precision="fp16")
    model = onnx.load(str(exported.path))
    assert _onnx_io(model) == {"x": ("FLOAT16", [1, 3, 40, 48]), "maps": ("FLOAT16", [1, 40, 48]),
                               "frames": ("FLOAT16", [1])}
    assert _conv_weight_types(model) == {"FLOAT16"}
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = graph(x)
    assert float(want[1]) * 1e5 > 65504  # the sum itself is beyond float16
    got = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy().astype(np.float16)})
    for g, w in zip(got, want):
        assert np.isfinite(g).all() and np.abs(g.astype(np.float32) - w.numpy()).max() < 1e-2


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
    from ros_anomaly_diffusion.core.networks.backends import compile_cached

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
    from ros_anomaly_diffusion.core.networks.backends import compile_cached

    net = build_denoiser("unet", unet_config("pixel", "tiny", 3))
    out, how = compile_cached(net, (1, 3, 32, 40), torch.device("cpu"), _FakeTensorRT(fail=True), tmp_path)
    assert out is net and next(net.parameters()).dtype == torch.float32
    assert how == "TensorRT compilation failed (RuntimeError: unsupported operator)"
    assert not list(tmp_path.glob("*.ep"))


def test_auto_picks_onnxruntime_on_a_cpu_tensorrt_on_cuda_where_it_can_and_torch_otherwise(monkeypatch, tmp_path):
    import types

    assert backends.auto_backend("cpu") == "onnxruntime"
    assert backends.auto_backend("cuda", tensorrt=True) == "torch"  # no torch_tensorrt here
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    assert backends.auto_backend("cuda", tensorrt=True) == "tensorrt"
    assert backends.auto_backend("cuda", tensorrt=False) == "torch"  # a family that does not run on it
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(backends, "ONNX_CACHE", tmp_path / "a_file" / "onnx")  # no cache can be written there
    assert backends.auto_backend("cpu") == "torch"
    monkeypatch.setattr(backends, "ONNX_CACHE", tmp_path / "onnx")
    assert backends.auto_backend("cpu") == "onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert backends.auto_backend("cpu") == "torch"
    assert Settings().compute.backend == "auto"


@pytest.mark.parametrize("family, variant", [("pixel", ""), ("latent", ""), ("feature_diffusion", ""),
                                             ("feature_diffusion", "feature_edit"), ("knn", "")])
def test_the_default_backend_runs_every_family_on_onnxruntime_with_torchs_maps(family, variant, family_checkpoint,
                                                                               tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """backend auto (the default) on a CPU: ONNX Runtime, for every family, within 1e-4 of
    torch eager on the [0, 1] maps; the Detector keeps the requested settings ("auto") and
    says what it chose (`backend`, which the node's log and /diagnostics show)."""
    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector

    monkeypatch.setattr(backends, "ONNX_CACHE", tmp_path)
    ck = str(tiny_checkpoint if family == "pixel" else family_checkpoint(family))
    auto, eager = (Detector(ck, variant_settings(variant, checkpoint=ck, segments="none", **extra))
                   for extra in ({}, {"backend": "torch"}))
    assert (auto.backend, auto.settings.compute.backend, eager.backend) == ("onnxruntime", "auto", "torch")
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(2)]
    diff = max(float(np.abs(a.score - e.score).max())
               for a, e in zip(auto.process_batch(frames), eager.process_batch(frames)))
    print(f"{family} ({auto.variant.name}): max |score difference| auto (onnxruntime) vs torch {diff:.2e}")
    assert diff < 1e-4, family
    assert list(tmp_path.glob("*.onnx")), "nothing ran on ONNX Runtime"
