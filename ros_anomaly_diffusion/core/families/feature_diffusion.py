"""Family "feature_diffusion": a diffusion model of backbone features. Its `inversion` variant
scores frames reconstruction-free, by DDIM inversion.

Method notes sec. 2. Backbone features z of the frame (feature_space.py: EfficientNet-Lite0
taps at strides 2/4/8/16, resized to the stride-16 grid and stacked), standardised per
channel with the ID training statistics, are the data of a small diffusion model (a per-cell
MLP by default, the ID prior of one cell's features; `train --denoiser unet` for the scene-level
UNet; linear betas, T = 1000, eps-prediction) trained on ID cells only. Its `feature_edit`
variant scores each cell under that prior (the EDIT reading of FeatureDiffusionScorer). At test time z is
*inverted* with deterministic DDIM (eta = 0, samplers.Editor.invert) to t = 999 in a few
steps; for ID features the final latent should look like N(0, I) noise, so its size is
the anomaly score:

- pixel score: L2 norm over channels of the final latent per grid cell, upsampled
  bilinearly to the analysis size;
- frame score: (max - min) of that map plus the Gaussian NLL of the latent, each
  z-scored with ID statistics measured at training time, then added.

Both are mapped into [0, 1] (thresholds and overlay live there) by `to_unit`, a strictly
monotone map fixed by ID statistics stored in the checkpoint: ranking metrics (AP,
AUROC) are those of the raw scores. The statistics are measured per inversion_steps
value on the ID cells of training frames held out of the diffusion model's training.

Checkpoint: config.json {"family", "image_size", "features", "denoiser", "schedule",
"scores"}, denoiser.safetensors and features.safetensors (per-channel mean and std).
Checkpoints written before the family was renamed say "features"; they load unchanged.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..data import Frame
from ..networks.backbone import GRID_STRIDE, StackedFeatures, shared_features
from ..networks.denoisers import build_denoiser, local_config, runtime_denoiser, unet_config
from ..samplers import EditSampler, Editor, NoiseSchedule, ScheduleConfig, draw_noise, inversion_timesteps
from ..scorer import ExportTarget, ScoreOutput
from ..settings import SamplerSettings, Settings
from .feature_space import (ChannelMoments, FeatureSource, FrameGraphs, checkpoint_features, features_config,
                            input_size, load_feature_stats, parts_compute, standardise, to_unit, unit_map)
from .fitting import DenoiserTrainer, gathered, make_accelerator, summed

log = logging.getLogger(__name__)

FAMILY = "feature_diffusion"
RUNS_ON_TENSORRT = False  # backend tensorrt: the frame graph is exported for trtexec
# Method notes sec. 2: linear betas 1e-4..0.02, T = 1000, eps-prediction.
SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          prediction_type="epsilon")
# inversion_steps values whose ID score statistics are measured at training time; a live
# setting outside this range uses the nearest one (the mapping to [0, 1] is then approximate).
STAT_STEPS = tuple(range(2, 7))
# The feature_edit variant's sampler whose ID statistics `fit` measures (config/feature_edit.yaml
# runs it; chosen on fold 0 of `bench --folds 3 --seed 0` on the sample, docs/results.md).
EDIT_SAMPLER = EditSampler(score="error", start_timestep=250, steps=5, guidance_scale=0.0,
                           reconstruction_guidance=1.0, seed=0, draws=4)
# The denoiser a new checkpoint gets (TrainOptions.denoiser empty): a per-cell MLP, the ID
# prior of one cell's features (method notes, section 5); "unet" is the scene-level one.
DEFAULT_DENOISER = "cell"
_LOG_2PI = math.log(2 * math.pi)


def latent_scores(latent: torch.Tensor, weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final latent (B, C, h, w) -> (norm map (B, h, w), max - min (B,), Gaussian NLL (B,)).

    With weights (B, 1, h, w), the range is taken over weighted cells only and the NLL is
    their mean times the number of cells (what the whole grid would sum to)."""
    norm = torch.linalg.vector_norm(latent, dim=1)
    nll_cells = 0.5 * (latent.square().sum(1) + latent.shape[1] * _LOG_2PI)  # (B, h, w)
    if weights is None:
        return norm, norm.amax((1, 2)) - norm.amin((1, 2)), nll_cells.sum((1, 2))
    keep = weights[:, 0].bool()
    inf = norm.new_tensor(float("inf"))
    rng = torch.where(keep, norm, -inf).amax((1, 2)) - torch.where(keep, norm, inf).amin((1, 2))
    nll = (nll_cells * keep).sum((1, 2)) / keep.sum((1, 2)).clamp_min(1) * keep[0].numel()
    return norm, rng, nll


def _moments(v: torch.Tensor) -> dict[str, float]:
    v = v.double().flatten()
    std = float(v.std()) if v.numel() > 1 else 0.0
    return {"mean": float(v.mean()), "std": max(std, 1e-6)}


