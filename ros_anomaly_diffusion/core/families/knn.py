"""The `knn` baseline (family "knn"): distance to the nearest ID feature vector.

Same features as the inversion variant (feature_space.py, which also documents the taps of older
checkpoints): EfficientNet-Lite0 taps at strides 2/4/8/16 (192 channels) stacked on the
stride-16 grid (16x20 cells at the 256x320 input), standardised per channel with the ID
training statistics -- so the two variants differ only in how they model the ID features
(a diffusion model vs a memory bank). The stride-16 grid also keeps the search cheap: 320
queries a frame against at most MAX_BANK vectors.

Memory bank: the standardised feature vectors of the ID cells of the training frames and
their mirror images (a cell with any OOD pixel is left out), randomly subsampled (seeded)
to at most MAX_BANK vectors. Pixel score: Euclidean distance to the nearest bank vector,
upsampled bilinearly to the analysis size and mapped into [0, 1] by `feature_space.to_unit`
with the mean/std of leave-one-frame-out ID distances (each training cell against the
bank without its own frame: what an unseen ID frame looks like). Frame score: the
Detector's default top-k mean of the map.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn

from .. import checkpoint as ckpt
from ..data import Frame
from ..networks.backbone import StackedFeatures, shared_features
from ..scorer import ExportTarget, ScoreOutput
from ..settings import Settings
from .feature_space import (ChannelMoments, FeatureSource, FrameGraphs, checkpoint_features, features_config,
                            input_size, load_feature_stats, parts_compute, standardise, unit_map)
from .fitting import make_accelerator, mean_std, summed

log = logging.getLogger(__name__)

FAMILY = "knn"
RUNS_ON_TENSORRT = False  # backend tensorrt: no denoiser; the frame graph is exported for trtexec
MAX_BANK = 20_000
_CHUNK = 8192  # bank vectors per distance block (queries x chunk floats)


@torch.inference_mode()
def nearest(queries: torch.Tensor, bank: torch.Tensor, query_groups: torch.Tensor | None = None,
            bank_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each query (Q, C) to its nearest bank vector (M, C), and that vector's index.

    The search uses |q|^2 + |b|^2 - 2 q.b in blocks (one matrix product); the winner's
    distance is then recomputed directly, so a query equal to a bank vector scores exactly
    0. With groups, bank vectors of the query's own group are skipped (leave-one-out)."""
    q2 = queries.square().sum(1, keepdim=True)
    # shaped after the queries, not sized by len(): an ONNX export keeps the query count free
    best = torch.full_like(q2[:, 0], float("inf"))
    index = torch.zeros_like(q2[:, 0], dtype=torch.long)
    for start in range(0, len(bank), _CHUNK):
        b = bank[start:start + _CHUNK]
        d2 = torch.addmm(q2 + b.square().sum(1)[None], queries, b.T, alpha=-2.0)
        if query_groups is not None:
            d2.masked_fill_(query_groups[:, None] == bank_groups[None, start:start + _CHUNK], float("inf"))
        value, arg = d2.min(1)
        better = value < best
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    if not torch.isfinite(best).all():
        raise ValueError("a query has no bank vector outside its own group")
    return torch.linalg.vector_norm(queries - bank[index], dim=1), index


