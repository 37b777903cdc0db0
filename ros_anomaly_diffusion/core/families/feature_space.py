"""What the two feature families (inversion, knn) share: their input, the backbone's
stacked features of training frames with per-cell OOD weights, the per-channel
standardisation, the feature record of a checkpoint, and the map of z-scores into [0, 1].

Feature layout on a 256x320 input: 16x20 cells of 16 + 24 + 40 + 112 = 192 channels
(Lite0 blocks 0, 2, 4, 10, at strides 2, 4, 8, 16; networks/backbone.py). The config
records the tapped blocks, their strides and the channel count, and a checkpoint is
loaded with the blocks it recorded. Checkpoints written before that record tapped block
1 (already at stride 4) as "stride 2", 200 channels in all: they keep loading with those
taps (LEGACY_BLOCKS).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..data import OOD, Frame
from ..networks.backbone import FEATURE_BLOCKS, FEATURE_STRIDES, GRID_STRIDE, StackedFeatures, shared_features
from ..networks.deploy import ONNX_BACKENDS, with_backend
from ..settings import Settings

log = logging.getLogger(__name__)

# Stride -> block of checkpoints whose config has no "blocks": their "stride 2" tap was block 1,
# at stride 4. Kept so that those checkpoints (the README's results) run with their own features.
LEGACY_BLOCKS = {2: 1, 4: 2, 8: 4, 16: 10}
# Input size of the feature families (H, W): 16x20 cells. `fit` uses it unless
# TrainOptions.image_size was changed from its default (64, 80), which is the pixel
# family's size and far too small for stride-16 features (a 4x5 grid).
FEATURE_INPUT_SIZE = (256, 320)
PIXEL_DEFAULT_SIZE = (64, 80)


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


def standardise(feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) features -> per-channel z-scores with the ID statistics of channel_stats."""
    return (feats - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def random_frame_features(image_size: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """(features, cell weights, mean, std, standardised features) of two seeded random frames:
    the data of the feature families' init_checkpoint (tests, smoke runs)."""
    features = shared_features()
    frames = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    feats = torch.cat([features(f[None]) for f in frames])
    weights = torch.ones(feats.shape[0], 1, *feats.shape[-2:])
    mean, std = channel_stats(feats, weights)
    return feats, weights, mean, std, standardise(feats, mean, std)


def to_unit(u: torch.Tensor) -> torch.Tensor:
    """A z-score (ID mean 0, ID std 1) -> [0, 1], strictly increasing.

    An algebraic sigmoid centred 3 ID standard deviations up: the ID mean maps to 0.08,
    +3 sd to 0.5, +6 sd to 0.92. Unlike a logistic its tails are polynomial, so strong
    anomalies (tens or hundreds of sd) stay distinguishable in float32 instead of all
    rounding to 1.0 -- a threshold at 1.0 could never fire."""
    w = (u - 3.0) * 0.5
    return 0.5 + 0.5 * w * torch.rsqrt(1.0 + w * w)


def features_config(size: tuple[int, int], channels: int) -> dict:
    """The taps the fit used (shared_features' defaults): what `checkpoint_features` rebuilds."""
    return {"blocks": list(FEATURE_BLOCKS), "strides": list(FEATURE_STRIDES), "grid_stride": GRID_STRIDE,
            "channels": int(channels),
            "grid": [size[0] // GRID_STRIDE, size[1] // GRID_STRIDE]}


def checkpoint_features(directory: Path, config: dict, device, backend: str = "torch",
                        precision: str = "fp32") -> StackedFeatures:
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
        features = shared_features(blocks, rec["grid_stride"], device, backend, precision)
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


def parts_settings(settings: Settings) -> Settings:
    """The settings a feature family builds its networks with: on an ONNX runtime the scorer
    exports its whole frame graph (FrameGraphs), so the parts stay torch modules."""
    return replace(settings, backend="torch", precision="fp32") if settings.backend in ONNX_BACKENDS else settings


class FrameGraphs:
    """A feature family's whole computation per frame as one module (backbone, standardisation,
    the family's model, the maps in [0, 1]), one per live-settings key, each on the backend the
    settings name: eager for torch; on an ONNX runtime exported and run as one graph -- one call
    per frame instead of one per network, and the runtime's optimiser sees it whole (inversion,
    ONNX Runtime, 2 cores: 15 ms against 20 ms for the networks run one by one). Graphs are kept,
    so changing a live setting back costs nothing."""

    def __init__(self, device: torch.device, outputs: tuple[str, ...]):
        self.device, self.outputs = device, outputs
        self._graphs: dict[tuple, nn.Module] = {}

    def get(self, key: tuple, settings: Settings, build: Callable[[], nn.Module]) -> nn.Module:
        """The graph of `key` (everything `build` bakes in) on settings.backend/precision.
        `build()` returns a module whose `signature` names those baked-in constants."""
        key = (*key, settings.backend, settings.precision)
        if key not in self._graphs:
            graph = build().eval()
            if settings.backend in ONNX_BACKENDS:
                graph = with_backend(graph, settings.backend, self.device, inputs=("x",),
                                     precision=settings.precision, outputs=self.outputs,
                                     signature=graph.signature)[0]
            self._graphs[key] = graph
        return self._graphs[key]
