"""The `inversion` variant (family "features"): reconstruction-free scoring by DDIM inversion.

Method notes sec. 2. Backbone features z of the frame (EfficientNet-Lite0 taps at strides
2/4/8/16, all resized to the stride-16 grid and stacked), standardised per channel with
the ID training statistics, are the data of a small diffusion model (UNet, linear betas,
T = 1000, eps-prediction) trained on ID cells only. At test time z is *inverted* with
deterministic DDIM (eta = 0) to t = 999 in a few steps; for ID features the final latent
should look like N(0, I) noise, so its size is the anomaly score:

- pixel score: L2 norm over channels of the final latent per grid cell, upsampled
  bilinearly to the analysis size;
- frame score: (max - min) of that map plus the Gaussian NLL of the latent, each
  z-scored with ID statistics measured at training time, then added.

Both are mapped into [0, 1] (thresholds and overlay live there) by `to_unit`, a strictly
monotone map fixed by ID statistics stored in the checkpoint: ranking metrics (AP,
AUROC) are those of the raw scores. The statistics are measured per inversion_steps
value on the ID cells of training frames held out of the diffusion model's training.

Feature layout on a 256x320 input: 16x20 cells of 16 + 24 + 40 + 112 = 192 channels
(Lite0 blocks 0, 2, 4, 10, at strides 2, 4, 8, 16). The config records the tapped blocks,
their strides and the channel count, and a checkpoint is loaded with the blocks it
recorded. Checkpoints written before that record tapped block 1 (already at stride 4) as
"stride 2", 200 channels in all: they keep loading with those taps (LEGACY_BLOCKS).

The knn baseline (knn.py) shares the feature code and the score mapping of this module.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import OOD, Frame
from .denoiser import build_denoiser
from .features import STAGE_BLOCKS, FeatureExtractor
from .fitting import DenoiserTrainer
from .quantization import load_denoiser
from .schedule import NoiseSchedule, ScheduleConfig
from .scorer import ScoreOutput
from .settings import Settings

log = logging.getLogger(__name__)

FAMILY = "features"
FEATURE_STRIDES = (2, 4, 8, 16)
FEATURE_BLOCKS = tuple(STAGE_BLOCKS[s] for s in FEATURE_STRIDES)
# Stride -> block of checkpoints whose config has no "blocks": their "stride 2" tap was block 1,
# at stride 4. Kept so that those checkpoints (the README's results) run with their own features.
LEGACY_BLOCKS = {2: 1, 4: 2, 8: 4, 16: 10}
GRID_STRIDE = 16
# Input size of the feature families (H, W): 16x20 cells. `fit` uses it unless
# TrainOptions.image_size was changed from its default (64, 80), which is the pixel
# family's size and far too small for stride-16 features (a 4x5 grid).
FEATURE_INPUT_SIZE = (256, 320)
PIXEL_DEFAULT_SIZE = (64, 80)
# Method notes sec. 2: linear betas 1e-4..0.02, T = 1000, eps-prediction.
SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          prediction_type="epsilon")
# inversion_steps values whose ID score statistics are measured at training time; a live
# setting outside this range uses the nearest one (the mapping to [0, 1] is then approximate).
STAT_STEPS = tuple(range(2, 7))
# Feature-space UNets (one down level: 16x20 -> 8x10), by TrainOptions.preset. "small"
# keeps S = 3 (2 network calls) plus the backbone within ~66 ms a frame on 2 CPU cores.
UNET_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "small": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16),
    "medium": dict(block_out_channels=(128, 256), layers_per_block=1, norm_num_groups=32),
    "reference": dict(block_out_channels=(128, 256), layers_per_block=2, norm_num_groups=32),
}
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- features


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return (conv.weight * scale.reshape(-1, 1, 1, 1)).detach().contiguous(), bias.detach().contiguous()


class _FoldedConv(nn.Module):
    """Conv + eval-mode BatchNorm (+ ReLU6) as one convolution with a bias; same 'SAME' padding."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        super().__init__()
        weight, bias = _fold(conv, bn)
        # channels_last: oneDNN's depthwise and 1x1 kernels run ~2x faster on it (2-core CPU)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias)
        self.stride, self.groups, self.relu6 = tuple(conv.stride), conv.groups, relu6
        pad = getattr(conv, "static_padding", None)
        pad = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)  # (left, right, top, bottom)
        if pad[0] == pad[1] and pad[2] == pad[3]:
            self.pre_pad, self.padding = None, (pad[2], pad[0])  # symmetric: the convolution pads itself
        else:
            self.pre_pad, self.padding = pad, (0, 0)  # TF 'SAME' of stride 2: one more row/column at the end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return x.clamp_(0.0, 6.0) if self.relu6 else x