class KnnGraph(nn.Module):
    """The knn scorer's whole computation for one analysis size: frames (B, 3, h, w) in [0, 1]
    -> pixel maps (B, H, W) in [0, 1] (feature_space.FrameGraphs runs it on the backend)."""

    def __init__(self, features: StackedFeatures, bank: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 size: tuple[int, int], stats: dict):
        super().__init__()
        self.features, self.size, self.stats = features, tuple(size), stats
        self.register_buffer("bank", bank)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))

    @property
    def signature(self) -> str:
        """The constants baked into the graph besides the buffers (backends.OnnxModule's cache key)."""
        return f"knn:{self.size}:{sorted(self.stats.items())}"

    def distances(self, batch01: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, h/16, w/16) nearest-neighbour distances in standardised feature space."""
        z = (self.features(batch01) - self.mean) / self.std
        b, c, h, w = z.shape
        d, _ = nearest(z.permute(0, 2, 3, 1).reshape(-1, c), self.bank)
        return d.reshape(b, h, w)

    def forward(self, batch01: torch.Tensor) -> torch.Tensor:
        return unit_map(self.distances(batch01), self.size, self.stats)


class KnnScorer(nn.Module):
    """Frames (B, 3, h, w) in [0, 1] -> ScoreOutput(maps in [0, 1] at the analysis size, None).
    Runs a KnnGraph on settings.compute.backend (feature_space.FrameGraphs)."""

    nfe = 0  # no network evaluations beyond the backbone

    def __init__(self, bank: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, stats: dict, settings: Settings,
                 device: torch.device, features: StackedFeatures | None = None):
        super().__init__()
        self.features = features or shared_features(device=device)
        self.bank = bank.to(device).contiguous()
        self.mean, self.std = mean.to(device), std.to(device)
        self.stats = stats
        self._graphs = FrameGraphs(device, outputs=("maps",))
        self.configure(settings)

    def _graph(self, size: tuple[int, int]) -> KnnGraph:
        return KnnGraph(self.features, self.bank, self.mean, self.std, size, self.stats)

    def configure(self, s: Settings) -> None:
        self.size = s.geometry.size
        self.graph = self._graphs.get((self.size,), s.compute, lambda: self._graph(self.size))
        self.settings = s

    def networks(self) -> dict[str, nn.Module]:
        return {}  # the ImageNet backbone only; the checkpoint holds a feature bank

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        return ExportTarget("frame", self.graph, (3, *size))  # the whole frame as one graph

    @torch.inference_mode()
    def forward(self, batch01: torch.Tensor) -> ScoreOutput:
        return ScoreOutput(self.graph(batch01), None)


def build(directory: Path, config: dict, settings: Settings, device: torch.device) -> KnnScorer:
    parts = parts_compute(settings.compute)  # one graph per frame on an ONNX runtime
    features = checkpoint_features(directory, config, device, parts.backend, parts.precision)
    mean, std = load_feature_stats(directory, config)
    bank = ckpt.load_tensors(directory, "bank").get("vectors")
    if bank is None or bank.ndim != 2 or bank.shape[1] != config["features"]["channels"] or not len(bank):
        raise ckpt.CheckpointError(f"{Path(directory) / 'bank.safetensors'}: expected 'vectors' of shape "
                                   f"(N, {config['features']['channels']})")
    return KnnScorer(bank.float(), mean, std, config["scores"]["pixel"], settings, device, features)


def cell_keys(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random key in [0, 1) per cell, a function of its origin row (frame, flipped, y,
    x) and the seed only (splitmix64 over the fields): the bank is the cells with the smallest
    keys, the same subset however the frames are split between processes or ordered."""
    def mix(z):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = mix(np.full(len(rows), seed, np.uint64))
        for column in rows.numpy().astype(np.uint64).T:
            key = mix(key ^ column)
    return torch.from_numpy((key >> np.uint64(11)).astype(np.float64) / 2.0 ** 53)


