"""Weight-only quantization: layer selection, int8 per-channel scales, quantized
checkpoints on disk (real int8 tensors, file sizes), loading through the Detector,
on-the-fly quantization and tampered configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import pixel_checkpoint
from safetensors import safe_open

from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.networks import quantization as Q
from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, load_denoiser, runtime_denoiser, unet_config
from ros_anomaly_diffusion.engine.quantize import quantize_checkpoint

SIZE = (32, 40)


def _unet(preset: str = "tiny"):
    torch.manual_seed(0)
    return build_denoiser("unet", unet_config("pixel", preset, 3, SIZE)).eval()


def _file_bytes(directory) -> int:
    return (directory / "denoiser.safetensors").stat().st_size


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small preset, fp32, and its four quantized copies."""
    root = tmp_path_factory.mktemp("quant")
    src = pixel_checkpoint(root / "fp32", preset="small", image_size=SIZE)
    out = {"fp32": src}
    for precision in Q.PRECISIONS:
        for layers in Q.LAYERS:
            out[f"{precision}-{layers}"] = quantize_checkpoint(src, root / f"{precision}-{layers}", precision, layers)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_tiny")
    src = pixel_checkpoint(root / "fp32", preset="tiny", image_size=SIZE)
    ckpt.update_config(src, calibration={"ddim": {"mask_threshold": 0.3, "frame_threshold": 0.5}})
    return src, quantize_checkpoint(src, root / "int8", "int8", "selected")


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_selected_layers_follow_the_rules(preset):
    net = _unet(preset)
    names = Q.selected_layer_names(net)
    assert names and len(names) == len(set(names))
    for n in names:
        leaf = n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0"
        assert leaf in ("conv1", "conv2", "conv_shortcut", "to_q", "to_k", "to_v", "to_out.0"), n
        assert ".resnets." in n or ".attentions." in n, n
    never = ("conv_in", "conv_out", "time_embedding", "time_emb_proj", "norm", "downsamplers", "upsamplers")
    assert not [n for n in names if any(w in n for w in never)]
    # every ResNet conv and every attention projection is in
    for n, m in net.named_modules():
        if ".resnets." in n and n.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv_shortcut"):
            assert n in names
        if ".attentions." in n and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            assert n in names and f"{n.rsplit('.', 1)[0]}.to_out.0" in names
    everything = Q.selected_layer_names(net, "all")
    assert {"net.conv_in", "net.conv_out", "net.time_embedding.linear_1"} <= set(everything)
    assert set(names) < set(everything)
    assert all(isinstance(net.get_submodule(n), (torch.nn.Conv2d, torch.nn.Linear)) for n in everything)
    # the answer does not change once quantized (prepare/load relies on that)
    assert Q.selected_layer_names(Q.quantize(net, "int8")) == names


