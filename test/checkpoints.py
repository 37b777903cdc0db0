"""Untrained checkpoints of every family for tests: the layouts `train` writes, with random
weights (and, for the feature families, statistics of two seeded random frames), in seconds."""
from __future__ import annotations

from pathlib import Path

import torch

from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.families import feature_diffusion, feature_space, knn, latent, pixel
from ros_anomaly_diffusion.core.families.fitting import TrainOptions
from ros_anomaly_diffusion.core.networks.autoencoder import autoencoder_config, autoencoder_state, build_autoencoder
from ros_anomaly_diffusion.core.networks.denoisers import DiTDenoiser, build_denoiser
from ros_anomaly_diffusion.core.networks.taef2 import SOURCE as TAEF2_SOURCE
from ros_anomaly_diffusion.core.networks.taef2 import load_taef2
from ros_anomaly_diffusion.core.samplers import NoiseSchedule
from ros_anomaly_diffusion.core.variants import get_variant


def random_frame_features(image_size: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """(features, cell weights, mean, std, standardised features) of two seeded random frames
    (the backbone looked up at call time, so a test may patch feature_space.shared_features)."""
    features = feature_space.shared_features()
    frames = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    feats = torch.cat([features(f[None]) for f in frames])
    weights = torch.ones(feats.shape[0], 1, *feats.shape[-2:])
    mean, std = feature_space.channel_stats(feats, weights)
    return feats, weights, mean, std, feature_space.standardise(feats, mean, std)


def _save(directory, config: dict, tensors: dict, calibration: dict | None) -> Path:
    if calibration:
        config["calibration"] = calibration
    return ckpt.save(directory, config, tensors)


def pixel_checkpoint(directory, *, preset: str = "tiny", image_size=(32, 40), seed: int = 0,
                     calibration: dict | None = None) -> Path:
    """The scene-level UNet of the pixel family."""
    torch.manual_seed(seed)
    config = pixel.pixel_config(TrainOptions(preset=preset, image_size=tuple(image_size), denoiser="unet"))
    net = build_denoiser("unet", config["denoiser"]["config"])
    return _save(directory, config, {"denoiser": net.state_dict()}, calibration)


def latent_checkpoint(directory, *, preset: str = "tiny", image_size=(32, 40), seed: int = 0,
                      calibration: dict | None = None, autoencoder: str = "dcae") -> Path:
    """A DiT on an untrained tiny DC-AE ("dcae") or on the shipped TAEF2 ("taef2")."""
    torch.manual_seed(seed)
    opts = TrainOptions(variant="dcae", preset=preset, image_size=tuple(image_size), denoiser="dit")
    if autoencoder == "taef2":
        ae, source = load_taef2(), TAEF2_SOURCE
    else:
        ae, source = build_autoencoder(autoencoder_config(preset)), "untrained"
    config = latent.latent_config(opts, ae, source, 0.0, 1.0)
    net = DiTDenoiser(config["denoiser"]["config"])
    return _save(directory, config, {"autoencoder": autoencoder_state(ae), "denoiser": net.state_dict()},
                 calibration)


def feature_checkpoint(directory, *, preset: str = "tiny", image_size=(64, 96), seed: int = 0,
                       calibration: dict | None = None) -> Path:
    """The feature-diffusion family (inversion, feature_edit): its denoiser, and ID statistics."""
    torch.manual_seed(seed)
    feats, weights, mean, std, z = random_frame_features(tuple(image_size), seed)
    config = feature_diffusion.model_config(tuple(image_size), feats.shape[1], preset)
    net = build_denoiser(config["denoiser"]["kind"], config["denoiser"]["config"]).eval()
    schedule = NoiseSchedule(feature_diffusion.SCHEDULE)
    config["scores"] = feature_diffusion.score_statistics(net, schedule, [(z, weights)], steps=(2, 3))
    config["edit_scores"] = feature_diffusion.edit_statistics(net, schedule, [(z, weights)])
    return _save(directory, config, {"denoiser": net.state_dict(), "features": {"mean": mean, "std": std}},
                 calibration)


def knn_checkpoint(directory, *, image_size=(64, 96), seed: int = 0, calibration: dict | None = None,
                   preset: str = "tiny") -> Path:
    """A bank of the cells of two random frames (`preset`: accepted alike, knn has no network)."""
    feats, weights, mean, std, z = random_frame_features(tuple(image_size), seed)
    batches = [(z, weights, torch.tensor([[0, 0], [1, 0]]))]
    bank = knn.sample_bank(batches, knn.MAX_BANK, seed)
    config = knn.knn_config(tuple(image_size), feats.shape[1], bank, knn.loo_moments(batches, bank), seed)
    return _save(directory, config, {"bank": {"vectors": bank["vectors"], "origin": bank["origin"]},
                                     "features": {"mean": mean, "std": std}}, calibration)


BY_FAMILY = {"pixel": pixel_checkpoint, "latent": latent_checkpoint, "feature_diffusion": feature_checkpoint,
             "knn": knn_checkpoint}


def init_checkpoint(variant: str, directory: str | Path, **kwargs) -> Path:
    """The untrained checkpoint of `variant`'s family."""
    return BY_FAMILY[get_variant(variant).family](directory, **kwargs)