class _FoldedBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        if getattr(block, "has_se", False):
            raise ValueError("squeeze-and-excitation blocks are not supported (EfficientNet-Lite has none)")
        self.expand = _FoldedConv(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else None
        self.depthwise = _FoldedConv(block._depthwise_conv, block._bn1, True)
        self.project = _FoldedConv(block._project_conv, block._bn2, False)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.skip = bool(block.id_skip and stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return y.add_(x) if self.skip else y


class StackedFeatures(nn.Module):
    """`FeatureExtractor(blocks=blocks).stacked(x, grid_stride)` with BatchNorm folded into the
    convolutions, in-place activations and channels-last memory: the same numbers (to float
    rounding), 2-3x faster on this 2-core CPU (256x320: ~25 ms instead of ~65 ms).
    Built from a FeatureExtractor, so it follows its taps and weights."""

    def __init__(self, blocks: tuple[int, ...] = FEATURE_BLOCKS, grid_stride: int = GRID_STRIDE):
        super().__init__()
        fe = FeatureExtractor(blocks=tuple(blocks))
        if not isinstance(fe.stem[2], nn.ReLU6) or not all(isinstance(b._swish, nn.ReLU6) for b in fe.blocks):
            raise ValueError("expected ReLU6 activations (EfficientNet-Lite)")
        self.strides, self.grid_stride = fe.strides, grid_stride
        self.stem = _FoldedConv(fe.stem[0], fe.stem[1], True)
        self.blocks = nn.ModuleList(_FoldedBlock(b) for b in fe.blocks)
        self.taps = sorted(fe.taps)  # block indices whose outputs are stacked, in stride order
        self.requires_grad_(False)
        self.eval()

    @torch.inference_mode()
    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H / s, W / s) on the grid of stride s."""
        x = self.stem((rgb01 * 2.0 - 1.0).contiguous(memory_format=torch.channels_last))  # Lite: mean/std 0.5
        h, w = rgb01.shape[-2] // self.grid_stride, rgb01.shape[-1] // self.grid_stride
        maps = []
        for i, block in enumerate(self.blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                maps.append(x if x.shape[-2:] == (h, w) else
                            F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(maps, dim=1).contiguous()


_SHARED: dict[tuple, StackedFeatures] = {}


def shared_features(blocks: tuple[int, ...] = FEATURE_BLOCKS, grid_stride: int = GRID_STRIDE,
                    device: str | torch.device = "cpu") -> StackedFeatures:
    """One StackedFeatures per (tapped blocks, grid, device) in a process: it is read-only, so
    every scorer shares it and a model reload does not rebuild the backbone."""
    key = (tuple(sorted(int(b) for b in blocks)), int(grid_stride), str(torch.device(device)))
    if key not in _SHARED:
        _SHARED[key] = StackedFeatures(key[0], key[1]).to(device)
    return _SHARED[key]


def input_size(opts) -> tuple[int, int]:
    """The feature families' input size: FEATURE_INPUT_SIZE unless opts.image_size was changed."""
    size = tuple(int(v) for v in opts.image_size)
    if size == PIXEL_DEFAULT_SIZE:
        size = FEATURE_INPUT_SIZE
    if size[0] % (2 * GRID_STRIDE) or size[1] % (2 * GRID_STRIDE):
        raise ValueError(f"image size {size} of a feature-space model must be a multiple of {2 * GRID_STRIDE} "
                         f"(a {GRID_STRIDE}-pixel grid the UNet halves once); default {FEATURE_INPUT_SIZE}")
    return size


def frame_tensor(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 RGB frame -> (1, 3, H, W) in [0, 1] at `size`, resized exactly as the Detector does."""
    h, w = size
    small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    return (torch.from_numpy(small).permute(2, 0, 1).float() / 255.0).unsqueeze(0).contiguous()


def cell_weights(label: np.ndarray | None, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) loss weights on the feature grid: 0 for a cell that any OOD pixel falls into."""
    gh, gw = grid
    if label is None:
        return torch.ones(1, 1, gh, gw)
    # INTER_AREA averages the full-resolution pixels covering each cell: > 0 iff one is OOD.
    coverage = cv2.resize((label == OOD).astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((coverage <= 0).astype(np.float32))[None, None]


def extract_features(frames: list[Frame], size: tuple[int, int], features: StackedFeatures,
                     flips: bool = True, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of every frame (and its mirror image): (N, C, h, w), cell weights (N, 1, h, w),
    and (N, 2) int64 origin rows (frame index, flipped). One frame per forward pass, as
    the Detector runs, so a training frame gives bit-identical features at test time."""
    grid = (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE)
    device = features.stem.weight.device
    feats, weights, origin = [], [], []
    for i, f in enumerate(tqdm(frames, desc="extracting features", disable=not progress, leave=False)):
        x, wgt = frame_tensor(f.rgb(), size).to(device), cell_weights(f.label(), grid)
        for flipped in ((False, True) if flips else (False,)):
            feats.append(features(x.flip(-1).contiguous() if flipped else x).cpu())
            weights.append(wgt.flip(-1) if flipped else wgt)
            origin.append((i, int(flipped)))
    # torch.cat outside inference mode: ordinary tensors, usable as training data
    return torch.cat(feats), torch.cat(weights), torch.tensor(origin, dtype=torch.long)


def channel_stats(feats: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the ID cells (weight 1), float64 accumulation."""
    keep = weights.bool().expand_as(feats).permute(1, 0, 2, 3).reshape(feats.shape[1], -1)
    v = feats.permute(1, 0, 2, 3).reshape(feats.shape[1], -1).double()
    n = keep.sum(1).clamp_min(1)
    mean = (v * keep).sum(1) / n
    var = (((v - mean[:, None]) ** 2) * keep).sum(1) / (n - 1).clamp_min(1)
    return mean.float(), var.sqrt().clamp_min(1e-4).float()


# --------------------------------------------------------------------------- score mapping


def to_unit(u: torch.Tensor) -> torch.Tensor:
    """A z-score (ID mean 0, ID std 1) -> [0, 1], strictly increasing.

    An algebraic sigmoid centred 3 ID standard deviations up: the ID mean maps to 0.08,
    +3 sd to 0.5, +6 sd to 0.92. Unlike a logistic its tails are polynomial, so strong
    anomalies (tens or hundreds of sd) stay distinguishable in float32 instead of all
    rounding to 1.0 -- a threshold at 1.0 could never fire."""
    w = (u - 3.0) * 0.5
    return 0.5 + 0.5 * w * torch.rsqrt(1.0 + w * w)


def from_unit(s: float) -> float:
    """Inverse of `to_unit` (z-score of a value in (0, 1)), for reports."""
    y = 2.0 * s - 1.0
    return 3.0 + 2.0 * y / math.sqrt(max(1e-12, 1.0 - y * y))


# --------------------------------------------------------------------------- DDIM inversion


def inversion_timesteps(steps: int, T: int = 1000) -> list[int]:
    """`steps` evenly spaced timesteps from 0 to T-1 (3 -> [0, 500, 999]): steps - 1 network
    calls. One step would be no inversion at all, so 1 is treated as 2 ([0, 999])."""
    return [int(t) for t in np.linspace(0, T - 1, max(int(steps), 2)).round()]


# Written here rather than with diffusers' DDIMInverseScheduler: that scheduler only spaces
# steps "leading"/"trailing" (no {0, 500, 999}) and takes eps evaluated at the destination
# timestep, whereas the notes evaluate eps at the current (x_t, t).
def ddim_invert(net, schedule: NoiseSchedule, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x at timesteps[0] up to timesteps[-1]."""
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        a, a_next = schedule.abar(t), schedule.abar(t_next)
        eps = schedule.eps_from_output(net(x, t), x, t)
        x0 = x / math.sqrt(a) - math.sqrt(1.0 / a - 1.0) * eps
        x = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
    return x


def ddim_sample(net, schedule: NoiseSchedule, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """The DDIM sampler (eta = 0) back down the same timesteps: the inverse map, for checks."""
    down = timesteps[::-1]
    for t, t_prev in zip(down[:-1], down[1:]):
        a, a_prev = schedule.abar(t), schedule.abar(t_prev)
        eps = schedule.eps_from_output(net(x, t), x, t)
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


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
def score_statistics(net, schedule: NoiseSchedule, z: torch.Tensor, weights: torch.Tensor,
                     steps: tuple[int, ...] = STAT_STEPS, batch: int = 32) -> dict[str, dict]:
    """ID statistics of the pixel norm, the frame range, the NLL and their z-scored sum,
    per inversion_steps value, over the ID cells of standardised features z."""
    out = {}
    for s in steps:
        ts = inversion_timesteps(s, schedule.T)
        norms, rngs, nlls = [], [], []
        for i in range(0, len(z), batch):
            wb = weights[i:i + batch]
            norm, rng, nll = latent_scores(ddim_invert(net, schedule, z[i:i + batch], ts), wb)
            norms.append(norm[wb[:, 0].bool()])
            rngs.append(rng)
            nlls.append(nll)
        rng, nll = torch.cat(rngs), torch.cat(nlls)
        stats = {"pixel": _moments(torch.cat(norms)), "range": _moments(rng), "nll": _moments(nll)}
        total = ((rng - stats["range"]["mean"]) / stats["range"]["std"]
                 + (nll - stats["nll"]["mean"]) / stats["nll"]["std"])
        stats["frame"] = _moments(total)
        out[str(s)] = stats
    return out


# --------------------------------------------------------------------------- scorer


class InversionScorer:
    """Frames (B, 3, h, w) in [0, 1] -> ScoreOutput(pixel maps, None, frame scores), all in [0, 1]."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, mean: torch.Tensor, std: torch.Tensor,
                 stats: dict, settings: Settings, device: torch.device, features: StackedFeatures | None = None):
        self.net, self.schedule, self.stats = net, schedule, stats
        self.features = features or shared_features(device=device)
        self.mean, self.std = mean.to(device).reshape(1, -1, 1, 1), std.to(device).reshape(1, -1, 1, 1)
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
        st = self.stats[key]
        self._pix, self._rng, self._nll, self._frame = st["pixel"], st["range"], st["nll"], st["frame"]
        self.settings = s

    @property
    def nfe(self) -> int:
        return len(self.timesteps) - 1

    @torch.inference_mode()
    def latents(self, batch01: torch.Tensor) -> torch.Tensor:
        z = (self.features(batch01) - self.mean) / self.std
        return ddim_invert(self.net, self.schedule, z, self.timesteps)

    @torch.inference_mode()
    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        norm, rng, nll = latent_scores(self.latents(batch01))
        up = F.interpolate(norm.unsqueeze(1), size=self.size, mode="bilinear", align_corners=False).squeeze(1)
        maps = to_unit((up - self._pix["mean"]) / self._pix["std"])
        total = (rng - self._rng["mean"]) / self._rng["std"] + (nll - self._nll["mean"]) / self._nll["std"]
        frames = to_unit((total - self._frame["mean"]) / self._frame["std"])
        return ScoreOutput(maps, None, frames)


def checkpoint_features(directory: Path, config: dict, device) -> StackedFeatures:
    """The shared backbone with the taps a checkpoint was trained on: its recorded blocks, or
    LEGACY_BLOCKS for a config without them. Refused (CheckpointError) where those taps do
    not give the recorded strides and channel count, so it never runs on other features."""
    path, rec = Path(directory) / ckpt.CONFIG, config["features"]
    if "blocks" in rec:
        blocks = tuple(int(b) for b in rec["blocks"])
    else:
        unknown = sorted(set(rec["strides"]) - set(LEGACY_BLOCKS))
        if unknown:
            raise ckpt.CheckpointError(f"{path}: feature strides {unknown} without recorded blocks")
        blocks = tuple(LEGACY_BLOCKS[s] for s in rec["strides"])
        log.info("%s: no recorded feature blocks; using the taps it was made with, blocks %s", path, blocks)
    try:
        features = shared_features(blocks, rec["grid_stride"], device)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: {e}") from e
    with torch.inference_mode():
        c = features(torch.zeros(1, 3, 2 * GRID_STRIDE, 2 * GRID_STRIDE, device=device)).shape[1]
    strides_ok = "blocks" not in rec or list(features.strides) == list(rec["strides"])
    if c != rec["channels"] or not strides_ok:
        raise ckpt.CheckpointError(f"{path}: trained on {rec['channels']} feature channels at strides "
                                   f"{list(rec['strides'])}, but EfficientNet-Lite0 blocks {list(blocks)} give {c} "
                                   f"at strides {list(features.strides)}: retrain this checkpoint")
    return features


def load_feature_stats(directory: Path, config: dict) -> tuple:
    stats = ckpt.load_tensors(directory, "features")
    if set(stats) != {"mean", "std"} or stats["mean"].shape != (config["features"]["channels"],):
        raise ckpt.CheckpointError(f"{Path(directory) / 'features.safetensors'}: expected per-channel "
                                   f"'mean' and 'std' of {config['features']['channels']} channels")
    return stats["mean"], stats["std"]


def build(directory: Path, config: dict, settings: Settings, device: torch.device) -> InversionScorer:
    features = checkpoint_features(directory, config, device)
    mean, std = load_feature_stats(directory, config)
    net = load_denoiser(directory, config, device, settings)  # quantized as stored or as settings ask
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    return InversionScorer(net, schedule, mean, std, config["scores"], settings, device, features)


# --------------------------------------------------------------------------- training


def unet_config(preset: str, channels: int, grid: tuple[int, int]) -> dict:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown preset {preset!r} for the feature-space UNet; choose one of {sorted(UNET_PRESETS)}")
    p = UNET_PRESETS[preset]
    return dict(sample_size=list(grid), in_channels=channels, out_channels=channels,
                block_out_channels=list(p["block_out_channels"]), layers_per_block=p["layers_per_block"],
                down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                norm_num_groups=p["norm_num_groups"], attention_head_dim=32)


def features_config(size: tuple[int, int], channels: int) -> dict:
    """The taps the fit used (shared_features' defaults): what `checkpoint_features` rebuilds."""
    return {"blocks": list(FEATURE_BLOCKS), "strides": list(FEATURE_STRIDES), "grid_stride": GRID_STRIDE,
            "channels": int(channels),
            "grid": [size[0] // GRID_STRIDE, size[1] // GRID_STRIDE]}


def model_config(size: tuple[int, int], channels: int, preset: str) -> dict:
    grid = (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE)
    return {"family": FAMILY, "image_size": list(size), "features": features_config(size, channels),
            "denoiser": {"kind": "unet", "config": unet_config(preset, channels, grid)},
            "schedule": SCHEDULE.to_dict()}


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


def fit(train_frames: list[Frame], out: Path, opts, progress: bool = True) -> tuple[dict, dict]:
    """Features family: precompute the features of every training frame and its mirror image
    once, standardise them, train the UNet on them with OOD cells masked out of the loss
    (DenoiserTrainer: EMA, resume), then measure the ID score statistics on the ID cells of
    frames held out of that training (`split_statistics`, opts.calib_fraction of them).
    The noise schedule is always the notes' (SCHEDULE); opts.schedule is the pixel family's."""
    size = input_size(opts)
    features = shared_features(device=opts.device)
    feats, weights, origin = extract_features(train_frames, size, features, flips=True, progress=progress)
    fit_idx, stat_idx = split_statistics(train_frames, opts.calib_fraction, opts.seed)
    if not stat_idx:
        log.warning("no frame left to hold out for the ID score statistics: measuring them on the training "
                    "frames, whose scores are optimistic (set calib_fraction > 0 and give more frames)")
        stat_idx = fit_idx
    in_fit = torch.isin(origin[:, 0], torch.tensor(fit_idx))
    in_stat = torch.isin(origin[:, 0], torch.tensor(stat_idx))
    mean, std = channel_stats(feats[in_fit], weights[in_fit])
    z = ((feats - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).contiguous()
    z_fit, w_fit = z[in_fit], weights[in_fit]
    config = model_config(size, feats.shape[1], opts.preset)
    net = build_denoiser("unet", config["denoiser"]["config"])
    schedule = NoiseSchedule(SCHEDULE)
    trainer = DenoiserTrainer(net, schedule, opts, out)
    trainer.load_state()

    def sample_batch(gen):
        idx = torch.randint(0, len(z_fit), (opts.batch_size,), generator=gen)
        return z_fit[idx], w_fit[idx]

    trainer.fit(sample_batch, opts.steps, progress)
    ema = trainer.ema_state()
    net.load_state_dict(ema)
    net.eval()
    config["scores"] = score_statistics(net, schedule, z[in_stat].to(opts.device), weights[in_stat].to(opts.device))
    config["training"] = {"steps": trainer.step, "samples": int(in_fit.sum()), "id_cells": int(w_fit.sum()),
                          "statistics_frames": [train_frames[i].name for i in stat_idx]}
    return config, {"denoiser": ema, "features": {"mean": mean, "std": std}}


def init_checkpoint(directory: str | Path, image_size: tuple[int, int] = (64, 96), preset: str = "tiny",
                    seed: int = 0, calibration: dict | None = None) -> Path:
    """An untrained features-family checkpoint (tests, smoke runs); statistics from two random frames."""
    torch.manual_seed(seed)
    features = shared_features()
    frames = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    feats = torch.cat([features(f[None]) for f in frames])
    weights = torch.ones(feats.shape[0], 1, *feats.shape[-2:])
    mean, std = channel_stats(feats, weights)
    config = model_config(tuple(image_size), feats.shape[1], preset)
    net = build_denoiser("unet", config["denoiser"]["config"]).eval()
    z = (feats - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    config["scores"] = score_statistics(net, NoiseSchedule(SCHEDULE), z, weights, steps=(2, 3))
    if calibration:
        config["calibration"] = calibration
    return ckpt.save(directory, config, {"denoiser": net.state_dict(), "features": {"mean": mean, "std": std}})
