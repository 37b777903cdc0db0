"""Family "feature_diffusion": a diffusion model of backbone features. Its `inversion` variant
scores frames reconstruction-free, by DDIM inversion.

Method notes sec. 2. Backbone features z of the frame (feature_space.py: EfficientNet-Lite0
taps at strides 2/4/8/16, resized to the stride-16 grid and stacked), standardised per
channel with the ID training statistics, are the data of a small diffusion model (a per-cell
MLP by default, the ID prior of one cell's features; `train --denoiser unet` for the scene-level
UNet; linear betas, T = 1000, eps-prediction) trained on ID cells only. Its `feature_edit`
variant scores each cell under that prior (FeatureEditScorer). At test time z is
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
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..data import Frame
from ..networks.backbone import GRID_STRIDE, StackedFeatures, shared_features
from ..networks.denoisers import build_denoiser, local_config, runtime_denoiser, unet_config
from ..samplers import EditSampler, Editor, NoiseSchedule, ScheduleConfig, draw_noise, inversion_timesteps
from ..scorer import ExportTarget, ScoreOutput
from ..settings import Settings
from .feature_space import (ChannelMoments, FeatureSource, FrameGraphs, checkpoint_features, features_config,
                            input_size, load_feature_stats, parts_settings, standardise, to_unit, unit_map)
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


class InversionGraph(nn.Module):
    """The inversion scorer's whole computation for one analysis size, one S and its ID
    statistics: frames (B, 3, h, w) in [0, 1] -> (pixel maps (B, H, W), frame scores (B,)),
    both in [0, 1] (feature_space.FrameGraphs runs it on the backend)."""

    def __init__(self, features: StackedFeatures, net: nn.Module, schedule: NoiseSchedule, mean: torch.Tensor,
                 std: torch.Tensor, timesteps: list[int], size: tuple[int, int], stats: dict):
        super().__init__()
        self.features, self.net, self.schedule = features, net, schedule
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))
        self.timesteps, self.size, self.stats = list(timesteps), tuple(size), stats

    @property
    def signature(self) -> str:
        """The constants baked into the graph besides the buffers (backends.OnnxModule's cache key)."""
        return f"inversion:{self.timesteps}:{self.size}:{sorted(self.stats.items())}"

    def latents(self, batch01: torch.Tensor) -> torch.Tensor:
        z = (self.features(batch01) - self.mean) / self.std
        return Editor(self.net, self.schedule, None).invert(z, self.timesteps)

    def forward(self, batch01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.stats
        norm, rng, nll = latent_scores(self.latents(batch01))
        maps = unit_map(norm, self.size, st["pixel"])
        total = (rng - st["range"]["mean"]) / st["range"]["std"] + (nll - st["nll"]["mean"]) / st["nll"]["std"]
        return maps, to_unit((total - st["frame"]["mean"]) / st["frame"]["std"])


class InversionScorer:
    """Frames (B, 3, h, w) in [0, 1] -> ScoreOutput(pixel maps, None, frame scores), all in [0, 1].

    Runs an InversionGraph on settings.backend (feature_space.FrameGraphs)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, mean: torch.Tensor, std: torch.Tensor,
                 stats: dict, settings: Settings, device: torch.device, features: StackedFeatures | None = None):
        self.net, self.schedule, self.stats = net, schedule, stats
        self.features = features or shared_features(device=device)
        self.mean, self.std = mean.to(device).reshape(1, -1, 1, 1), std.to(device).reshape(1, -1, 1, 1)
        self._graphs = FrameGraphs(device, outputs=("maps", "frames"))
        self.apply(settings)

    def apply(self, s: Settings) -> None:
        """Live settings: inversion_steps (S) picks the timesteps and the ID statistics."""
        self.timesteps = inversion_timesteps(s.inversion_steps, self.schedule.T)
        self.size = (s.analysis_height, s.analysis_width)
        key = str(max(2, s.inversion_steps))
        if key not in self.stats:
            near = min(self.stats, key=lambda k: abs(int(k) - int(key)))
            log.warning("no ID score statistics for inversion_steps=%s in the checkpoint; using those of %s "
                        "(scores in [0, 1] are then only roughly comparable to the thresholds)", key, near)
            key = near
        self.graph = self._graphs.get((tuple(self.timesteps), self.size, key), s, lambda: InversionGraph(
            self.features, self.net, self.schedule, self.mean, self.std, self.timesteps, self.size, self.stats[key]))
        self.settings = s

    @property
    def nfe(self) -> int:
        return len(self.timesteps) - 1

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        return ExportTarget("frame", self.graph, (3, *size))  # the whole frame as one graph

    @torch.inference_mode()
    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        maps, frames = self.graph(batch01)
        return ScoreOutput(maps, None, frames)


@torch.inference_mode()
def edit_statistics(net, schedule: NoiseSchedule, batches, sampler: EditSampler = EDIT_SAMPLER, acc=None) -> dict:
    """ID mean/std of the edit's score (Editor.score) over the ID cells of batches (z, weights),
    with the sampler that measured them; with acc, over every process's batches."""
    editor = Editor(net, schedule, clip=None)  # standardised features exceed [-1, 1]
    d = [editor.score(z, sampler)[weights[:, 0].bool()].cpu() for z, weights in batches]
    return {"sampler": sampler.to_dict(), "pixel": _moments(gathered(d, acc))}


class FeatureEditGraph(nn.Module):
    """The feature_edit scorer's whole computation for one analysis size and one sampler: frames
    (B, 3, h, w) in [0, 1] -> maps (B, H, W) in [0, 1]. The sampler's seeded noise is computed
    once and held as a constant, so the graph exports to ONNX whole (feature_space.FrameGraphs)."""

    def __init__(self, features: StackedFeatures, net: nn.Module, schedule: NoiseSchedule, mean: torch.Tensor,
                 std: torch.Tensor, sampler: EditSampler, grid: tuple[int, int], size: tuple[int, int], stats: dict):
        super().__init__()
        self.features, self.net, self.schedule = features, net, schedule
        self.sampler, self.size, self.stats = sampler, tuple(size), stats
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))
        self.register_buffer("noise", draw_noise(mean.new_zeros(1, mean.numel(), *grid), sampler.seed, sampler.draws))

    @property
    def signature(self) -> str:
        """The constants baked into the graph besides the buffers (backends.OnnxModule's cache key)."""
        return f"feature_edit:{self.sampler}:{self.size}:{sorted(self.stats.items())}"

    def forward(self, batch01: torch.Tensor) -> torch.Tensor:
        z = (self.features(batch01) - self.mean) / self.std
        # the Editor of self.net as it is now (an export may have wrapped it); no clamp: standardised
        # features exceed [-1, 1]
        d = Editor(self.net, self.schedule, clip=None).score(z, self.sampler, noise=self.noise)
        return unit_map(d, self.size, self.stats["pixel"])


