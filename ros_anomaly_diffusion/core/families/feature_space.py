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

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..networks.backbone import FEATURE_BLOCKS, FEATURE_STRIDES, GRID_STRIDE, StackedFeatures, shared_features
from ..networks.backends import ONNX_BACKENDS, with_backend
from ..settings import ComputeSettings
from .fitting import FrameStream, frame_passes, mean_std, shard, summed

log = logging.getLogger(__name__)

# Stride -> block of checkpoints whose config has no "blocks": their "stride 2" tap was block 1,
# at stride 4. Kept so that those checkpoints (the figures of docs/results.md) run with their own features.
LEGACY_BLOCKS = {2: 1, 4: 2, 8: 4, 16: 10}
# Input size of the feature families (H, W) when TrainOptions.image_size is not set: 16x20 cells.
FEATURE_INPUT_SIZE = (256, 320)


def input_size(opts) -> tuple[int, int]:
    """The feature families' input size: opts.image_size, or FEATURE_INPUT_SIZE when not set."""
    size = tuple(int(v) for v in opts.image_size or FEATURE_INPUT_SIZE)
    if size[0] % (2 * GRID_STRIDE) or size[1] % (2 * GRID_STRIDE):
        raise ValueError(f"image size {size} of a feature-space model must be a multiple of {2 * GRID_STRIDE} "
                         f"(a {GRID_STRIDE}-pixel grid the UNet halves once); default {FEATURE_INPUT_SIZE}")
    return size


