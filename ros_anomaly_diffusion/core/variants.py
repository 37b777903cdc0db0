"""The variant registry: every optimization variant the launch file, the CLI and the
benchmark can name, and how each turns a checkpoint into a scorer.

A scorer maps a batch of frames at the model's resolution, (B, 3, h, w) in [0, 1], to
a ScoreOutput (core/scorer.py): anomaly maps in [0, 1] at the analysis resolution,
(B, H, W), plus the edited frames for the editing variants. Variants of one *family*
share a checkpoint layout and a family module: ddpm and ddim run the same pixel-space
denoiser (pixel.py) with different samplers.

The registry sits on top of the family modules; nothing below it imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import inversion, knn, latent, pixel
from .settings import VARIANT_NAMES, Settings


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # checkpoint layout this variant loads
    description: str
    build: Callable[[Path, dict, Settings, torch.device], object]  # checkpoint -> scorer
    fit: Callable  # (train frames, out dir, TrainOptions, progress) -> (config, {file: state dict})


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("ddpm", pixel.FAMILY, "guided DDPM, all T ancestral steps (baseline)", pixel.builder("ddpm"),
                pixel.fit),
        Variant("ddim", pixel.FAMILY, "guided DDIM (timestep matching), few steps", pixel.builder("ddim"),
                pixel.fit),
        Variant("inversion", inversion.FAMILY, "DDIM inversion of backbone features, reconstruction-free (few steps)",
                inversion.build, inversion.fit),
        Variant("knn", knn.FAMILY, "nearest-neighbour distance to ID backbone features (baseline)",
                knn.build, knn.fit),
        Variant("dcae", latent.FAMILY, "guided DDIM on DC-AE latents with a DiT denoiser (low memory)",
                latent.build_latent_scorer, latent.fit_latent),
    )
}
# Settings validates variant names against its own list (it sits below this registry).
if tuple(VARIANTS) != VARIANT_NAMES:
    raise ImportError(f"settings.VARIANT_NAMES {VARIANT_NAMES} does not match the registry {tuple(VARIANTS)}")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; registered: {sorted(VARIANTS)}")
    return VARIANTS[name]


def family_mismatch(variant: str, config: dict, where: str) -> str | None:
    """Why the checkpoint whose config.json is `config` (at `where`) cannot serve `variant`:
    it holds another family's model. None when it fits."""
    family = get_variant(variant).family
    if config.get("family") != family:
        return f"{where} holds a {config.get('family')!r} model, variant {variant!r} needs a {family!r} one"
    return None