@torch.inference_mode()
def score_statistics(net, schedule: NoiseSchedule, batches, steps: tuple[int, ...] = STAT_STEPS,
                     acc=None) -> dict[str, dict]:
    """ID statistics of the pixel norm, the frame range, the NLL and their z-scored sum, per
    inversion_steps value, over the ID cells of batches (standardised features z, weights);
    with acc, over every process's batches."""
    per = {s: ([], [], []) for s in steps}
    for z, weights in batches:
        for s in steps:
            norm, rng, nll = latent_scores(Editor(net, schedule, None).invert(z, inversion_timesteps(s, schedule.T)),
                                           weights)
            per[s][0].append(norm[weights[:, 0].bool()].cpu())
            per[s][1].append(rng.cpu())
            per[s][2].append(nll.cpu())
    out = {}
    for s in steps:
        norms, rng, nll = (gathered(v, acc) for v in per[s])
        stats = {"pixel": _moments(norms), "range": _moments(rng), "nll": _moments(nll)}
        total = ((rng - stats["range"]["mean"]) / stats["range"]["std"]
                 + (nll - stats["nll"]["mean"]) / stats["nll"]["std"])
        stats["frame"] = _moments(total)
        out[str(s)] = stats
    return out


@torch.inference_mode()
def edit_statistics(net, schedule: NoiseSchedule, batches, sampler: EditSampler = EDIT_SAMPLER, acc=None) -> dict:
    """ID mean/std of the edit's score (Editor.score) over the ID cells of batches (z, weights),
    with the sampler that measured them; with acc, over every process's batches."""
    editor = Editor(net, schedule, clip=None)  # standardised features exceed [-1, 1]
    d = [editor.score(z, sampler)[weights[:, 0].bool()].cpu() for z, weights in batches]
    return {"sampler": sampler.to_dict(), "pixel": _moments(gathered(d, acc))}


@dataclass(frozen=True)
class FeatureParts:
    """What every reading of a checkpoint shares: the backbone taps, the ID channel statistics,
    the denoiser as it runs, its noise schedule and the feature grid (h, w) at the model's size."""
    features: StackedFeatures
    net: nn.Module
    schedule: NoiseSchedule
    mean: torch.Tensor  # (C,)
    std: torch.Tensor
    grid: tuple[int, int]