class FeatureEditScorer:
    """Analysis by synthesis without a decoder, where the prior lives: the frame's standardised
    backbone features are scored cell by cell by the ID feature model (samplers.Editor.score:
    the guided DDIM edit's distance from the reconstruction, or the denoising error), averaged
    over seeded draws and mapped into [0, 1] with the ID statistics of the sampler the
    checkpoint measured (`edit_statistics`). Seeded, so a frame always gets the same map. Runs a
    FeatureEditGraph per (sampler, analysis size) on settings.backend (FrameGraphs)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, mean: torch.Tensor, std: torch.Tensor,
                 stats: dict, settings: Settings, device: torch.device, features: StackedFeatures,
                 grid: tuple[int, int]):
        self.net, self.schedule, self.stats, self.features, self.grid = net, schedule, stats, features, grid
        self.editor = Editor(net, schedule, clip=None)
        self.mean, self.std = mean.to(device).reshape(1, -1, 1, 1), std.to(device).reshape(1, -1, 1, 1)
        self._graphs = FrameGraphs(device, outputs=("maps",))
        self.apply(settings)

    def apply(self, s: Settings) -> None:
        """Live settings: the score, the edit's steps, start timestep, guidances, seed and draws."""
        self.sampler = EditSampler.from_settings(s)
        self.size = (s.analysis_height, s.analysis_width)
        measured = EditSampler.from_dict(self.stats["sampler"])
        if self.sampler != measured:
            log.warning("feature_edit runs %s but the checkpoint's ID statistics were measured with %s: scores in "
                        "[0, 1] are then only roughly comparable to the thresholds (recalibrate)", self.sampler,
                        measured)
        self.graph = self._graphs.get((self.sampler, self.size), s, lambda: FeatureEditGraph(
            self.features, self.net, self.schedule, self.mean, self.std, self.sampler, self.grid, self.size,
            self.stats))

    @property
    def nfe(self) -> int:
        return self.editor.score_nfe(self.sampler)

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        return ExportTarget("frame", self.graph, (3, *size))  # the whole frame as one graph

    @torch.inference_mode()
    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        return ScoreOutput(self.graph(batch01), None)


MODES = ("inversion", "edit")


def build(directory: Path, config: dict, settings: Settings, device: torch.device,
          mode: str = "inversion") -> InversionScorer | FeatureEditScorer:
    """The scorer of the variant that reads the feature model by DDIM inversion or by editing."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "edit" and "edit_scores" not in config:
        raise ckpt.CheckpointError(f"{Path(directory) / ckpt.CONFIG}: no ID statistics of the feature edit "
                                   "(a checkpoint trained before the feature_edit variant): train it again")
    parts = parts_settings(settings)  # one graph per frame: the parts stay torch modules
    features = checkpoint_features(directory, config, device, parts.backend, parts.precision)
    mean, std = load_feature_stats(directory, config)
    net = runtime_denoiser(directory, config, device, parts)  # quantized as stored or as settings ask
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    if mode == "edit":
        return FeatureEditScorer(net, schedule, mean, std, config["edit_scores"], settings, device, features,
                                 tuple(config["features"]["grid"]))
    return InversionScorer(net, schedule, mean, std, config["scores"], settings, device, features)


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
