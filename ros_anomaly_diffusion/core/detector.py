"""Detector: the one entry point every caller uses (nodes, CLI, benchmark, tests).

frame (H, W, 3) uint8 RGB -> FrameResult: float score map at the input resolution, a
binary mask at the mask threshold, a frame-level score and the OOD flag.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch

from . import checkpoint as ckpt
from .analysis import frame_score
from .scorer import ScoreOutput
from .segments import aggregate, build_segmenter
from .settings import Settings, is_live
from .networks.backends import auto_backend
from .networks.quantization import weight_summary
from .variants import get_variant, resolve_variant

log = logging.getLogger(__name__)


@dataclass
class FrameResult:
    score: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # bool (H, W)
    frame_score: float
    is_ood: bool
    edited: np.ndarray | None = None  # uint8 RGB (H, W, 3), editing variants
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Over a stream (core/runtime.py; None from Detector.process alone): the temporally filtered
    # OOD flag and the mask of the score map's moving average (score_ema_alpha)
    ood_filtered: bool | None = None
    mask_smoothed: np.ndarray | None = None


def resolve_device(requested: str, fallback: bool) -> torch.device:
    """The torch device to run on; CUDA asked for but absent -> CPU (warning) or error."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        if not fallback:
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available "
                               "(set cuda_fallback: true to run on the CPU instead)")
        log.warning("device %r requested but CUDA is not available: running on the CPU", requested)
        return torch.device("cpu")
    try:
        return torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"invalid device {requested!r}: {err}") from err


def validate_frame(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB frame as uint8 array (H, W, 3), got {desc}")
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise ValueError(f"frame of {rgb.shape[1]}x{rgb.shape[0]} pixels is too small (minimum 8x8)")


class Detector:
    """`settings` as requested stay in `settings`; what they left open is decided once here:
    `variant` (empty: the one the checkpoint was trained for) and `backend` ("auto": the
    fastest this machine and the family have, backends.auto_backend)."""

    def __init__(self, checkpoint_dir: str | Path, settings: Settings | None = None):
        settings = settings or Settings.of(checkpoint=str(checkpoint_dir))
        settings.validate()
        self.directory = ckpt.resolve(checkpoint_dir)
        self.config = ckpt.load_config(self.directory)
        self.variant = get_variant(resolve_variant(settings.variant, self.config, str(self.directory / ckpt.CONFIG)))
        self.device = resolve_device(settings.compute.device, settings.compute.cuda_fallback)
        self.backend = settings.compute.backend
        if self.backend == "auto":
            self.backend = auto_backend(self.device, tensorrt=self.variant.module.RUNS_ON_TENSORRT)
            log.info("backend auto: %s on %s", self.backend, self.device)
        self.model_size = tuple(self.config["image_size"])
        if min(settings.post.mask_threshold, settings.post.frame_threshold) < 0 and \
                self.variant.name not in self.config.get("calibration", {}):
            log.warning("%s is not calibrated for variant %s: thresholds left unset fall back to 0.5 "
                        "(`ros-anomaly-diffusion calibrate --variant %s` sets them from ID frames)",
                        self.directory, self.variant.name, self.variant.name)
        # _resolved validates: what the variant refuses (quantization of knn, say) once it is known
        self.scorer = self.variant.build(self.directory, self.config, self._resolved(settings), self.device)
        self.segmenter = build_segmenter(settings.post.segments, settings.post.sam_checkpoint, settings.post.sam_model_type,
                                         str(self.device))
        self.settings = settings

    def _resolved(self, settings: Settings) -> Settings:
        """`settings` with the variant and backend this Detector runs (what the scorer sees)."""
        return settings.updated(variant=self.variant.name, backend=self.backend)

    # Thresholds: the explicit setting, or the value calibrated for this variant on ID
    # frames (`calibrate`); 0.5 for a checkpoint that was never calibrated.
    def _calibrated(self, name: str) -> float:
        return float(self.config.get("calibration", {}).get(self.variant.name, {}).get(name, 0.5))

    @property
    def mask_threshold(self) -> float:
        t = self.settings.post.mask_threshold
        return t if t >= 0 else self._calibrated("mask_threshold")

    @property
    def frame_threshold(self) -> float:
        t = self.settings.post.frame_threshold
        return t if t >= 0 else self._calibrated("frame_threshold")

    @property
    def nfe(self) -> int:
        return self.scorer.nfe

    @cached_property
    def weights(self) -> str:
        """Size and storage types of each trained network it runs ('denoiser 0.41 MB int8+float32'):
        fixed for the Detector's life (live settings do not touch the networks)."""
        return "; ".join(f"{role} {weight_summary(net)}" for role, net in self.scorer.networks().items()) \
            or "none (no trained network)"

    def update(self, **changes) -> list[str]:
        """Apply live settings now; returns the names that need a model reload instead."""
        new = self.settings.updated(**changes)
        reload = sorted(k for k in self.settings.differences(new) if not is_live(k))
        if not reload:
            self.settings = new
            self.scorer.configure(self._resolved(new))
        return reload

    def to_model(self, frames: list[np.ndarray]) -> torch.Tensor:
        h, w = self.model_size
        small = [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]
        batch = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 255.0
        return batch.to(self.device)

    @torch.no_grad()
    def process_batch(self, frames: list[np.ndarray]) -> list[FrameResult]:
        for f in frames:
            validate_frame(f)
        t0 = time.perf_counter()
        batch = self.to_model(frames)
        t_resized = time.perf_counter()
        out = self.scorer(batch)
        out.maps = out.maps.float().cpu()  # waits for the device: the network's time ends here
        t1 = time.perf_counter()
        results = self.post_process(frames, out)
        t2 = time.perf_counter()
        per = 1000.0 / len(frames)
        for r in results:
            r.timings_ms = {"resize": (t_resized - t0) * per, "network": (t1 - t_resized) * per,
                            "model": (t1 - t0) * per, "post": (t2 - t1) * per, "total": (t2 - t0) * per}
        return results

    def post_process(self, frames: list[np.ndarray], out: ScoreOutput) -> list[FrameResult]:
        """The scorer's output for `frames` -> their results (no timings): segments, the map at
        each frame's resolution, the mask, the frame score and the flag."""
        maps = out.maps.float().cpu().numpy()
        own = None if out.frame_scores is None else out.frame_scores.float().cpu().numpy()  # variant's frame score
        results = []
        ah, aw = maps.shape[1:]
        for i, frame in enumerate(frames):
            score = maps[i]
            if self.segmenter is not None:
                guide = cv2.resize(frame, (aw, ah), interpolation=cv2.INTER_AREA)
                score = aggregate(score, self.segmenter(guide))
            h, w = frame.shape[:2]
            score = np.clip(cv2.resize(score, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
            fs = frame_score(score) if own is None else float(own[i])
            edited = None
            if out.edited01 is not None:
                e = (out.edited01[i].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
                edited = cv2.resize(e, (w, h), interpolation=cv2.INTER_LINEAR)
            results.append(FrameResult(score.astype(np.float32), score > self.mask_threshold, fs,
                                       fs > self.frame_threshold, edited))
        return results

    def process(self, rgb: np.ndarray) -> FrameResult:
        return self.process_batch([rgb])[0]
