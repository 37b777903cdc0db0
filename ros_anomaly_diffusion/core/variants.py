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

from . import checkpoint as ckpt
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


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("ddpm", pixel, "guided DDPM, all T ancestral steps (baseline)", {"sampler": "ddpm"}),
        Variant("ddim", pixel, "guided DDIM (timestep matching), few steps", {"sampler": "ddim"}),
        Variant("inversion", feature_diffusion, "DDIM inversion of backbone features, reconstruction-free (few steps)",
                {"reading": feature_diffusion.INVERSION}),
        Variant("feature_edit", feature_diffusion, "guided DDIM edit of backbone features, no decoder (few steps)",
                {"reading": feature_diffusion.EDIT}),
        Variant("knn", knn, "nearest-neighbour distance to ID backbone features (baseline)"),
        Variant("dcae", latent, "guided DDIM on DC-AE latents with a DiT denoiser (low memory)"),
    )
}
# The variant a checkpoint serves when it records none (written before checkpoints recorded
# the variant they were trained for): its family's usual one.
FAMILY_DEFAULT_VARIANT = {pixel.FAMILY: "ddim", latent.FAMILY: "dcae", feature_diffusion.FAMILY: "inversion",
                          knn.FAMILY: "knn"}


# Settings validates variant names against its own list (it sits below this registry).
if tuple(VARIANTS) != VARIANT_NAMES:
    raise ImportError(f"settings.VARIANT_NAMES {VARIANT_NAMES} does not match the registry {tuple(VARIANTS)}")
if set(FAMILY_DEFAULT_VARIANT) != {v.family for v in VARIANTS.values()}:
    raise ImportError("every family needs its default variant in FAMILY_DEFAULT_VARIANT")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; registered: {sorted(VARIANTS)}")
    return VARIANTS[name]


def checkpoint_family(config: dict) -> str | None:
    """The family a checkpoint's config.json records, old names mapped to current ones."""
    family = config.get("family")
    return FAMILY_ALIASES.get(family, family)


def family_variants(family: str | None) -> list[str]:
    """The variants that can serve a checkpoint of `family`."""
    return [name for name, v in VARIANTS.items() if v.family == family]


def family_mismatch(variant: str, config: dict, where: str) -> str | None:
    """Why the checkpoint whose config.json is `config` (at `where`) cannot serve `variant`:
    it holds another family's model. None when it fits. An empty variant is the checkpoint's own."""
    if not variant:
        return None if checkpoint_family(config) in FAMILY_DEFAULT_VARIANT else (
            f"{where} holds a {config.get('family')!r} model, which no registered variant serves")
    family = get_variant(variant).family
    if checkpoint_family(config) != family:
        serves = family_variants(checkpoint_family(config))
        return (f"{where} holds a {config.get('family')!r} model, variant {variant!r} needs a {family!r} one; "
                + (f"this checkpoint serves {', '.join(serves)} (or leave the variant empty: the checkpoint's "
                   f"{checkpoint_variant(config)!r})" if serves else "no registered variant serves it"))
    return None


def checkpoint_variant(config: dict) -> str:
    """The variant the checkpoint whose config.json is `config` was trained and calibrated for:
    the one it records, or for a checkpoint older than that record its family's usual one."""
    family = checkpoint_family(config)
    recorded = config.get("variant")
    if recorded in VARIANTS and VARIANTS[recorded].family == family:
        return recorded
    if family not in FAMILY_DEFAULT_VARIANT:
        raise ckpt.CheckpointError(f"a {config.get('family')!r} checkpoint, which no registered variant serves")
    return FAMILY_DEFAULT_VARIANT[family]


def resolve_variant(requested: str, config: dict, where: str) -> str:
    """The variant to run on the checkpoint whose config.json is `config` (at `where`):
    `requested`, or the checkpoint's own when it is empty; ValueError when the checkpoint
    cannot serve it (CheckpointError; the message names the variants it can serve)."""
    mismatch = family_mismatch(requested, config, where)
    if mismatch:
        raise ckpt.CheckpointError(mismatch)
    return requested or checkpoint_variant(config)