def test_selected_layers_of_a_dit():
    from diffusers import DiTTransformer2DModel, Transformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                sample_size=8, patch_size=2, norm_num_groups=2)
    names = Q.selected_layer_names(dit)
    expected = {f"transformer_blocks.{i}.{s}" for i in range(2)
                for s in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert set(names) == expected
    # adaLN-single DiT (the latent variant's Transformer2DModel): same rule
    single = Transformer2DModel(in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                attention_head_dim=8, patch_size=1, sample_size=8, norm_type="ada_norm_single",
                                use_additional_conditions=False, cross_attention_dim=None, caption_channels=None,
                                norm_elementwise_affine=False, num_embeds_ada_norm=1000)
    names = Q.selected_layer_names(single)
    assert names and not [n for n in names if n.startswith(("pos_embed", "proj_out", "adaln_single"))]
    assert all(".attn1." in n or ".ff." in n for n in names)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = single(x, timestep=torch.tensor([10])).sample
        out = Q.quantize(single, "int8").forward(x, timestep=torch.tensor([10])).sample
    assert ((out - ref).norm() / ref.norm()) < 0.05


# --------------------------------------------------------------------------- int8 arithmetic


def test_int8_per_channel_scales_bound_the_error():
    torch.manual_seed(1)
    w = torch.randn(6, 5, 3, 3) * torch.tensor([1e-3, 0.02, 0.5, 3.0, 40.0, 0.0]).view(-1, 1, 1, 1)
    q, scale = Q.quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) <= 127
    assert torch.allclose(scale[:5], w[:5].abs().amax(dim=(1, 2, 3)) / 127)
    assert scale[5] == 1.0 and not q[5].any()  # all-zero channel: guarded, stays zero
    err = (w - q.float() * scale.view(-1, 1, 1, 1)).abs().amax(dim=(1, 2, 3))
    assert (err <= scale / 2 * (1 + 1e-5)).all(), (err, scale)
    assert q[0].abs().max() == 127  # tiny weights are not zeroed (the reference's [-8, 7] clamp did that)

    conv = torch.nn.Conv2d(5, 6, 3, padding=1, stride=2)
    conv.weight.data.copy_(w)
    qc = Q.QuantizedConv2d.from_float(conv)
    x = torch.randn(2, 5, 9, 11)
    expect = torch.nn.functional.conv2d(x, q.float() * scale.view(-1, 1, 1, 1), conv.bias, 2, 1)
    assert torch.allclose(qc(x), expect, atol=1e-5)
    assert qc(x.double()).dtype == torch.float64  # computes in the input's dtype
    lin = torch.nn.Linear(7, 4)
    ql = Q.QuantizedLinear.from_float(lin)
    assert ql.weight_int8.dtype == torch.int8 and ql.bias.dtype == torch.float32
    x = torch.randn(3, 7)
    assert (ql(x) - lin(x)).abs().max() <= (ql.weight_scale / 2 * x.abs().sum(1).max()).max() + 1e-5


# --------------------------------------------------------------------------- checkpoints


