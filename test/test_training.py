"""A short training run end to end: masked loss, EMA, resume, calibration, checkpoint, eval."""
import json

import numpy as np
import pytest
import torch

from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.schedule import NoiseSchedule, ScheduleConfig
from ros_anomaly_diffusion.core.settings import variant_settings
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
from ros_anomaly_diffusion.core.training import DenoiserTrainer, TrainOptions, augment, load_frames, train


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_id=6, n_ood=3, size=(64, 80), seed=0)


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    opts = TrainOptions(image_size=(32, 40), preset="tiny", steps=6, batch_size=4, save_every=3,
                        calib_fraction=0.34)
    return train(scenes, out, opts, progress=False), opts


def test_ood_pixels_are_excluded_from_the_loss(scenes):
    frames = list(open_dataset(scenes))
    x, w = load_frames(frames, (32, 40))
    assert x.shape == (len(frames), 3, 32, 40) and 0 <= x.min() and x.max() <= 1
    for f, wi in zip(frames, w):
        assert (wi.min() == 0) == bool(f.is_ood(min_pixels=1)), f.name
    # With a network that predicts zeros, the loss is the weighted mean of target^2:
    # changing the frame only where the weight is 0 must not change it.
    class Zeros(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            return torch.zeros_like(x)

    trainer = DenoiserTrainer(Zeros(), NoiseSchedule(ScheduleConfig()), TrainOptions(), scenes)
    wgt = torch.ones(2, 1, 32, 40)
    wgt[..., :16, :] = 0
    x0 = x[:2] * 2 - 1
    changed = x0.clone()
    changed[..., :16, :] = -changed[..., :16, :]
    loss = lambda frames, weights: trainer.loss(frames, weights, torch.Generator().manual_seed(1)).item()
    assert loss(x0, wgt) == pytest.approx(loss(changed, wgt), rel=1e-6)
    assert loss(x0, torch.ones_like(wgt)) != pytest.approx(loss(changed, torch.ones_like(wgt)), rel=1e-3)


def test_augment_keeps_images_and_masks_aligned():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 32, 40)
    x[..., :, :10] = 1.0  # a bright band on the left ...
    w = (x[:, :1] == 0).float()  # ... that the weights mask out
    xa, wa = augment(x, w, gen)
    bright = xa.mean(1, keepdim=True) > 0.5
    assert ((wa == 0) == bright).float().mean() > 0.95


def test_training_writes_a_loadable_calibrated_checkpoint(trained):
    out, opts = trained
    config = ckpt.load_config(out)
    assert config["family"] == "pixel" and config["training"]["steps"] == 6
    assert {"denoiser.safetensors"} == set(config["files"])
    cal = config["calibration"]["ddim"]
    assert 0 <= cal["mask_threshold"] <= 1 and 0 <= cal["frame_threshold"] <= 1
    assert set(cal["frames"]).isdisjoint(config["training"]["frames"])  # held out
    det = Detector(out, variant_settings("ddim", checkpoint=str(out), steps=2, segments="none"))
    assert det.mask_threshold == pytest.approx(cal["mask_threshold"])
    r = det.process(np.zeros((50, 60, 3), np.uint8))
    assert r.score.shape == r.mask.shape == (50, 60) and r.score.dtype == np.float32


def test_resume_continues_from_the_saved_step(trained, scenes):
    out, opts = trained
    state = ckpt.load_config(out / "train_state")
    assert state["step"] == 6
    before = ckpt.load_tensors(out / "train_state", "model")
    opts2 = TrainOptions(**{**opts.__dict__, "steps": 8, "calib_fraction": 0})
    train(scenes, out, opts2, progress=False)
    assert ckpt.load_config(out)["training"]["steps"] == 8
    after = ckpt.load_tensors(out / "train_state", "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_eval_cli_writes_metrics_and_overlays(trained, scenes, tmp_path):
    out, _ = trained
    code = cli(["-q", "eval", "--data", str(scenes), "--checkpoint", str(out), "--out", str(tmp_path),
                "--set", "steps=2", "--set", "segments=none"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("pixel_ap", "pixel_auroc", "fpr95", "f_star", "frame_auroc", "latency_ms", "nfe"):
        assert key in metrics
    assert metrics["nfe"] == 2 and 0 <= metrics["pixel_auroc"] <= 1
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 9
    assert (tmp_path / "sheet.png").stat().st_size > 1000


def test_cli_reports_bad_paths_without_traceback(tmp_path, capsys):
    assert cli(["-q", "eval", "--data", str(tmp_path / "none"), "--checkpoint", str(tmp_path),
                "--out", str(tmp_path / "o")]) == 1
