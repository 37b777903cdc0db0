"""The inversion variant: features, DDIM inversion formulas, scores in [0, 1], training, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import feature_checkpoint
from conftest import make_legacy_feature_checkpoint, random_frame

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core import samplers
from ros_anomaly_diffusion.core.families import feature_space as fs
from ros_anomaly_diffusion.core.families import feature_diffusion as inv
from ros_anomaly_diffusion.core.networks import backbone
from ros_anomaly_diffusion.core.datasets import cell_weights
from ros_anomaly_diffusion.core.data import OOD
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.samplers import NoiseSchedule
from ros_anomaly_diffusion.core.settings import Settings
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
from ros_anomaly_diffusion.engine.training import TrainOptions


def ddim_sample(net, schedule, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """The DDIM sampler (eta = 0) back down the same timesteps: the inverse of Editor.invert."""
    down = timesteps[::-1]
    for t, t_prev in zip(down[:-1], down[1:]):
        a, a_prev = schedule.abar(t), schedule.abar(t_prev)
        eps = schedule.eps_from_output(net(x, t), x, t)
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(inv.SCHEDULE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    calib = {"inversion": {"mask_threshold": 0.5, "frame_threshold": 0.5}}
    return feature_checkpoint(tmp_path_factory.mktemp("inv") / "ck", image_size=(64, 96), calibration=calib)


@pytest.mark.parametrize("blocks", [None, (1, 2, 4, 10)])
def test_folded_features_match_the_feature_extractor(blocks):
    from ros_anomaly_diffusion.core.networks.backbone import FeatureExtractor

    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    fe = FeatureExtractor(backbone.FEATURE_STRIDES) if blocks is None else FeatureExtractor(blocks=blocks)
    h, w = 64 // backbone.GRID_STRIDE, 96 // backbone.GRID_STRIDE  # the taps resized to one grid, stacked
    ref = torch.cat([F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in fe(x).values()], 1)
    got = (backbone.StackedFeatures() if blocks is None else backbone.StackedFeatures(blocks))(x)
    assert got.shape == ref.shape == (1, fe.channels, 4, 6)
    assert fe.channels == (192 if blocks is None else 200)
    assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_checkpoints_record_their_taps_and_old_ones_load_with_theirs(tiny, tmp_path, monkeypatch):
    assert ckpt.load_config(tiny)["features"] == {"blocks": [0, 2, 4, 10], "strides": [2, 4, 8, 16],
                                                  "channels": 192, "grid": [4, 6], "grid_stride": 16}
    new = Detector(tiny, variant_settings("inversion", checkpoint=str(tiny)))
    assert new.scorer.export_target(new.model_size).module.features.taps == [0, 2, 4, 10]
    old = make_legacy_feature_checkpoint(tmp_path / "old", "feature_diffusion", monkeypatch)
    assert ckpt.load_config(old)["features"] == {"channels": 200, "grid": [4, 6], "grid_stride": 16,
                                                 "strides": [2, 4, 8, 16]}
    det = Detector(old, variant_settings("inversion", checkpoint=str(old)))
    graph = det.scorer.export_target(det.model_size).module
    assert graph.features.taps == [1, 2, 4, 10] and graph.mean.shape[1] == 200
    out = det.scorer(torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)))
    assert bool(torch.isfinite(out.maps).all()) and bool(torch.isfinite(out.frame_scores).all())


@pytest.mark.parametrize("features, match", [
    # an old config whose channel count its taps never gave
    ({"channels": 192, "strides": [2, 4, 8, 16]}, r"192 feature channels .* blocks \[1, 2, 4, 10\] give 200"),
    # recorded blocks that are not at the recorded strides
    ({"blocks": [1, 2, 4, 10], "strides": [2, 4, 8, 16], "channels": 200}, r"at strides \[4, 4, 8, 16\]"),
    ({"blocks": [0, 2, 4, 99], "strides": [2, 4, 8, 16], "channels": 192}, "outside EfficientNet-Lite0"),
    ({"channels": 200, "strides": [2, 32]}, r"strides \[32\] without recorded blocks"),
])
def test_a_config_whose_taps_do_not_match_is_refused(tiny, tmp_path, features, match):
    import shutil

    out = shutil.copytree(tiny, tmp_path / "ck")
    ckpt.update_config(out, features={"grid": [4, 6], "grid_stride": 16, **features})
    with pytest.raises(ckpt.CheckpointError, match=match):
        Detector(out, variant_settings("inversion", checkpoint=str(out)))


def test_timesteps_are_evenly_spaced_from_0_to_999():
    assert samplers.inversion_timesteps(3) == [0, 500, 999]
    assert samplers.inversion_timesteps(2) == samplers.inversion_timesteps(1) == [0, 999]
    ts = samplers.inversion_timesteps(5)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 5 and max(np.diff(ts)) - min(np.diff(ts)) <= 1


class Constant(torch.nn.Module):
    """A fake eps-network that ignores its input."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, t):
        self.calls.append(int(t))
        return torch.full_like(x, self.value)