def test_quantized_checkpoints_on_disk(small, capsys):
    fp32 = _file_bytes(small["fp32"])
    ratios = {k: _file_bytes(d) / fp32 for k, d in small.items() if k != "fp32"}
    with capsys.disabled():
        print("\nsmall preset, denoiser.safetensors vs fp32:", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["int8-all"] <= 0.35
    assert ratios["int8-selected"] < ratios["fp16-selected"]
    assert ratios["int8-selected"] < 0.40  # small: ~0.36 (up/down-sampling and time projections stay fp32)
    assert 0.49 <= ratios["fp16-all"] <= 0.52
    assert ratios["fp16-all"] <= ratios["fp16-selected"] <= 0.6

    config = ckpt.load_config(small["int8-selected"])
    assert config["quantization"] == {"precision": "int8", "layers": "selected", "files": ["denoiser"]}
    assert config["denoiser"] == ckpt.load_config(small["fp32"])["denoiser"]
    selected = Q.selected_layer_names(_unet("small"))
    with safe_open(str(small["int8-selected"] / "denoiser.safetensors"), "pt") as f:
        keys = set(f.keys())
        for n in selected:
            assert f.get_slice(f"{n}.weight_int8").get_dtype() == "I8"
            assert f.get_slice(f"{n}.weight_scale").get_dtype() == "F32"
            assert f.get_slice(f"{n}.bias").get_dtype() == "F32"
            assert f"{n}.weight" not in keys
        assert f.get_slice("net.conv_in.weight").get_dtype() == "F32"
    with safe_open(str(small["fp16-selected"] / "denoiser.safetensors"), "pt") as f:
        assert f.get_slice(f"{selected[0]}.weight").get_dtype() == "F16"
        assert f.get_slice(f"{selected[0]}.bias").get_dtype() == "F32"
        assert f.get_slice("net.conv_out.weight").get_dtype() == "F32"


def test_reference_preset_int8_selected_file_is_at_most_35_percent(tmp_path, capsys):
    """The size target on the reference-sized UNet, whose weights sit mostly in ResNet convs
    and attention (the small preset keeps 13 % in fp32 up/down-sampling and time layers)."""
    src = pixel_checkpoint(tmp_path / "fp32", preset="reference", image_size=SIZE)
    ratios = {f"{p}-selected": _file_bytes(quantize_checkpoint(src, tmp_path / p, p, "selected")) / _file_bytes(src)
              for p in Q.PRECISIONS}
    with capsys.disabled():
        print("\nreference preset, denoiser.safetensors vs fp32:", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["int8-selected"] <= 0.35 and ratios["fp16-selected"] <= 0.56


def test_quantized_denoisers_stay_close_to_fp32(small):
    config = ckpt.load_config(small["fp32"])
    ref_net = load_denoiser(small["fp32"], config)
    torch.manual_seed(3)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        ref = ref_net(x, 400)
        for key, tol in (("int8-selected", 0.03), ("int8-all", 0.04), ("fp16-selected", 2e-3), ("fp16-all", 2e-3)):
            net = load_denoiser(small[key], ckpt.load_config(small[key]))
            kinds = _layer_kinds(net)
            assert kinds and all(k.startswith("Quantized" if key.startswith("int8") else "Fp16") for k in kinds)
            assert net.net.dtype == torch.float32  # diffusers' dtype: time embedding stays fp32
            out = net(x, 400)
            rel = float((out - ref).norm() / ref.norm())
            assert rel < tol, (key, rel)
            if key == "int8-selected":  # int8 stays int8 in memory
                assert net.net.conv_in.weight.dtype == torch.float32
                assert net.get_submodule(Q.selected_layer_names(net)[0]).weight_int8.dtype == torch.int8


def test_detector_loads_quantized_checkpoint_and_matches_on_the_fly(tiny):
    from ros_anomaly_diffusion.core.detector import Detector
    from ros_anomaly_diffusion.core.settings import Settings

    src, quantized = tiny
    frame = np.random.default_rng(0).integers(0, 255, (48, 60, 3), dtype=np.uint8)
    common = dict(variant="ddim", steps=2, start_timestep=300, segments="none")
    stored = Detector(quantized, Settings.of(checkpoint=str(quantized), **common))
    live = Detector(src, Settings.of(checkpoint=str(src), quantization="int8", **common))
    a, b = stored.scorer.networks()["denoiser"], live.scorer.networks()["denoiser"]
    assert _layer_kinds(a) == _layer_kinds(b) != {}
    # what /diagnostics says of it: int8 and float32 (biases, the layers not selected) weights,
    # less than half the fp32 network's size
    fp32 = Q.weight_summary(load_denoiser(src, ckpt.load_config(src)))
    assert set(Q.weight_summary(a).split()[2].split("+")) == {"int8", "float32"} and fp32.endswith(" MB float32")
    assert float(Q.weight_summary(a).split()[0]) < 0.5 * float(fp32.split()[0])
    assert not _layer_kinds(runtime_denoiser(src, ckpt.load_config(src), "cpu", Settings.of(**common).compute))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert va.dtype == vb.dtype and torch.equal(va, vb), k
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(a(x, 250), b(x, 250))
    ra, rb = stored.process(frame), live.process(frame)
    assert np.array_equal(ra.score, rb.score)
    assert stored.mask_threshold == 0.3  # calibration copied unchanged


def test_tampered_quantization_config_is_refused(small, tmp_path):
    import shutil

    from ros_anomaly_diffusion.core.detector import Detector
    from ros_anomaly_diffusion.core.settings import Settings

    cases = [("int8-selected", {"precision": "fp16", "layers": "selected", "files": ["denoiser"]}),
             ("int8-selected", {"precision": "int8", "layers": "all", "files": ["denoiser"]}),
             ("fp16-selected", {"precision": "int8", "layers": "selected", "files": ["denoiser"]}),
             ("fp16-selected", None)]  # fp16 tensors under a config that says fp32: same keys, wrong dtypes
    for i, (key, entry) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(small[key], bad)
        config = json.loads((bad / ckpt.CONFIG).read_text())
        if entry is None:
            config.pop("quantization")
        else:
            config["quantization"] = entry
        (bad / ckpt.CONFIG).write_text(json.dumps(config))
        with pytest.raises(ckpt.CheckpointError, match="denoiser.safetensors"):
            load_denoiser(bad, ckpt.load_config(bad))
    with pytest.raises(ckpt.CheckpointError, match="denoiser.safetensors"):
        Detector(bad, Settings.of(checkpoint=str(bad), variant="ddim", segments="none"))
    (bad / ckpt.CONFIG).write_text(json.dumps({**config, "quantization": {"precision": "int4", "layers": "all"}}))
    with pytest.raises(ckpt.CheckpointError, match="config.json"):
        load_denoiser(bad, ckpt.load_config(bad))
    with pytest.raises(ckpt.CheckpointError, match="already quantized"):
        quantize_checkpoint(small["int8-all"], tmp_path / "twice", "int8", "all")
    with pytest.raises(ValueError):
        quantize_checkpoint(small["fp32"], tmp_path / "x", "int4", "selected")


def test_quantize_cli(small, tmp_path, capsys):
    from ros_anomaly_diffusion.cli import main

    out = tmp_path / "cli_int8"
    assert main(["quantize", "--checkpoint", str(small["fp32"]), "--out", str(out), "--precision", "int8",
                 "--layers", "all"]) == 0
    text = capsys.readouterr().out
    assert "ratio 0.2" in text and "MB ->" in text
    assert ckpt.load_config(out)["quantization"]["layers"] == "all"
    assert main(["quantize", "--checkpoint", str(out), "--out", str(tmp_path / "again"),
                 "--precision", "int8"]) == 1


# --------------------------------------------------------------------------- every family with a denoiser

# family -> the variant that loads it; knn has no denoiser
DENOISER_FAMILIES = {"latent": "dcae", "feature_diffusion": "inversion"}
TOLERANCE = {"int8": 0.05, "fp16": 5e-3}  # relative L2 error of one denoiser call vs fp32


def _family_settings(family: str, checkpoint, **changes):
    from ros_anomaly_diffusion.core.settings import Settings

    # backend torch: these tests look inside the torch modules that quantization produces
    return Settings.of(checkpoint=str(checkpoint), variant=DENOISER_FAMILIES[family], segments="none", steps=2,
                    start_timestep=300, backend="torch", **changes)


def _predicted_layers(config: dict) -> list[str]:
    """What the "selected" rule picks in a freshly built float denoiser of this checkpoint."""
    kind, cfg = config["denoiser"]["kind"], config["denoiser"]["config"]
    names = Q.selected_layer_names(build_denoiser(kind, cfg))
    if kind == "dit":  # per transformer block: four attention projections and two feed-forward layers
        assert len(names) == 6 * cfg["num_layers"]
    elif kind in ("cell", "local"):  # bounded receptive field: both convolutions of every residual block
        assert names == [f"blocks.{i}.conv{j}" for i in range(cfg["blocks"]) for j in (1, 2)], names
    else:  # the features UNet: ResNet convs, and the projections of its mid-block attention
        assert all(".resnets." in n and n.endswith(("conv1", "conv2", "conv_shortcut"))
                   or n.startswith("net.mid_block.attentions.") and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
                   for n in names), names
    return names


def _layer_kinds(net: torch.nn.Module) -> dict[str, int]:
    """How many quantized layers of each type the network holds."""
    kinds: dict[str, int] = {}
    for m in net.modules():
        if isinstance(m, Q.QUANTIZED_TYPES):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return kinds


def _quantized_layers(net: torch.nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, Q.QUANTIZED_TYPES)]


def _denoiser_input(config: dict) -> torch.Tensor:
    cfg = config["denoiser"]["config"]
    grid = config["latent_size"] if config["family"] == "latent" else config["features"]["grid"]
    return torch.randn(1, cfg["in_channels"], *grid, generator=torch.Generator().manual_seed(5))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("precision", Q.PRECISIONS)
@pytest.mark.parametrize("family", sorted(DENOISER_FAMILIES))
def test_every_family_with_a_denoiser_loads_quantized(family, precision, family_checkpoint):
    from ros_anomaly_diffusion.core.detector import Detector

    src = family_checkpoint(family)
    config = ckpt.load_config(src)
    ref = Detector(src, _family_settings(family, src)).scorer.networks()["denoiser"]
    net = Detector(src, _family_settings(family, src, quantization=precision)).scorer.networks()["denoiser"]
    predicted = _predicted_layers(config)
    assert not _quantized_layers(ref)
    assert predicted and _quantized_layers(net) == predicted, family
    kind = "Quantized" if precision == "int8" else "Fp16"
    assert all(type(net.get_submodule(n)).__name__.startswith(kind) for n in predicted)
    x = _denoiser_input(config)
    with torch.no_grad():
        rel = _rel(net(x, 400), ref(x, 400))
    print(f"{family} {precision}: {len(predicted)} layers, rel. error {rel:.2e}")
    assert 0 < rel < TOLERANCE[precision], (family, precision, rel)


@pytest.mark.parametrize("family", sorted(DENOISER_FAMILIES))
def test_quantize_cli_checkpoint_of_every_family_loads_and_matches(family, family_checkpoint, tmp_path, capsys):
    from ros_anomaly_diffusion.cli import main
    from ros_anomaly_diffusion.core.detector import Detector

    src = family_checkpoint(family)
    out = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", str(src), "--out", str(out), "--precision", "int8"]) == 0
    assert "MB ->" in capsys.readouterr().out
    config = ckpt.load_config(out)
    assert config["quantization"] == {"precision": "int8", "layers": "selected", "files": ["denoiser"]}
    predicted = _predicted_layers(config)
    with safe_open(str(out / "denoiser.safetensors"), "pt") as f:
        assert {f.get_slice(f"{n}.weight_int8").get_dtype() for n in predicted} == {"I8"}
    stored = Detector(out, _family_settings(family, out))
    live = Detector(src, _family_settings(family, src, quantization="int8"))
    a, b = stored.scorer.networks()["denoiser"], live.scorer.networks()["denoiser"]
    assert _quantized_layers(a) == predicted
    assert a.get_submodule(predicted[0]).weight_int8.dtype == torch.int8  # int8 in memory too
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    frame = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(stored.process(frame).score, live.process(frame).score)


@pytest.mark.parametrize("family", sorted(DENOISER_FAMILIES))
def test_bench_quantization_row_runs_quantized(family, family_checkpoint, tmp_path):
    """`<variant>:quantization=fp16` in `bench` (its checkpoint_for, then the Detector as run_row builds it)."""
    import shutil

    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector
    from ros_anomaly_diffusion.engine.bench_rows import checkpoint_for

    shutil.copytree(family_checkpoint(family), tmp_path / family)
    variant = DENOISER_FAMILIES[family]
    path, settings = checkpoint_for(tmp_path, variant, {"quantization": "fp16"})
    assert settings == {}
    assert path == tmp_path / f"{family}-fp16-selected"
    det = Detector(path, variant_settings(variant, checkpoint=str(path), segments="none", backend="torch"))
    assert _quantized_layers(det.scorer.networks()["denoiser"]) == _predicted_layers(ckpt.load_config(path))


def test_a_rule_that_selects_nothing_is_refused_naming_the_family(family_checkpoint, monkeypatch, tmp_path):
    from ros_anomaly_diffusion.core.detector import Detector

    src = family_checkpoint("latent")
    monkeypatch.setattr(Q, "selected_layer_names", lambda net, layers="selected": [])
    with pytest.raises(ValueError, match="'latent' family.*selects no layer"):
        Detector(src, _family_settings("latent", src, quantization="int8"))
    with pytest.raises(ValueError, match="'latent' family.*selects no layer"):
        quantize_checkpoint(src, tmp_path / "none", "fp16")


def test_knn_has_no_denoiser_and_refuses_quantization(family_checkpoint, tmp_path):
    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector
    from ros_anomaly_diffusion.core.settings import Settings

    src = family_checkpoint("knn")
    for precision in Q.PRECISIONS:
        with pytest.raises(ValueError, match="'knn' has no denoiser"):
            variant_settings("knn", checkpoint=str(src), quantization=precision)
        with pytest.raises(ValueError, match="'knn' has no denoiser"):
            Detector(src, Settings.of(checkpoint=str(src), variant="knn", segments="none", quantization=precision))
    with pytest.raises(ckpt.CheckpointError, match="'knn' checkpoint, with no denoiser"):
        quantize_checkpoint(src, tmp_path / "q", "int8")