def _cells(z: torch.Tensor, weights: torch.Tensor, origin: torch.Tensor):
    """(vectors, origin rows (frame, flipped, y, x)) of the ID cells of a batch of features."""
    n, c, h, w = z.shape
    cell = torch.arange(h * w).repeat(n)
    rows = torch.stack([origin[:, 0].repeat_interleave(h * w), origin[:, 1].repeat_interleave(h * w),
                        cell // w, cell % w], 1)
    keep = weights.reshape(-1).bool()
    return z.permute(0, 2, 3, 1).reshape(-1, c)[keep], rows[keep]


def sample_bank(batches, max_size: int, seed: int, acc=None) -> dict:
    """Bank vectors: a seeded sample of at most max_size ID cells of every batch (standardised
    features, weights, origin rows (frame, flipped)), without replacement, with their origin
    rows (frame, flipped, y, x) and how many ID cells there were. Streaming and distributed:
    each process keeps the cells with the smallest `cell_keys` of its batches, then the
    processes' candidates are merged the same way, so the bank holds the same cells in the same
    order as one process's (equal `origin` rows: the choice reads keys and weights, never
    feature values). Its vectors are those cells' features as this run computed them (see `fit`
    for how closely they match another process count's)."""
    kept, candidates = None, 0  # (keys, vectors, rows) of the smallest keys so far
    for z, weights, origin in batches:
        v, r = _cells(z, weights, origin)
        candidates += len(v)
        new = (cell_keys(r, seed), v, r)
        kept = new if kept is None else tuple(torch.cat(pair) for pair in zip(kept, new))
        kept = _smallest(*kept, max_size)
    if acc is not None and acc.num_processes > 1:  # a process may hold no ID cell: it adds none
        held = [k for k in gather_object([kept]) if k is not None]
        candidates = sum(gather_object([candidates]))
        kept = _smallest(*(torch.cat(t) for t in zip(*held)), max_size) if held else None
    if kept is None or not len(kept[1]):
        raise ValueError("no ID cells in the training frames (every cell holds an OOD pixel)")
    return {"vectors": kept[1].contiguous(), "origin": kept[2], "candidates": candidates}


def _smallest(keys, vectors, rows, k):
    order = torch.argsort(keys)[:k]
    return keys[order], vectors[order], rows[order]


def loo_moments(batches, bank: dict, acc=None) -> dict:
    """Mean and std of the leave-one-frame-out nearest distance of every ID cell of the batches
    (standardised features, weights, origin rows) to the bank: each cell against the bank
    without its own frame (and that frame's mirror image), what an unseen ID frame looks like.
    With a single frame in the bank, leave one cell out instead. Summed across processes."""
    bank_rows = bank["origin"]
    by_frame = len(bank_rows[:, 0].unique()) > 1

    def group(rows):  # a frame, or a single cell of it
        return rows[:, 0] if by_frame else ((rows[:, 0] * 2 + rows[:, 1]) * 100_000 + rows[:, 2]) * 100_000 + rows[:, 3]

    sums = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares
    for z, weights, origin in batches:
        v, r = _cells(z, weights, origin)
        if len(v):
            d, _ = nearest(v, bank["vectors"], group(r), group(bank_rows))
            d = d.double()
            sums += torch.stack([d.new_tensor(len(d)), d.sum(), d.square().sum()])
    mean, std = mean_std(*summed(sums, acc))
    return {"mean": float(mean), "std": max(float(std), 1e-6)}


def knn_config(size: tuple[int, int], channels: int, bank: dict, loo: dict, seed: int) -> dict:
    return {"family": FAMILY, "image_size": list(size), "features": features_config(size, channels),
            "scores": {"pixel": loo},
            "bank": {"size": len(bank["vectors"]), "candidates": bank["candidates"], "max_size": MAX_BANK,
                     "seed": seed, "sampling": "smallest cell keys"}}


def fit(train_frames: list[Frame], out: Path, opts, progress: bool = True, acc=None) -> tuple[dict, dict]:
    """knn family: features of every training frame and its mirror image (feature_space.
    FeatureSource: in memory when they fit, else encoded batch by batch), their per-channel
    statistics, a bank of ID cells and its leave-one-frame-out distances: three passes, each
    process over its shard, combined so that the result does not depend on the split:

    * exactly: the bank's cells and their order (`origin`), its size and candidate count;
    * to float rounding: the bank vectors and the channel statistics within 1e-4 (absolute and
      relative; measured up to 3e-6), the leave-one-out moments within 1e-4 relative (measured
      1e-8). Each frame is encoded alone, so batching does not change its features, but how a
      convolution adds up depends on the CPU's kernels and on the number of intra-op threads
      (oneDNN's AVX2 1x1 convolution splits its input channels between threads; `accelerate
      launch` gives each process one thread unless told otherwise, one process has one per
      core), and sums over the processes' shards round in another order than one process's.
      (test/test_distributed_training.py. They came out bit for bit equal on an AVX2 AMD CPU
      with one thread in both runs, and on the AVX-512 Intel development machine even with two
      threads in one: neither is promised.)"""
    acc = acc or make_accelerator(opts, out)
    size = input_size(opts)
    source = FeatureSource(train_frames, size, shared_features(device=acc.device), opts, acc, progress)
    moments = ChannelMoments()
    for feats, weights, _ in source.passes():
        moments.add(feats, weights)
    mean, std = moments.result(acc)

    def standardised():
        for feats, weights, origin in source.passes():
            yield standardise(feats, mean, std), weights, origin

    bank = sample_bank(standardised(), MAX_BANK, opts.seed, acc)
    loo = loo_moments(standardised(), bank, acc)
    config = knn_config(size, source.channels, bank, loo, opts.seed)
    config["training"] = {"features_in_memory": source.cached}
    if acc.is_main_process:
        log.info("knn bank: %d of %d ID cells; leave-one-frame-out distance %.3f +- %.3f", len(bank["vectors"]),
                 bank["candidates"], loo["mean"], loo["std"])
    return config, {"bank": {"vectors": bank["vectors"], "origin": bank["origin"]},
                    "features": {"mean": mean, "std": std}}
