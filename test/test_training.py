"""A short training run end to end: masked loss, EMA, resume, calibration, checkpoint, eval."""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.procmem import status_mb
from ros_anomaly_diffusion.core.datasets import FrameDataset, collate_frames
from ros_anomaly_diffusion.core.families.fitting import STATE, DenoiserTrainer, TrainOptions, augment
from ros_anomaly_diffusion.core.samplers import NoiseSchedule, ScheduleConfig
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
from ros_anomaly_diffusion.engine.training import train


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_id=6, n_ood=3, size=(64, 80), seed=0)


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    opts = TrainOptions(variant="ddim", image_size=(32, 40), preset="tiny", steps=6, batch_size=4, save_every=3,
                        calib_fraction=0.34)
    return train(scenes, out, opts, progress=False, also_calibrate=["ddpm"]), opts


def test_ood_pixels_are_excluded_from_the_loss(scenes):
    frames = list(open_dataset(scenes))
    dataset = FrameDataset(frames, (32, 40))
    batch = collate_frames([dataset[i] for i in range(len(frames))])
    x, w = batch.images, batch.weights
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
    # the variant trained for and the one asked for, each at its own thresholds
    assert set(config["calibration"]) == {"ddim", "ddpm"}
    assert config["calibration"]["ddim"]["frame_threshold"] != config["calibration"]["ddpm"]["frame_threshold"]
    cal = config["calibration"]["ddim"]
    assert 0 <= cal["mask_threshold"] <= 1 and 0 <= cal["frame_threshold"] <= 1
    assert set(cal["frames"]).isdisjoint(config["training"]["frames"])  # held out
    assert config["analysis_strides"] == [16, 32]  # a patch prior's edit is compared in the deepest taps
    det = Detector(out, variant_settings("ddim", checkpoint=str(out), steps=2, segments="none"))
    assert det.mask_threshold == pytest.approx(cal["mask_threshold"])
    assert det.scorer.distance.features.strides == (16, 32)
    r = det.process(np.zeros((50, 60, 3), np.uint8))
    assert r.score.shape == r.mask.shape == (50, 60) and r.score.dtype == np.float32


def test_every_training_option_is_a_train_flag_with_the_fields_default_and_range():
    from ros_anomaly_diffusion.cli import build_parser, train_options
    from ros_anomaly_diffusion.core.samplers import ScheduleConfig

    def parsed(*flags):
        return train_options(build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags]))

    assert parsed() == TrainOptions()
    opts = parsed("--ema-decay", "0.9", "--schedule", "num_train_timesteps=50", "--schedule",
                  "prediction_type=epsilon", "--image-size", "64", "80", "--frame-fpr", "0.1", "--variant", "ddim")
    assert opts.ema_decay == 0.9 and opts.image_size == (64, 80) and opts.frame_fpr == 0.1 and opts.variant == "ddim"
    assert opts.schedule == ScheduleConfig(num_train_timesteps=50, prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0.0, 1.0\], got 1.5"):
        parsed("--ema-decay", "1.5")
    with pytest.raises(ValueError, match=r"--schedule: unknown \['beta'\]"):
        parsed("--schedule", "beta=2")


def test_training_refuses_to_calibrate_a_variant_of_another_family(scenes, tmp_path):
    with pytest.raises(ValueError, match="knn cannot run a pixel checkpoint"):
        train(scenes, tmp_path, TrainOptions(variant="ddim", steps=1), progress=False, also_calibrate=["knn"])
    assert not (tmp_path / "config.json").exists()


def _record_fit_starts(monkeypatch) -> list[dict]:
    """Wrap DenoiserTrainer.fit to record, per call, the step and the state it starts from and the
    steps it takes: what a resumed run starts from, seen without touching the training code."""
    starts, fit = [], DenoiserTrainer.fit

    def recording_fit(trainer, sample_batch, total_steps, progress=True):
        start = {"step": trainer.step, "model": _clone(trainer.net.state_dict()), "ema": trainer.ema_state()}
        fit(trainer, sample_batch, total_steps, progress)
        starts.append({**start, "steps_taken": trainer.step - start["step"]})

    monkeypatch.setattr(DenoiserTrainer, "fit", recording_fit)
    return starts


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_running_the_same_command_again_resumes(trained, scenes, tmp_path, monkeypatch):
    """The `trained` run stopped after 6 steps; asked for 8, the same command takes 2 more steps
    from the saved step, weights, EMA and optimizer state instead of starting over."""
    trained_out, opts = trained
    out = shutil.copytree(trained_out, tmp_path / "ckpt")  # the module's checkpoint stays as trained
    saved = {part: ckpt.load_tensors(out / STATE, part) for part in ("model", "ema", "optimizer")}
    assert ckpt.load_config(out / STATE)["step"] == 6
    starts = _record_fit_starts(monkeypatch)
    train(scenes, out, TrainOptions(**{**opts.__dict__, "steps": 8, "calib_fraction": 0}), progress=False)
    [start] = starts
    assert (start["step"], start["steps_taken"]) == (6, 2)
    assert _differing(start["model"], saved["model"]) == []
    assert _differing(start["ema"], saved["ema"]) == []
    assert ckpt.load_config(out)["training"]["steps"] == ckpt.load_config(out / STATE)["step"] == 8
    # the Adam moments went on from the saved ones: their step counts are 6 + 2
    assert {float(v) for k, v in ckpt.load_tensors(out / STATE, "optimizer").items() if k.endswith(".step")} \
        == {float(v) + 2 for k, v in saved["optimizer"].items() if k.endswith(".step")} == {8.0}


