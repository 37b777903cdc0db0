"""Latent variant (dcae): DiT denoiser, DC-AE loading, training, detector, latent guidance
(the shipped TAEF2 autoencoder: test_taef2.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import latent_checkpoint
from diffusers import AutoencoderDC

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.families import latent as L
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.networks.denoisers import DiTDenoiser, build_denoiser
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.samplers import Editor
from ros_anomaly_diffusion.core.families.fitting import STATE, DenoiserTrainer, TrainOptions
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
from ros_anomaly_diffusion.core.variants import get_variant


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", n_id=6, n_ood=3, size=(64, 80))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return latent_checkpoint(tmp_path_factory.mktemp("lat") / "ck", image_size=(32, 40))


def test_dcae_is_registered_in_the_latent_family():
    v = get_variant("dcae")
    assert v.family == "latent"


def test_dit_forward_shapes_and_determinism():
    cfg = L.dit_config("tiny", latent_channels=8, grid=(4, 5))
    net = build_denoiser("dit", cfg).eval()
    assert isinstance(net, DiTDenoiser) and net.kind == "dit"
    z = torch.randn(2, 8, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(z, 500)
        assert out.shape == z.shape
        assert torch.equal(out, net(z, 500))  # deterministic
        assert torch.equal(out, net(z, torch.tensor(500)))  # int, 0-d and (B,) timesteps agree
        assert torch.equal(out, net(z, torch.full((2,), 500)))
        assert not torch.allclose(out, net(z, 10))  # the timestep is used
        # non-square grids of any size, also with patches that do not tile the grid
        assert net(torch.randn(1, 8, 7, 3), 3).shape == (1, 8, 7, 3)
        p2 = DiTDenoiser(L.dit_config("tiny", 8, (5, 7), patch_size=2)).eval()
        assert p2(torch.randn(3, 8, 5, 7), 999).shape == (3, 8, 5, 7)


def test_latent_loss_weights_exclude_cells_with_any_ood_pixel():
    w = torch.ones(1, 1, 16, 20)
    w[0, 0, 9, 3] = 0  # one OOD pixel in latent cell (1, 0) at factor 8
    lw = L.latent_weights(w, 8)
    assert lw.shape == (1, 1, 2, 3)  # 20 is padded to 24
    assert lw[0, 0, 1, 0] == 0 and lw.sum() == 5


def _random_autoencoder(latent_channels=8) -> AutoencoderDC:
    torch.manual_seed(1)
    cfg = L.autoencoder_config("tiny")
    cfg["latent_channels"] = latent_channels
    return AutoencoderDC(**cfg).eval()


def test_pretrained_autoencoder_round_trip(tmp_path, synthetic):
    ae = _random_autoencoder()
    ae.save_pretrained(tmp_path / "dcae", safe_serialization=True)
    assert not list((tmp_path / "dcae").glob("*.bin"))
    loaded = L.load_pretrained_autoencoder(tmp_path / "dcae")
    x = torch.rand(1, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.encode(x).latent, loaded.encode(x).latent)
    # a pipeline folder with the autoencoder in vae/ works too
    ae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
    assert L.compression(L.load_pretrained_autoencoder(tmp_path / "pipe")) == 8

    # fit with the pretrained autoencoder: it is used as is (frozen) and copied into the checkpoint
    frames = open_dataset(synthetic)[:3]
    opts = TrainOptions(variant="dcae", preset="tiny", image_size=(32, 40), steps=1, batch_size=2,
                        autoencoder=str(tmp_path / "dcae"))
    config, tensors = L.fit(frames, tmp_path / "out", opts, False)
    assert config["autoencoder"]["source"] == str((tmp_path / "dcae").resolve())
    assert config["latent_size"] == [4, 5] and config["denoiser"]["config"]["in_channels"] == 8
    for k, v in ae.state_dict().items():
        assert torch.equal(tensors["autoencoder"][k], v), k
    assert abs(config["autoencoder"]["latent_scale"] - 1.0) > 1e-6  # measured on the frames
    ckpt.save(tmp_path / "ck", config, tensors)
    codec, net, _ = L.load_latent_models(tmp_path / "ck", ckpt.load_config(tmp_path / "ck"), torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(codec.ae.encode(x).latent, ae.encode(x).latent)


def test_pretrained_autoencoder_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_dcae"
    with pytest.raises(ckpt.CheckpointError, match="no_such_dcae.*not found"):
        L.load_pretrained_autoencoder(missing)
    # a folder with pickled weights only is refused, not unpickled
    pickled = tmp_path / "pickled"
    _random_autoencoder().save_pretrained(pickled, safe_serialization=False)
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"pickled.*\.bin.*refused"):
        L.load_pretrained_autoencoder(pickled)
    with pytest.raises(ckpt.CheckpointError, match="pickle"):
        L.load_pretrained_autoencoder(next(pickled.glob("*.bin")))
    # another diffusers model
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ckpt.CheckpointError, match="other.*AutoencoderKL"):
        L.load_pretrained_autoencoder(other)
    # weights that do not fit their config
    bad = tmp_path / "mismatched"
    _random_autoencoder(latent_channels=8).save_pretrained(bad, safe_serialization=True)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["latent_channels"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="mismatched"):
        L.load_pretrained_autoencoder(bad)
    # weights missing from the file (diffusers alone would initialise them at random)
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    _random_autoencoder().save_pretrained(partial, safe_serialization=True)
    weights = next(partial.glob("*.safetensors"))
    state = load_file(weights)
    del state["decoder.conv_out.weight"]
    save_file(state, weights)
    with pytest.raises(ckpt.CheckpointError, match="partial.*missing: decoder.conv_out.weight"):
        L.load_pretrained_autoencoder(partial)


def test_train_cli_refuses_a_missing_autoencoder(tmp_path, synthetic, caplog):
    from ros_anomaly_diffusion.cli import main

    rc = main(["-q", "train", "--variant", "dcae", "--data", str(synthetic), "--out", str(tmp_path / "ck"),
               "--steps", "1", "--image-size", "32", "40", "--autoencoder", str(tmp_path / "nowhere")])
    assert rc == 1 and "nowhere" in caplog.text


@pytest.mark.timeout(300)
def test_train_dcae_writes_a_loadable_checkpoint_and_detector_runs(tmp_path, synthetic):
    from ros_anomaly_diffusion.cli import main

    out = tmp_path / "ck"
    rc = main(["-q", "train", "--variant", "dcae", "--data", str(synthetic), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--image-size", "32", "40", "--preset", "tiny", "--autoencoder", "trained"])
    assert rc == 0
    config = ckpt.load_config(out)
    # the local prior of latent patches, scored per latent cell with the ID statistics of its sampler
    assert config["family"] == "latent" and config["denoiser"]["kind"] == "local"
    assert config["analysis"] == "latent" and config["latent_scores"]["sampler"] == L.EDIT_SAMPLER.to_dict()
    assert config["latent_scores"]["pixel"]["std"] > 0 and config["training"]["latents_in_memory"]
    assert sorted(config["files"]) == ["autoencoder.safetensors", "denoiser.safetensors"]
    assert config["autoencoder"]["kind"] == "dcae"
    assert config["autoencoder"]["config"]["latent_channels"] == 8  # diffusers config of the AE
    assert "psnr_db" in config["training"]["autoencoder"]["reconstruction_train"]
    assert set(config["calibration"]["dcae"]) >= {"mask_threshold", "frame_threshold"}

    det = Detector(out, variant_settings("dcae", checkpoint=str(out), steps=2, segments="none"))
    assert det.nfe == 4  # config/dcae.yaml: the denoising error, 4 draws in one network call
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    r = det.process(frame)
    assert r.score.shape == (50, 70) and r.score.dtype == np.float32
    assert 0.0 <= r.score.min() and r.score.max() <= 1.0
    assert r.mask.shape == (50, 70) and r.mask.dtype == bool
    assert r.edited is None and isinstance(r.is_ood, bool)  # scored in latent space: nothing decoded
    again = det.process(frame)
    np.testing.assert_array_equal(r.score, again.score)  # seeded: deterministic
    # live settings reach the latent editor
    assert det.update(edit_score="edit", draws=1, steps=3, guidance_scale=2.0) == [] and det.nfe == 6
    assert not np.allclose(det.process(frame).score, r.score)
    # a pixel checkpoint is refused by the latent variant (and vice versa)
    with pytest.raises(ckpt.CheckpointError, match="latent"):
        Detector(out, variant_settings("ddim", checkpoint=str(out)))


def test_strong_latent_guidance_returns_the_decoded_input_latents(untrained):
    config = ckpt.load_config(untrained)
    # compared with the input (not the model's reconstruction) to see what the edit alone does
    settings = variant_settings("dcae", checkpoint=str(untrained), steps=4, reconstruction_guidance=0.0, draws=1,
                                guidance_scale=1e6)
    scorer = L.build(untrained, config, settings, torch.device("cpu"))
    codec, net, schedule = L.load_latent_models(untrained, config, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = codec.encode(x)
        edits, _ = Editor(net, schedule, clip=None).ddim(z, start_timestep=settings.sampler.start_timestep, steps=4,
                                                        guidance=1e6)
        assert torch.allclose(edits[0], z, atol=1e-4)  # in latent space
        reconstruction = codec.decode(z, (32, 40))
        out = scorer(x)
        np.testing.assert_allclose(out.edited01.numpy(), reconstruction.numpy(), atol=1e-4)
    assert out.maps.shape == (2, *settings.geometry.size)
    assert out.edited01.shape == x.shape and scorer.nfe == 4
    # compared with the autoencoder's reconstruction instead of the input, nothing changed
    scorer.reference = "reconstruction"
    with torch.no_grad():
        assert scorer(x).maps.max() < 1e-2 < out.maps.mean()
    # without guidance the untrained model's sample is something else entirely
    scorer.configure(settings.updated(guidance_scale=0.0))
    with torch.no_grad():
        assert (scorer(x).edited01 - reconstruction).abs().mean() > 1e-2


def test_resumed_training_reuses_the_autoencoder_and_continues_the_dit(tmp_path, synthetic, monkeypatch):
    frames = open_dataset(synthetic)[:4]
    opts = TrainOptions(variant="dcae", preset="tiny", image_size=(32, 40), steps=2, batch_size=2,
                        autoencoder="trained")
    first_config, first = L.fit(frames, tmp_path, opts, False)
    assert (tmp_path / L.AE_STATE / "autoencoder.safetensors").is_file()
    saved = {part: ckpt.load_tensors(tmp_path / STATE, part) for part in ("model", "ema")}
    starts, fit = [], DenoiserTrainer.fit

    def recording_fit(trainer, sample_batch, total_steps, progress=True):
        starts.append({"step": trainer.step, "model": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                       "ema": trainer.ema_state()})
        fit(trainer, sample_batch, total_steps, progress)
        starts[-1]["steps_taken"] = trainer.step - starts[-1]["step"]

    monkeypatch.setattr(DenoiserTrainer, "fit", recording_fit)
    opts.steps = 3  # resume: the autoencoder is not trained again, the DiT goes on from step 2
    config, second = L.fit(frames, tmp_path, opts, False)
    for k, v in first["autoencoder"].items():
        assert torch.equal(second["autoencoder"][k], v), k
    # same autoencoder, same latent normalisation: the DiT goes on with the data it was trained on
    for key in ("latent_shift", "latent_scale"):
        assert config["autoencoder"][key] == first_config["autoencoder"][key]
    [start] = starts
    assert (start["step"], start["steps_taken"]) == (2, 1)
    for part in ("model", "ema"):
        assert all(torch.equal(start[part][k], v) for k, v in saved[part].items()), part
    assert config["training"]["steps"] == ckpt.load_config(tmp_path / STATE)["step"] == 3