def test_inversion_formula_against_a_hand_computation(schedule):
    x = torch.tensor([[[[0.5, -1.0]]]], dtype=torch.float64)
    c = 0.3
    net = Constant(c)
    got = samplers.Editor(net, schedule, None).invert(x, [0, 500, 999])
    assert net.calls == [0, 500]  # eps at the current timestep, S - 1 calls
    expected = x.clone()
    for t, t_next in ((0, 500), (500, 999)):
        a, a_next = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[t_next])
        x0 = expected / math.sqrt(a) - math.sqrt(1 / a - 1) * c
        expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * c
    assert torch.allclose(got, expected, atol=1e-12)
    # linear betas 1e-4..0.02: abar(999) is ~4e-5, so the latent is nearly the noise itself
    assert schedule.abar(999) < 1e-4 and torch.allclose(got, torch.full_like(got, c), atol=0.02)


def _gaussian_eps(schedule, mu: float, var: float):
    """The exact eps-predictor for data N(mu, var I): E[eps | x_t] (var 0: a point mass)."""
    def net(x, t):
        a = schedule.abar(int(t))
        return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * var + 1 - a)

    return net


def test_inversion_is_deterministic_and_undone_by_the_sampler(schedule):
    gen = torch.Generator().manual_seed(0)
    z = 0.3 + 0.7 * torch.randn(2, 8, 4, 6, generator=gen, dtype=torch.float64)
    for steps in (2, 3):
        ts = samplers.inversion_timesteps(steps)
        # constant eps, and the (input-dependent) exact model of a point mass: DDIM steps are
        # exact bijections there, so the sampler undoes the inversion for any S
        for net in (Constant(0.7), _gaussian_eps(schedule, 0.3, 0.0)):
            latent = samplers.Editor(net, schedule, None).invert(z, ts)
            assert torch.equal(latent, samplers.Editor(net, schedule, None).invert(z, ts))
            assert torch.allclose(ddim_sample(net, schedule, latent, ts), z, atol=1e-9)
    # the exact model of Gaussian ID data: few steps only approximate the ODE (the first step
    # sees eps(z, 0) ~ 0), so the reconstruction error and the latent's spread approach
    # their limits (0 and N(0, I)) as S grows
    net = _gaussian_eps(schedule, 0.3, 0.49)
    errors, spreads = [], []
    for steps in (3, 10, 50):
        latent = samplers.Editor(net, schedule, None).invert(z, samplers.inversion_timesteps(steps))
        back = ddim_sample(net, schedule, latent, samplers.inversion_timesteps(steps))
        errors.append(float((back - z).abs().max()))
        spreads.append(float(latent.std()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1 * float(z.abs().max())
    assert spreads[0] < spreads[1] < spreads[2] and 0.85 < spreads[2] < 1.1


def test_to_unit_is_monotone_in_range_and_does_not_saturate():
    u = torch.tensor([-1e4, -10.0, 0.0, 3.0, 6.0, 100.0, 1000.0])
    s = fs.to_unit(u)
    assert bool((s >= 0).all() and (s <= 1).all() and (s[1:] > s[:-1]).all())
    assert float(s[3]) == pytest.approx(0.5) and float(s[2]) < 0.1 and float(s[-1]) < 1.0
    assert float(s[4]) == pytest.approx(0.5 + 0.5 * 1.5 / (1 + 1.5**2) ** 0.5, rel=1e-6)  # +6 sd: 0.92


def test_cell_weights_exclude_every_cell_an_ood_pixel_falls_into():
    label = np.zeros((64, 96), np.uint8)
    label[17, 40] = OOD  # one pixel, cell (1, 2) of the 16-pixel grid
    w = cell_weights(label, (4, 6))[0, 0]
    assert w[1, 2] == 0 and int(w.sum()) == 23
    assert bool((cell_weights(None, (4, 6)) == 1).all())


def test_input_size_defaults_to_256x320_for_the_feature_family():
    assert fs.input_size(TrainOptions()) == (256, 320)
    assert fs.input_size(TrainOptions(image_size=(64, 96))) == (64, 96)  # an explicit size is honoured
    assert fs.input_size(TrainOptions(image_size=(128, 160))) == (128, 160)
    with pytest.raises(ValueError, match="multiple of 32"):
        fs.input_size(TrainOptions(image_size=(100, 100)))


def test_scores_in_unit_interval_with_the_right_shapes(tiny):
    settings = variant_settings("inversion", checkpoint=str(tiny), analysis_height=40, analysis_width=48)
    det = Detector(tiny, settings)
    assert det.nfe == 2 and det.model_size == (64, 96)
    out = det.scorer(torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1)))
    assert out.maps.shape == (3, 40, 48) and out.frame_scores.shape == (3,) and out.edited01 is None
    for t in (out.maps, out.frame_scores):
        assert bool(((t >= 0) & (t <= 1)).all())
    again = det.scorer(torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(out.maps, again.maps) and torch.equal(out.frame_scores, again.frame_scores)
    # the Detector reports the variant's own frame score, not the top-k mean of the map
    frame = random_frame(48, 64, seed=2)
    r = det.process(frame)
    own = det.scorer(det.to_model([frame])).frame_scores[0]
    assert r.score.shape == (48, 64) and r.frame_score == pytest.approx(float(own), abs=1e-6)
    assert 0.0 <= r.score.min() and r.score.max() <= 1.0
    # inversion_steps is a live setting: more steps, more network calls
    assert det.update(inversion_steps=4) == [] and det.nfe == 3


def test_feature_edit_scores_the_change_the_edit_makes(tiny):
    settings = variant_settings("feature_edit", checkpoint=str(tiny), analysis_height=40, analysis_width=48)
    det = Detector(tiny, settings)
    scorer = det.scorer
    assert det.nfe == 4  # config/feature_edit.yaml: the denoising error, 4 draws in one network call
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    out = scorer(x)
    assert out.maps.shape == (2, 40, 48) and out.edited01 is None and out.frame_scores is None
    assert bool(((out.maps >= 0) & (out.maps <= 1)).all())
    assert torch.equal(out.maps, scorer(x).maps)  # seeded: a frame always gets the same map
    # the edit score is live: guided DDIM edit vs the reconstruction, 5 steps each
    det.update(edit_score="edit", draws=1, start_timestep=250)
    assert det.nfe == 10
    assert not torch.allclose(scorer(x).maps, out.maps)
    config = ckpt.load_config(tiny)
    mean, std = fs.load_feature_stats(tiny, config)
    z = fs.standardise(fs.checkpoint_features(tiny, config, "cpu")(x), mean, std)
    run = dict(start_timestep=250, steps=5)
    schedule = NoiseSchedule(samplers.ScheduleConfig(**config["schedule"]))
    editor = samplers.Editor(scorer.networks()["denoiser"], schedule, clip=None)
    seeded = [editor.ddim(z, guidance=0.0, seed=seed, **run)[0] for seed in (0, 1)]
    assert not torch.equal(*seeded)
    # very strong guidance returns the input: compared with the features themselves, nothing changed
    det.update(reconstruction_guidance=0.0, guidance_scale=1e6)
    assert det.nfe == 5
    assert torch.allclose(editor.ddim(z, guidance=1e6, **run)[0][0], z, atol=1e-4)
    strong = scorer(x).maps
    assert float(strong.max() - strong.min()) < 1e-4 and float(strong.max()) < float(out.maps.min())
    # a reconstruction with the edit's own guidance is the edit: the distance is zero everywhere
    edits, refs = editor.ddim(z, guidance=0.5, reconstruction_guidance=0.5, **run)
    assert float((edits - refs).abs().max()) == 0.0
    # zero guidance from pure noise ignores the input: two frames end in nearly the same edit
    # (relative to its size; this untrained model's edits are far from unit scale)
    a = editor.ddim(z, start_timestep=999, steps=5, guidance=0.0)[0][0]
    b = editor.ddim(torch.flip(z, dims=[0]), start_timestep=999, steps=5, guidance=0.0)[0][0]
    assert float((a - b).abs().mean()) < 0.05 * float(a.abs().mean())


def test_feature_edit_refuses_a_checkpoint_without_its_statistics(tiny, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    config = ckpt.load_config(old)
    del config["edit_scores"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="train it again"):
        Detector(old, variant_settings("feature_edit", checkpoint=str(old)))
    Detector(old, variant_settings("inversion", checkpoint=str(old)))  # the inversion variant still runs


def test_training_and_eval_cli_write_a_loadable_checkpoint(tmp_path):
    from ros_anomaly_diffusion.cli import main

    data = make_synthetic_dataset(tmp_path / "syn", n_id=6, n_ood=3, size=(64, 80))
    out = tmp_path / "ck"
    assert main(["-q", "train", "--variant", "inversion", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--preset", "tiny", "--batch-size", "4", "--image-size", "64", "96"]) == 0
    config = ckpt.load_config(out)
    assert config["family"] == "feature_diffusion" and config["image_size"] == [64, 96]
    assert config["training"]["steps"] == 3 and (out / "train_state").is_dir()
    # the ID score statistics come from training frames the diffusion model never saw
    held = config["training"]["statistics_frames"]
    assert len(held) == 2 and set(held) < set(config["training"]["frames"])
    assert {"2", "3", "6"} <= set(config["scores"]) and set(config["scores"]["3"]) == {"pixel", "range", "nll",
                                                                                        "frame"}
    assert config["edit_scores"]["sampler"] == inv.EDIT_SAMPLER.to_dict() and config["edit_scores"]["pixel"]["std"] > 0
    stats = ckpt.load_tensors(out, "features")
    assert stats["mean"].shape == stats["std"].shape == (config["features"]["channels"],)
    calib = config["calibration"]["inversion"]
    assert 0 <= calib["mask_threshold"] <= 1 and 0 <= calib["frame_threshold"] <= 1
    det = Detector(out, Settings.of(variant="inversion", checkpoint=str(out), segments="none"))
    assert det.mask_threshold == calib["mask_threshold"]
    assert main(["-q", "eval", "--variant", "inversion", "--data", str(data), "--checkpoint", str(out),
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["variant"] == "inversion" and metrics["nfe"] == 2 and metrics["frames"] == 9