def _tiny_trainer(out, seed: int) -> DenoiserTrainer:
    torch.manual_seed(seed)  # a different seed, a different initialisation
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3, (16, 20)))
    return DenoiserTrainer(net, NoiseSchedule(ScheduleConfig()), TrainOptions(save_every=1000), out)


def test_a_resumed_trainer_goes_on_exactly_as_the_interrupted_one_would(tmp_path):
    """Everything that steers training (step, raw and EMA weights, the EMA's decay warm-up, Adam
    moments) comes back: a trainer resumed from disk and the original one, both trained on from
    step 3 to 5, end bit for bit equal. (A single 5-step run is not the reference: `fit` seeds its
    generator with seed + step, so a run that starts at step 3 draws other batches and noise
    than one that passes step 3 in a single `fit`; the train state holds no generator state.)"""
    x = torch.rand(4, 3, 16, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def sample_batch(gen):
        return x[torch.randint(0, len(x), (2,), generator=gen)], torch.ones(2, 1, 16, 20)

    interrupted = _tiny_trainer(tmp_path, seed=0)
    interrupted.fit(sample_batch, 3, progress=False)  # saves its state at the last step
    resumed = _tiny_trainer(tmp_path, seed=1)
    assert _differing(resumed.net.state_dict(), interrupted.net.state_dict())  # not the same start
    assert resumed.load_state() and resumed.step == 3
    assert _differing(resumed.net.state_dict(), interrupted.net.state_dict()) == []
    for trainer in (interrupted, resumed):
        trainer.fit(sample_batch, 5, progress=False)
    assert resumed.step == interrupted.step == 5
    assert _differing(resumed.net.state_dict(), interrupted.net.state_dict()) == []
    assert _differing(resumed.ema_state(), interrupted.ema_state()) == []
    moments = [{f"{i}.{k}": v for i, s in t.opt.state_dict()["state"].items() for k, v in s.items()}
               for t in (resumed, interrupted)]
    assert _differing(*moments) == []


def test_gradient_accumulation_steps_the_optimizer_once_per_k_micro_batches(tmp_path):
    """grad_accum = 3: each optimizer step (and EMA step) takes 3 micro-batches, and Adam's step
    count is the optimizer steps, not the micro-batches."""
    torch.manual_seed(0)
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3, (16, 20)))
    trainer = DenoiserTrainer(net, NoiseSchedule(ScheduleConfig()), TrainOptions(save_every=1000, grad_accum=3),
                              tmp_path)
    drawn = []

    def sample_batch(gen):
        drawn.append(1)
        return torch.rand(2, 3, 16, 20, generator=gen) * 2 - 1, torch.ones(2, 1, 16, 20)

    trainer.fit(sample_batch, 4, progress=False)
    assert trainer.step == 4 and len(drawn) == 12
    assert {float(s["step"]) for s in trainer.opt.state_dict()["state"].values()} == {4.0}
    assert trainer.ema.optimization_step == 4


