"""The variant registry: every variant the launch files, the CLI and the benchmark can
name, and the family module (core/families/) that builds, trains and stores it.

Variants of one family share a checkpoint layout and a module: ddpm and ddim run the
same pixel-space denoiser with different samplers (the family's build option). A new
variant family is one module implementing scorer.Family plus one line here (and its
name in settings.VARIANT_NAMES and a config/<variant>.yaml).

The registry sits on top of the family modules; nothing below it imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import feature_diffusion, knn, latent, pixel
from .scorer import Family, Scorer
from .settings import VARIANT_NAMES, Settings

# Checkpoints written before a family was renamed record its old name.
FAMILY_ALIASES = {"features": feature_diffusion.FAMILY}


@dataclass(frozen=True)
class Variant:
    name: str
    module: Family
    description: str
    options: dict = field(default_factory=dict)  # keyword options of the family's build

    @property
    def family(self) -> str:
        """The checkpoint layout this variant loads (config.json "family")."""
        return self.module.FAMILY

    def build(self, directory: Path, config: dict, settings: Settings, device: torch.device) -> Scorer:
        return self.module.build(directory, config, settings, device, **self.options)

    def fit(self, train_frames: list, out: Path, opts, progress: bool, acc=None) -> tuple[dict, dict]:
        return self.module.fit(train_frames, out, opts, progress, acc)

    def init_checkpoint(self, directory: str | Path, **kwargs) -> Path:
        return self.module.init_checkpoint(directory, **kwargs)


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("ddpm", pixel, "guided DDPM, all T ancestral steps (baseline)", {"sampler": "ddpm"}),
        Variant("ddim", pixel, "guided DDIM (timestep matching), few steps", {"sampler": "ddim"}),
        Variant("inversion", feature_diffusion, "DDIM inversion of backbone features, reconstruction-free (few steps)",
                {"mode": "inversion"}),
        Variant("feature_edit", feature_diffusion, "guided DDIM edit of backbone features, no decoder (few steps)",
                {"mode": "edit"}),
        Variant("knn", knn, "nearest-neighbour distance to ID backbone features (baseline)"),
        Variant("dcae", latent, "guided DDIM on DC-AE latents with a DiT denoiser (low memory)"),
    )
}
# Settings validates variant names against its own list (it sits below this registry).
if tuple(VARIANTS) != VARIANT_NAMES:
    raise ImportError(f"settings.VARIANT_NAMES {VARIANT_NAMES} does not match the registry {tuple(VARIANTS)}")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; registered: {sorted(VARIANTS)}")
    return VARIANTS[name]


def checkpoint_family(config: dict) -> str | None:
    """The family a checkpoint's config.json records, old names mapped to current ones."""
    family = config.get("family")
    return FAMILY_ALIASES.get(family, family)


def family_mismatch(variant: str, config: dict, where: str) -> str | None:
    """Why the checkpoint whose config.json is `config` (at `where`) cannot serve `variant`:
    it holds another family's model. None when it fits."""
    family = get_variant(variant).family
    if checkpoint_family(config) != family:
        return f"{where} holds a {config.get('family')!r} model, variant {variant!r} needs a {family!r} one"
    return None
