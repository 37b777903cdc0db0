"""The interfaces between the Detector, the registry and the variant families (below all
of them, so that each imports it without importing the others).

* Scorer: what a family's `build` returns and the Detector calls. It maps a batch of
  frames at the model's resolution, (B, 3, h, w) in [0, 1], to a ScoreOutput.
* Family: what a family module (core/families/<name>.py) provides to the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .settings import Settings


@dataclass
class ScoreOutput:
    maps: torch.Tensor  # (B, H, W) in [0, 1] at the analysis size
    edited01: torch.Tensor | None  # (B, 3, h, w) in [0, 1], editing variants only
    # (B,) in [0, 1]: the variant's own frame score (inversion); None: the Detector's top-k mean of the map
    frame_scores: torch.Tensor | None = None


@dataclass
class ExportTarget:
    """What `export` writes for a variant: the whole frame as one graph ("frame": backbone,
    model and maps; input a frame in [0, 1]) or the denoiser net(x, t) the scorer calls
    several times a frame ("denoiser"); `item_shape` is one input without the batch."""
    kind: str
    module: torch.nn.Module
    item_shape: tuple[int, ...]


@runtime_checkable
class Scorer(Protocol):
    """A family's scorer: one torch.nn.Module (calling it runs its forward) that holds the
    networks it runs; `configure` is named so as not to shadow nn.Module.apply."""
    nfe: int  # network evaluations per frame (backbone calls not counted)

    def configure(self, settings: Settings) -> None:
        """Take new live settings (sampler parameters, analysis size) for the next frame."""

    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        """(B, 3, h, w) in [0, 1] at the model's size -> anomaly maps (and edits, frame scores)."""

    def networks(self) -> dict[str, torch.nn.Module]:
        """The checkpoint's trained networks it runs, by role ("denoiser", "autoencoder"), as they
        run (quantized as stored or asked, on their backend): what /diagnostics describes."""

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        """The module `export` writes for frames of `size` (h, w), as the current settings run it
        (built on backend torch)."""


@runtime_checkable
class MomentScaled(Protocol):
    """A scorer whose raw score has no fixed ID scale (the pixel family's feature distance):
    calibration measures the `moments` ({"mean", "std"}) of its raw maps on ID pixels, and it
    maps its scores to [0, 1] with them from then on. The other families measure their ID
    statistics while they fit."""
    moments: dict | None

    def raw_maps(self, batch01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, h, w) in [0, 1] -> (unscaled maps (B, H, W) at the analysis size, edits or None)."""

    def scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Unscaled maps -> the maps in [0, 1] that calling the scorer returns, with `moments`."""


class Family(Protocol):
    """A family module: one checkpoint layout, its scorer and its training.

    FAMILY is the name its checkpoints record in config.json ("family"); build takes the
    registry's per-variant options as keywords (the pixel family's sampler, say).
    RUNS_ON_TENSORRT: whether its build takes backend "tensorrt" (what "auto" may pick on CUDA)."""

    FAMILY: str
    RUNS_ON_TENSORRT: bool

    def build(self, directory: Path, config: dict, settings: Settings, device: torch.device,
              **options) -> Scorer: ...

    def fit(self, train_frames: list, out: Path, opts, progress: bool, acc=None) -> tuple[dict, dict]:
        """Train on the frames -> (config, {file name: state dict}) of a checkpoint, under the
        run's accelerate.Accelerator `acc` (fitting.make_accelerator(opts) when None). In a
        run of several processes each reads its shard of the frames; every process returns
        the same result and only the main one writes it."""
