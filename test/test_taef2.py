"""The shipped TAEF2 autoencoder (networks/taef2.py) and the latent family with it: strict
loading, the round trip of a real RUGD frame, training with the default autoencoder,
old (DC-AE, no "kind") checkpoints."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from checkpoints import latent_checkpoint
from diffusers import AutoencoderDC
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.families import latent as L
from ros_anomaly_diffusion.core.families.fitting import TrainOptions
from ros_anomaly_diffusion.core.networks import taef2 as T
from ros_anomaly_diffusion.core.networks.autoencoder import LatentCodec
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset

FILES = {"encoder": T.WEIGHTS / f"{T.ENCODER_FILE}.safetensors",
         "decoder": T.WEIGHTS / f"{T.DECODER_FILE}.safetensors"}


@pytest.fixture(scope="module")
def taef2():
    return T.load_taef2()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", n_id=6, n_ood=3, size=(64, 80))


def test_the_weights_ship_with_the_package_and_match_the_modules_keys():
    assert (T.WEIGHTS / "LICENSE").is_file() and "MIT" in (T.WEIGHTS / "LICENSE").read_text()
    for part, module in (("encoder", T.build_encoder()), ("decoder", T.build_decoder())):
        with safe_open(str(FILES[part]), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert shapes == {k: tuple(v.shape) for k, v in module.state_dict().items()}, part
    assert sum(p.numel() for p in T.build_encoder().parameters()) == pytest.approx(1.34e6, rel=0.01)


def _copy_weights(tmp_path):
    for path in FILES.values():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / FILES["encoder"].name, tmp_path / FILES["decoder"].name


def test_strict_loading_refuses_missing_extra_and_misshapen_keys(tmp_path):
    enc, dec = _copy_weights(tmp_path)
    T.load_taef2(tmp_path)  # the copies load
    state = load_file(str(enc))
    del state["11.pool.1.weight"]  # a midblock's GroupNorm
    save_file(state, str(enc))
    with pytest.raises(ckpt.CheckpointError, match=r"taef2_encoder\.safetensors.*missing: 11\.pool\.1\.weight"):
        T.load_taef2(tmp_path)

    _copy_weights(tmp_path)
    state = load_file(str(dec))
    state["20.weight"] = torch.zeros(3, 3, 3, 3, dtype=torch.float16)
    save_file(state, str(dec))
    with pytest.raises(ckpt.CheckpointError, match=r"taef2_decoder\.safetensors.*unexpected: 20\.weight"):
        T.load_taef2(tmp_path)

    _copy_weights(tmp_path)
    state = load_file(str(dec))
    state["19.weight"] = torch.zeros(4, 64, 3, 3, dtype=torch.float16)
    save_file(state, str(dec))
    with pytest.raises(ckpt.CheckpointError, match=r"taef2_decoder\.safetensors.*wrong shape: 19\.weight"):
        T.load_taef2(tmp_path)

    dec.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"taef2_decoder\.safetensors: missing"):
        T.load_taef2(tmp_path)


@pytest.mark.timeout(300)
def test_round_trip_of_a_rugd_frame_at_full_resolution(rugd_sample, taef2):
    frames = {f.name: f for f in open_dataset(rugd_sample)}
    if "trail-3_00001" not in frames:
        pytest.skip("RUGD frame trail-3_00001 not in the sample")
    rgb = frames["trail-3_00001"].rgb()
    h, w = rgb.shape[0] // 8 * 8, rgb.shape[1] // 8 * 8  # 550x688 -> 544x688
    x = torch.from_numpy(np.ascontiguousarray(rgb[:h, :w])).permute(2, 0, 1)[None].float() / 255
    codec = LatentCodec(taef2, shift=0.1, scale=1.5)  # the normalisation is undone exactly on decoding
    with torch.no_grad():
        raw = codec.raw(x)
        assert raw.shape == (1, 32, h // 8, w // 8)
        assert raw.abs().max() < 6 and 0.3 < raw.std() < 2  # roughly [-3, 3], no scale factor
        rec = codec.decode(codec.encode(x), (h, w))
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1
    psnr = float(10 * torch.log10(1 / ((rec - x) ** 2).mean()))
    print(f"TAEF2 round trip of trail-3_00001 at {h}x{w}: {psnr:.1f} dB PSNR")  # the README's figure (-s)
    assert psnr > 28, psnr  # 30.3 dB measured


def test_codec_pads_frames_that_are_not_multiples_of_8(taef2):
    codec = LatentCodec(taef2)
    assert codec.kind == "taef2" and codec.factor == 8
    x = torch.rand(2, 3, 35, 43, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = codec.encode(x)
        assert z.shape == (2, 32, 5, 6)
        assert codec.decode(z, (35, 43)).shape == x.shape
        # the decoder soft-clamps its input to (-3, 3) first: 3 tanh(z / 3)
        big = z * 100
        assert isinstance(taef2.decoder[0], T.Clamp)
        assert torch.equal(taef2.decode(big), taef2.decoder[1:](3 * torch.tanh(big / 3)))


@pytest.mark.timeout(300)
def test_train_with_the_default_taef2_writes_a_checkpoint_a_detector_runs(tmp_path, synthetic, caplog):
    from ros_anomaly_diffusion.cli import main

    assert TrainOptions().autoencoder == "taef2"
    out = tmp_path / "ck"
    rc = main(["-q", "train", "--variant", "dcae", "--data", str(synthetic), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--image-size", "64", "80", "--preset", "tiny"])
    assert rc == 0
    config = ckpt.load_config(out)
    ae = config["autoencoder"]
    assert ae["kind"] == "taef2" and ae["compression"] == 8 and "config" not in ae
    assert "madebyollin/taesd" in ae["source"] and abs(ae["latent_scale"] - 1.0) > 1e-6
    assert config["latent_size"] == [8, 10] and config["denoiser"]["config"]["in_channels"] == 32
    assert config["training"]["autoencoder"]["reconstruction_train"]["psnr_db"] > 20
    # self-contained: the weights travel in the checkpoint, as released (fp16)
    stored = ckpt.load_tensors(out, "autoencoder")
    for part, path in FILES.items():
        for k, v in load_file(str(path)).items():
            assert torch.equal(stored[f"{part}.{k}"], v), k
    assert len(stored) == sum(len(load_file(str(p))) for p in FILES.values())

    det = Detector(out, variant_settings("dcae", checkpoint=str(out), steps=2, segments="none"))
    ae = det.scorer.networks()["autoencoder"]
    assert isinstance(ae, T.TAEF2) and all(p.dtype == torch.float32 for p in ae.parameters())
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    r = det.process(frame)
    assert r.score.shape == (50, 70) and r.mask.shape == (50, 70) and r.edited is None  # scored in latent space
    np.testing.assert_array_equal(r.score, det.process(frame).score)
    # quantization touches the DiT only: the autoencoder stays as loaded
    q = Detector(out, variant_settings("dcae", checkpoint=str(out), steps=2, segments="none", quantization="int8"))
    for k, v in q.scorer.networks()["autoencoder"].state_dict().items():
        assert torch.equal(v, ae.state_dict()[k]), k
    assert q.process(frame).score.shape == (50, 70)

    # resuming that run with another autoencoder is refused (its DiT learnt TAEF2 latents)
    rc = main(["-q", "train", "--variant", "dcae", "--data", str(synthetic), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--image-size", "64", "80", "--preset", "tiny", "--autoencoder", "trained"])
    assert rc == 1 and "made with autoencoder 'taef2', not 'trained'" in caplog.text


def test_checkpoints_written_before_taef2_load_as_dcae(tmp_path):
    out = latent_checkpoint(tmp_path / "old", calibration={"dcae": {"mask_threshold": 0.3, "frame_threshold": 0.5}})
    config = ckpt.load_config(out)
    assert config["autoencoder"].pop("kind") == "dcae"  # as written before: no "kind"
    ckpt.update_config(out, autoencoder=config["autoencoder"])
    det = Detector(out, variant_settings("dcae", checkpoint=str(out), steps=2, segments="none"))
    assert isinstance(det.scorer.networks()["autoencoder"], AutoencoderDC)
    assert det.process(np.zeros((32, 40, 3), np.uint8)).score.shape == (32, 40)

    ckpt.update_config(out, autoencoder={**config["autoencoder"], "kind": "vqgan"})
    with pytest.raises(ckpt.CheckpointError, match="vqgan"):
        Detector(out, variant_settings("dcae", checkpoint=str(out), steps=2, segments="none"))


def test_a_checkpoint_with_taef2(tmp_path):
    out = latent_checkpoint(tmp_path / "ck", autoencoder="taef2")
    config = ckpt.load_config(out)
    assert config["autoencoder"]["kind"] == "taef2" and config["latent_size"] == [4, 5]
    codec, _, _ = L.load_latent_models(out, config, torch.device("cpu"))
    assert isinstance(codec.ae, T.TAEF2)