class ChannelMoments:
    """Per-channel count, sum and sum of squares (float64) over the ID cells (weight 1) of
    feature batches, added up batch by batch and across processes (`result(acc)`): the
    standardisation statistics of a stream of features, the same however it is split up to the
    rounding of float64 sums added in another order (invisible in the float32 results but for a
    rare last bit)."""

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (3, C): count, sum, sum of squares

    def add(self, feats: torch.Tensor, weights: torch.Tensor) -> "ChannelMoments":
        keep = weights.bool().expand_as(feats)
        v = feats.double() * keep
        batch = torch.stack([keep.sum((0, 2, 3)).double(), v.sum((0, 2, 3)), v.square().sum((0, 2, 3))]).cpu()
        self.sums = batch if self.sums is None else self.sums + batch
        return self

    @property
    def cells(self) -> int:
        """ID cells added (by this process)."""
        return 0 if self.sums is None else int(self.sums[0, 0])

    def result(self, acc=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per channel, std clamped at 1e-4; with acc, over every process's cells."""
        if self.sums is None:
            raise ValueError("no features to compute channel statistics from")
        mean, std = mean_std(*summed(self.sums, acc))
        return mean.float(), std.clamp_min(1e-4).float()


def channel_stats(feats: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the ID cells (weight 1) of one tensor of features."""
    return ChannelMoments().add(feats, weights).result()


class FeatureSource:
    """A feature family's training data: backbone features of this process's shard of `frames`
    and of their mirror images, with cell weights (0: the cell holds an OOD pixel) and origin
    rows (index in `frames`, flipped).

    A shard whose features fit in opts.feature_cache_mb is encoded once and kept (`cached`):
    a few frames train as fast as ever. A larger one is encoded batch by batch, frames decoded
    lazily in DataLoader workers, so memory stays flat whatever the size of the set. One frame
    per forward pass, so a frame's features do not depend on the frames batched with it (a
    batched pass adds up differently when the backbone runs on several threads). They depend on
    the thread count and the CPU's kernels, though: the Detector, running a frame at a time,
    gives a training frame's features bit for bit with the same thread count on the same CPU,
    and within float rounding otherwise (measured: 2e-5 at most on features up to 30)."""

    def __init__(self, frames: list, size: tuple[int, int], features: StackedFeatures, opts, acc,
                 progress: bool = True):
        self.frames, self.size, self.features, self.opts, self.acc = frames, tuple(size), features, opts, acc
        self.grid = (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE)
        self.device = features.stem.weight.device
        with torch.inference_mode():
            self.channels = int(features(torch.zeros(1, 3, *self.size, device=self.device)).shape[1])
        mine = len(shard(len(frames), acc))
        self.cached = 2 * mine * self.channels * self.grid[0] * self.grid[1] * 4 <= opts.feature_cache_mb * 2 ** 20
        self._stream: dict[tuple, FrameStream] = {}
        self._rows: tuple[tuple, torch.Tensor] | None = None  # (subset, its rows of the table)
        self._table = None
        if self.cached:
            parts = list(tqdm(self._encoded(None), desc="extracting features", leave=False,
                              disable=not (progress and acc.is_main_process)))
            # torch.cat outside inference mode: ordinary tensors, usable as training data
            self._table = tuple(torch.cat(t) for t in zip(*parts))

    def _encode(self, images: torch.Tensor, weights: torch.Tensor, origin_frames: torch.Tensor,
                flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, cell weights and origin rows of a batch of frames: each frame and its mirror
        image, or, with `flips` (bool per frame), each frame flipped as it says."""
        feats, wgts, origin = [], [], []
        for i, (x, w, f) in enumerate(zip(images, weights, origin_frames)):
            x = x[None].to(self.device)
            for flipped in ((False, True) if flips is None else (bool(flips[i]),)):
                with torch.inference_mode():
                    feats.append(self.features(x.flip(-1).contiguous() if flipped else x).cpu())
                wgts.append(w[None].flip(-1) if flipped else w[None])
                origin.append((int(f), int(flipped)))
        return torch.cat(feats).clone(), torch.cat(wgts), torch.tensor(origin, dtype=torch.long)

    def _encoded(self, subset):
        for batch in frame_passes(self.frames, self.size, self.acc, 8, self.opts.workers, subset=subset,
                                  weight_grid=self.grid):
            yield self._encode(batch.images, batch.weights, batch.indices)

    def passes(self, subset: list[int] | None = None, rows: int = 32):
        """One pass over this process's share of the frames (of `subset`, indices into `frames`):
        (features, cell weights, origin rows) batches of about `rows` rows."""
        if self._table is None:
            yield from self._encoded(subset)
            return
        feats, weights, origin = self._table
        keep = torch.arange(len(origin)) if subset is None else \
            torch.isin(origin[:, 0], torch.as_tensor(subset, dtype=torch.long)).nonzero().squeeze(1)
        for i in range(0, len(keep), rows):
            idx = keep[i:i + rows]
            yield feats[idx], weights[idx], origin[idx]

    def sample(self, gen: torch.Generator, n: int, subset: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """n random (frame, flipped) rows of `subset` from this process's share: (features, weights)."""
        if self._table is not None:
            feats, weights, origin = self._table
            if self._rows is None or self._rows[0] != tuple(subset):
                self._rows = (tuple(subset), torch.isin(origin[:, 0], torch.as_tensor(subset)).nonzero().squeeze(1))
            idx = self._rows[1][torch.randint(0, len(self._rows[1]), (n,), generator=gen)]
            return feats[idx], weights[idx]
        key = tuple(subset)
        if key not in self._stream:
            self._stream[key] = FrameStream([self.frames[i] for i in subset], self.size, self.opts, self.acc,
                                            seed=self.opts.seed, weight_grid=self.grid)
        batch = self._stream[key].next()
        flips = torch.rand(len(batch.indices), generator=gen) < 0.5
        feats, weights, _ = self._encode(batch.images, batch.weights, batch.indices, flips)
        return feats, weights

    @property
    def skipped(self) -> int:
        """Draws of undecodable frames while streaming."""
        return sum(s.skipped for s in self._stream.values())


def standardise(feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) features -> per-channel z-scores with the ID statistics of channel_stats."""
    return (feats - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def to_unit(u: torch.Tensor) -> torch.Tensor:
    """A z-score (ID mean 0, ID std 1) -> [0, 1], strictly increasing.

    An algebraic sigmoid centred 3 ID standard deviations up: the ID mean maps to 0.08,
    +3 sd to 0.5, +6 sd to 0.92. Unlike a logistic its tails are polynomial, so strong
    anomalies (tens or hundreds of sd) stay distinguishable in float32 instead of all
    rounding to 1.0 -- a threshold at 1.0 could never fire."""
    w = (u - 3.0) * 0.5
    return 0.5 + 0.5 * w * torch.rsqrt(1.0 + w * w)


def unit_map(cells: torch.Tensor, size: tuple[int, int], moments: dict) -> torch.Tensor:
    """A score per grid cell (B, h, w) -> the map (B, H, W) in [0, 1] at the analysis size:
    upsampled bilinearly, z-scored with the ID `moments` ({"mean", "std"}), then `to_unit`."""
    up = F.interpolate(cells.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return to_unit((up - moments["mean"]) / moments["std"])


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


def parts_compute(compute: ComputeSettings) -> ComputeSettings:
    """How a feature family builds its networks: on an ONNX runtime the scorer exports its
    whole frame graph (FrameGraphs), so the parts stay torch modules."""
    return replace(compute, backend="torch", precision="fp32") if compute.backend in ONNX_BACKENDS else compute


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

    def get(self, key: tuple, compute: ComputeSettings, build: Callable[[], nn.Module]) -> nn.Module:
        """The graph of `key` (everything `build` bakes in) on compute.backend/precision.
        `build()` returns a module whose `signature` names those baked-in constants."""
        key = (*key, compute.backend, compute.precision)
        if key not in self._graphs:
            graph = build().eval()
            if compute.backend in ONNX_BACKENDS:
                graph = with_backend(graph, compute.backend, self.device, inputs=("x",),
                                     precision=compute.precision, outputs=self.outputs,
                                     signature=graph.signature)[0]
            self._graphs[key] = graph
        return self._graphs[key]
