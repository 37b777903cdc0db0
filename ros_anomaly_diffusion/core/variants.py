"""The variant registry: every optimization variant the launch file, the CLI and the
benchmark can name, and how each turns a checkpoint into a scorer.

A scorer maps a batch of frames at the model's resolution, (B, 3, h, w) in [0, 1], to
anomaly maps in [0, 1] at the analysis resolution, (B, H, W), plus the edited frames
for the editing variants. Variants of one *family* share a checkpoint layout: ddpm and
ddim run the same pixel-space denoiser with different samplers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .analysis import FeatureDistance
from .deploy import accelerate
from .editing import GuidedDDIM, GuidedDDPM
from .features import FeatureExtractor
from .schedule import NoiseSchedule, ScheduleConfig
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ScoreOutput:
    maps: torch.Tensor  # (B, H, W) in [0, 1] at the analysis size
    edited01: torch.Tensor | None  # (B, 3, h, w) in [0, 1], editing variants only
    # (B,) in [0, 1]: the variant's own frame score (inversion); None: the Detector's top-k mean of the map
    frame_scores: torch.Tensor | None = None


class EditingScorer:
    """Analysis by synthesis: edit the frame towards the ID model, measure the change."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, model_size: tuple[int, int],
                 settings: Settings, sampler: str, device: torch.device):
        self.net, self.schedule, self.model_size, self.sampler = net, schedule, tuple(model_size), sampler
        self.distance = FeatureDistance(FeatureExtractor().to(device),
                                        (settings.analysis_height, settings.analysis_width))
        self.editor = GuidedDDPM(net, schedule) if sampler == "ddpm" else GuidedDDIM(net, schedule)
        self.settings = settings
        self.apply(settings)

    def apply(self, s: Settings) -> None:
        """Take new live settings (sampler parameters) for the next frame."""
        if isinstance(self.editor, GuidedDDIM):
            self.editor.steps, self.editor.start_timestep = s.steps, s.start_timestep
            self.editor.guidance_scale = s.guidance_scale
        else:
            self.editor.guidance_scale = s.ddpm_guidance_scale
        self.settings = s

    @property
    def nfe(self) -> int:
        return self.editor.nfe

    def edit(self, batch01: torch.Tensor) -> torch.Tensor:
        return (self.editor.edit(batch01 * 2 - 1, seed=self.settings.seed) + 1) / 2

    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        edited = self.edit(batch01)
        return ScoreOutput(self.distance(batch01, edited), edited)


def load_pixel_denoiser(directory: Path, config: dict, device: torch.device, settings: Settings | None = None):
    """(denoiser, schedule); quantized as the checkpoint was written or as settings.quantization asks."""
    from .quantization import load_denoiser

    net = load_denoiser(directory, config, device, settings)
    return net, NoiseSchedule(ScheduleConfig(**config["schedule"]))


def _pixel_editing(sampler: str):
    def build(directory: Path, config: dict, settings: Settings, device: torch.device) -> EditingScorer:
        net, schedule = load_pixel_denoiser(directory, config, device, settings)
        net, how = accelerate(net, (1, net.config["in_channels"], *config["image_size"]), device)
        log.info("denoiser runs %s", how if how.startswith("tensorrt") else f"eager: {how}")
        return EditingScorer(net, schedule, config["image_size"], settings, sampler, device)

    return build


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # checkpoint layout this variant loads
    description: str
    build: Callable[[Path, dict, Settings, torch.device], object]  # checkpoint -> scorer
    fit: Callable  # (train frames, out dir, TrainOptions, progress) -> (config, {file: state dict})
    has_denoiser: bool = True  # False: nothing for `quantization` to act on (Settings refuses it)


def _fit_pixel(*args):
    from .training import fit_pixel

    return fit_pixel(*args)


def _build_latent(*args):
    from .latent import build_latent_scorer

    return build_latent_scorer(*args)


def _fit_latent(*args):
    from .latent import fit_latent

    return fit_latent(*args)


def _features_family(module: str, name: str):
    """Lazy import of a non-pixel family's build/fit (inversion.py, knn.py)."""
    def call(*args):
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), name)(*args)

    return call


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("ddpm", "pixel", "guided DDPM, all T ancestral steps (baseline)", _pixel_editing("ddpm"),
                _fit_pixel),
        Variant("ddim", "pixel", "guided DDIM (timestep matching), few steps", _pixel_editing("ddim"),
                _fit_pixel),
        Variant("inversion", "features", "DDIM inversion of backbone features, reconstruction-free (few steps)",
                _features_family("inversion", "build"), _features_family("inversion", "fit")),
        Variant("knn", "knn", "nearest-neighbour distance to ID backbone features (baseline)",
                _features_family("knn", "build"), _features_family("knn", "fit"), has_denoiser=False),
        Variant("dcae", "latent", "guided DDIM on DC-AE latents with a DiT denoiser (low memory)",
                _build_latent, _fit_latent),
    )
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; registered: {sorted(VARIANTS)}")
    return VARIANTS[name]