def test_eval_cli_writes_metrics_and_overlays(trained, scenes, tmp_path):
    out, _ = trained
    code = cli(["-q", "eval", "--variant", "ddim", "--data", str(scenes), "--checkpoint", str(out),
                "--out", str(tmp_path), "--set", "steps=2", "--set", "segments=none"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("pixel_ap", "pixel_auroc", "fpr95", "f_star", "frame_auroc", "latency_ms", "nfe"):
        assert key in metrics
    assert metrics["nfe"] == 8 and 0 <= metrics["pixel_auroc"] <= 1  # ddim.yaml: 4 draws, 2 steps each
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 9
    assert (tmp_path / "sheet.png").stat().st_size > 1000


def test_cli_reports_bad_paths_without_traceback(tmp_path, capsys):
    assert cli(["-q", "eval", "--data", str(tmp_path / "none"), "--checkpoint", str(tmp_path),
                "--out", str(tmp_path / "o")]) == 1


def test_train_reads_a_rosbag2_of_camera_frames(rugd_sample, tmp_path):
    """`train --data BAG` trains on the messages of the bag's image topic (decoded lazily), and
    records them by name; a folder of frames and a bag of the same frames give the same knn model."""
    from ros_anomaly_diffusion.ros.bag import folder_to_bag

    bag = tmp_path / "bag"
    folder_to_bag(rugd_sample, bag, count=5)
    args = ["-q", "train", "--variant", "knn", "--image-size", "64", "96", "--calib-fraction", "0"]
    assert cli([*args, "--data", str(bag), "--out", str(tmp_path / "from_bag")]) == 0
    frames = ckpt.load_config(tmp_path / "from_bag")["training"]["frames"]
    assert frames == [f"bag_{i:06d}" for i in range(5)]
    images = tmp_path / "images"
    images.mkdir()
    for f in list(open_dataset(rugd_sample))[:5]:
        shutil.copy(f.image_path, images / f.image_path.name)
    assert cli([*args, "--data", str(images), "--out", str(tmp_path / "from_folder")]) == 0
    for part in ("bank", "features"):
        a, b = ckpt.load_tensors(tmp_path / "from_bag", part), ckpt.load_tensors(tmp_path / "from_folder", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def _peak_rss_of_training(data, out) -> float:
    """Peak RSS (MB) of a `train` process, read from outside while it runs."""
    cmd = [sys.executable, "-m", "ros_anomaly_diffusion", "-q", "train", "--variant", "ddim", "--data", str(data),
           "--out", str(out), "--image-size", "64", "80", "--preset", "tiny", "--steps", "60", "--batch-size", "4",
           "--calib-fraction", "0", "--feature-cache-mb", "0"]  # streamed: a small set would be held
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, status_mb("VmHWM", proc.pid))
        except OSError:  # exited between poll and read
            break
        time.sleep(0.05)
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    return peak


def test_training_memory_does_not_grow_with_the_number_of_frames(tmp_path):
    """Training on 2000 frames of 480x640 peaks at nearly the RSS of training on 20: frames are
    decoded as batches ask for them and nothing holds the set. The allowance is what holding
    the set at the 64x80 training size would add (2000 x 64 x 80 x 3 float32 = 117 MB; decoded
    at 480x640, 1.8 GB), not a margin fitted to one machine's baseline RSS or allocator noise
    (the 20-vs-2000 difference measured 26 MB on an Intel CPU and 59 MB on an AMD one).
    (Hard links to 20 synthetic frames: 2000 files to read and decode without 2000 frames to
    generate.)"""
    made = make_synthetic_dataset(tmp_path / "syn", n_id=20, n_ood=0, size=(480, 640), seed=0)
    sources = sorted((made / "images").glob("*.png"))
    folders = {}
    for n in (20, 2000):
        folders[n] = tmp_path / f"frames{n}"
        folders[n].mkdir()
        for i in range(n):
            (folders[n] / f"frame_{i:05d}.png").hardlink_to(sources[i % len(sources)])
    peak = {n: _peak_rss_of_training(folder, tmp_path / f"ck{n}") for n, folder in folders.items()}
    assert len(ckpt.load_config(tmp_path / "ck2000")["training"]["frames"]) == 2000
    held = 2000 * 64 * 80 * 3 * 4 / 2**20  # MB: the set at the training size, float32
    print(f"peak RSS of training: {peak[20]:.0f} MB on 20 frames, {peak[2000]:.0f} MB on 2000 (the set held "
          f"at 64x80 would add {held:.0f} MB)")
    assert peak[2000] - peak[20] < held


def test_calibrating_the_flag_on_too_few_frames_is_said(rugd_sample, tmp_path, caplog):
    """With n ID frames a threshold cannot flag fewer than about 1 in n + 1 new ID frames: the
    calibration says so when n < 1 / frame_fpr, and not when the frames suffice."""
    import logging

    from conftest import make_family_checkpoint
    from ros_anomaly_diffusion.engine.training import calibrate

    model = make_family_checkpoint(tmp_path / "knn", "knn")
    frames = [f for f in open_dataset(rugd_sample) if f.is_ood() is False][:2]
    with caplog.at_level(logging.WARNING):
        calibrate(model, frames, frame_fpr=0.05, progress=False)
    assert "from 2 ID frame(s), too few for frame_fpr 0.05 (20 or more)" in caplog.text
    assert "about 1 in 3 or more" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibrate(model, frames, frame_fpr=0.5, progress=False)
        calibrate(model, frames, frame_fpr=0.0, progress=False)  # the highest score: no rate to warn about
    assert "too few" not in caplog.text