class _FeatureGraph(nn.Module):
    """Backbone features of frames in [0, 1] standardised with the ID statistics, then read by
    a subclass's forward."""

    def __init__(self, parts: FeatureParts, size: tuple[int, int]):
        super().__init__()
        self.features, self.net, self.schedule, self.size = parts.features, parts.net, parts.schedule, tuple(size)
        self.register_buffer("mean", parts.mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", parts.std.reshape(1, -1, 1, 1))

    def standardised(self, batch01: torch.Tensor) -> torch.Tensor:
        return (self.features(batch01) - self.mean) / self.std


class InversionGraph(_FeatureGraph):
    """The inversion reading's whole computation for one analysis size, one S and its ID
    statistics: frames (B, 3, h, w) in [0, 1] -> (pixel maps (B, H, W), frame scores (B,)),
    both in [0, 1]."""

    def __init__(self, parts: FeatureParts, timesteps: list[int], size: tuple[int, int], stats: dict):
        super().__init__(parts, size)
        self.timesteps, self.stats = list(timesteps), stats

    @property
    def signature(self) -> str:
        """The constants baked into the graph besides the buffers (backends.OnnxModule's cache key)."""
        return f"inversion:{self.timesteps}:{self.size}:{sorted(self.stats.items())}"

    def forward(self, batch01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.stats
        latent = Editor(self.net, self.schedule, None).invert(self.standardised(batch01), self.timesteps)
        norm, rng, nll = latent_scores(latent)
        maps = unit_map(norm, self.size, st["pixel"])
        total = (rng - st["range"]["mean"]) / st["range"]["std"] + (nll - st["nll"]["mean"]) / st["nll"]["std"]
        return maps, to_unit((total - st["frame"]["mean"]) / st["frame"]["std"])


class FeatureEditGraph(_FeatureGraph):
    """The edit reading's whole computation for one analysis size and one sampler: frames
    (B, 3, h, w) in [0, 1] -> maps (B, H, W) in [0, 1]. The sampler's seeded noise is computed
    once and held as a constant, so the graph exports to ONNX whole."""

    def __init__(self, parts: FeatureParts, sampler: EditSampler, size: tuple[int, int], stats: dict):
        super().__init__(parts, size)
        self.sampler, self.stats = sampler, stats
        self.register_buffer("noise", draw_noise(parts.mean.new_zeros(1, parts.mean.numel(), *parts.grid),
                                                 sampler.seed, sampler.draws))

    @property
    def signature(self) -> str:
        """The constants baked into the graph besides the buffers (backends.OnnxModule's cache key)."""
        return f"feature_edit:{self.sampler}:{self.size}:{sorted(self.stats.items())}"

    def forward(self, batch01: torch.Tensor) -> torch.Tensor:
        # the Editor of self.net as it is now (an export may have wrapped it); no clamp: standardised
        # features exceed [-1, 1]
        d = Editor(self.net, self.schedule, clip=None).score(self.standardised(batch01), self.sampler,
                                                             noise=self.noise)
        return unit_map(d, self.size, self.stats["pixel"])


def _inversion_graph(parts: FeatureParts, stats: dict, s: SamplerSettings, size: tuple[int, int]):
    """inversion_steps (S) picks the timesteps and the ID statistics measured for them."""
    timesteps = inversion_timesteps(s.inversion_steps, parts.schedule.T)
    key = str(max(2, s.inversion_steps))
    if key not in stats:
        near = min(stats, key=lambda k: abs(int(k) - int(key)))
        log.warning("no ID score statistics for inversion_steps=%s in the checkpoint; using those of %s "
                    "(scores in [0, 1] are then only roughly comparable to the thresholds)", key, near)
        key = near
    return ((tuple(timesteps), size, key), lambda: InversionGraph(parts, timesteps, size, stats[key]),
            len(timesteps) - 1)


def _edit_graph(parts: FeatureParts, stats: dict, s: SamplerSettings, size: tuple[int, int]):
    """The live sampler settings (score, steps, start timestep, guidances, seed, draws)."""
    sampler = EditSampler.from_settings(s)
    sampler.warn_unless_measured("feature_edit", stats["sampler"])
    return ((sampler, size), lambda: FeatureEditGraph(parts, sampler, size, stats),
            Editor(parts.net, parts.schedule, clip=None).score_nfe(sampler))


@dataclass(frozen=True)
class Reading:
    """How a variant of the family reads the frame's features with the ID prior: the checkpoint
    entry of its ID statistics, its graph's outputs, and `graph(parts, stats, sampler, size)`
    -> (key of everything the graph bakes in, its builder, network evaluations per frame)."""
    name: str
    stats_entry: str
    outputs: tuple[str, ...]
    graph: Callable[[FeatureParts, dict, SamplerSettings, tuple[int, int]], tuple[tuple, Callable[[], nn.Module], int]]


# The family's two variants: one scorer, configured with how it reads the features.
INVERSION = Reading("inversion", "scores", ("maps", "frames"), _inversion_graph)
EDIT = Reading("edit", "edit_scores", ("maps",), _edit_graph)


class FeatureDiffusionScorer(nn.Module):
    """Frames (B, 3, h, w) in [0, 1] -> ScoreOutput(pixel maps in [0, 1], no edit, and with the
    INVERSION reading the frame scores in [0, 1]).

    INVERSION: the features are DDIM-inverted to t = 999 and the latent's size is the score,
    reconstruction-free. EDIT: analysis by synthesis without a decoder, where the prior lives --
    each cell scored by the ID feature model (samplers.Editor.score: the guided DDIM edit's
    distance from the reconstruction, or the denoising error), averaged over seeded draws, so a
    frame always gets the same map. Both map into [0, 1] with the ID statistics the checkpoint
    measured for them. One graph per key of live settings, on settings.compute.backend (FrameGraphs)."""

    def __init__(self, reading: Reading, parts: FeatureParts, stats: dict, settings: Settings,
                 device: torch.device):
        super().__init__()
        self.reading, self.parts, self.stats = reading, parts, stats
        self.denoiser = parts.net  # a submodule whatever backend the frame graph runs on
        self._graphs = FrameGraphs(device, outputs=reading.outputs)
        self.configure(settings)

    def configure(self, s: Settings) -> None:
        """Live settings: the reading's (inversion_steps, or the edit's sampler) and the analysis size."""
        key, build, self.nfe = self.reading.graph(self.parts, self.stats, s.sampler, s.geometry.size)
        self.graph = self._graphs.get(key, s.compute, build)

    def networks(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        return ExportTarget("frame", self.graph, (3, *size))  # the whole frame as one graph

    @torch.inference_mode()
    def forward(self, batch01: torch.Tensor) -> ScoreOutput:
        out = self.graph(batch01)
        maps, frames = out if self.reading.outputs == ("maps", "frames") else (out, None)
        return ScoreOutput(maps, None, frames)


def build(directory: Path, config: dict, settings: Settings, device: torch.device,
          reading: Reading = INVERSION) -> FeatureDiffusionScorer:
    """The scorer of a variant of the family: the checkpoint's feature model read as `reading` says."""
    if reading.stats_entry not in config:
        raise ckpt.CheckpointError(f"{Path(directory) / ckpt.CONFIG}: no ID statistics of the {reading.name} "
                                   "reading (a checkpoint trained before its variant): train it again")
    parts = parts_compute(settings.compute)  # one graph per frame: the parts stay torch modules
    features = checkpoint_features(directory, config, device, parts.backend, parts.precision)  # taps checked first
    mean, std = load_feature_stats(directory, config)
    net = runtime_denoiser(directory, config, device, parts)  # quantized as stored or as settings ask
    return FeatureDiffusionScorer(reading, FeatureParts(
        features, net, NoiseSchedule(ScheduleConfig(**config["schedule"])), mean.to(device), std.to(device),
        tuple(config["features"]["grid"])), config[reading.stats_entry], settings, device)


def denoiser_entry(kind: str, preset: str, channels: int, grid: tuple[int, int]) -> dict:
    """config.json "denoiser" of a new checkpoint: kind "cell" (default), "local" or "unet"."""
    if kind == "unet":
        return {"kind": kind, "config": unet_config("features", preset, channels, grid)}
    if kind in ("cell", "local"):
        return {"kind": kind, "config": local_config(kind, preset, channels)}
    raise ValueError(f"the feature_diffusion family's denoiser is 'cell', 'local' or 'unet', not {kind!r}")


def model_config(size: tuple[int, int], channels: int, preset: str, kind: str = DEFAULT_DENOISER) -> dict:
    grid = (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE)
    return {"family": FAMILY, "image_size": list(size), "features": features_config(size, channels),
            "denoiser": denoiser_entry(kind, preset, channels, grid), "schedule": SCHEDULE.to_dict()}


def split_statistics(frames: list[Frame], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (training frames, frames held out for the ID score statistics).

    A seeded `fraction` of the frames (at least one when there are two or more; OOD frames
    count too, their OOD cells are masked) is kept out of the diffusion model's training:
    on its own training cells a model this small scores far lower than on unseen ID frames
    (memorisation), which would make the [0, 1] mapping and the range/NLL weighting of the
    frame score useless on new frames."""
    n = len(frames)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
    held = set(random.Random(seed + 1).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def fit(train_frames: list[Frame], out: Path, opts, progress: bool = True, acc=None) -> tuple[dict, dict]:
    """Features family: backbone features of every training frame and its mirror image
    (feature_space.FeatureSource: encoded once when they fit in memory, else batch by batch),
    standardised with statistics of the training cells, train the UNet on them with OOD cells
    masked out of the loss (DenoiserTrainer: EMA, resume), then measure the ID score
    statistics on the ID cells of frames held out of that training (`split_statistics`,
    opts.calib_fraction of them). The noise schedule is always the notes' (SCHEDULE);
    opts.schedule is the pixel family's."""
    acc = acc or make_accelerator(opts, out)
    size = input_size(opts)
    source = FeatureSource(train_frames, size, shared_features(device=acc.device), opts, acc, progress)
    fit_idx, stat_idx = split_statistics(train_frames, opts.calib_fraction, opts.seed)
    if not stat_idx:
        log.warning("no frame left to hold out for the ID score statistics: measuring them on the training "
                    "frames, whose scores are optimistic (set calib_fraction > 0 and give more frames)")
        stat_idx = fit_idx
    moments = ChannelMoments()
    for feats, weights, _ in source.passes(fit_idx):
        moments.add(feats, weights)
    mean, std = moments.result(acc)
    config = model_config(size, source.channels, opts.preset, opts.denoiser or DEFAULT_DENOISER)
    net = build_denoiser(config["denoiser"]["kind"], config["denoiser"]["config"])
    schedule = NoiseSchedule(SCHEDULE)
    trainer = DenoiserTrainer(net, schedule, opts, out, acc)
    trainer.load_state()

    def sample_batch(gen):
        feats, weights = source.sample(gen, opts.batch_size, fit_idx)
        return standardise(feats, mean, std), weights

    trainer.fit(sample_batch, opts.steps, progress)
    ema = trainer.ema_state()
    net.load_state_dict(ema)
    net.eval()

    def held_out():
        for feats, weights, _ in source.passes(stat_idx):
            yield standardise(feats, mean, std).to(acc.device), weights.to(acc.device)

    config["scores"] = score_statistics(net, schedule, held_out(), acc=acc)
    config["edit_scores"] = edit_statistics(net, schedule, held_out(), acc=acc)
    id_cells = int(summed(torch.tensor(moments.cells), acc))
    config["training"] = {"steps": trainer.step, "samples": 2 * len(fit_idx), "id_cells": id_cells,
                          "statistics_frames": [train_frames[i].name for i in stat_idx],
                          "features_in_memory": source.cached, "skipped_frames": source.skipped}
    return config, {"denoiser": ema, "features": {"mean": mean, "std": std}}
