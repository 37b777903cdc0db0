"""Analysis step of the editing pipeline: input vs edited frame -> anomaly map.

Per location, 1 - cosine similarity between backbone features of the two frames, at
several strides, each upsampled to the analysis resolution and averaged; optionally
averaged inside image segments. Both frames are compared at the model's resolution
(upsampled alike), so resizing blur is not mistaken for an edit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .networks.backbone import FeatureExtractor


class FeatureDistance:
    def __init__(self, features: FeatureExtractor, size: tuple[int, int]):
        self.features, self.size = features, tuple(size)

    @torch.no_grad()
    def __call__(self, input01: torch.Tensor, edited01: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) pair in [0, 1] -> (B, H, W) map in [0, 2] at the analysis size (0: the
        same features; 1: orthogonal ones). Unclamped, so its ID statistics can be measured
        (the pixel family maps it with them); callers without those clamp to [0, 1]."""
        both = torch.cat([input01, edited01]).float()
        both = F.interpolate(both, size=self.size, mode="bilinear", align_corners=False)
        maps = self.features(both)
        b = input01.shape[0]
        total = torch.zeros(b, 1, *self.size, device=both.device)
        for f in maps.values():
            d = 1 - F.cosine_similarity(f[:b], f[b:], dim=1, eps=1e-6)
            total += F.interpolate(d.unsqueeze(1), size=self.size, mode="bilinear", align_corners=False)
        return (total / len(maps)).squeeze(1).clamp(min=0)  # rounding puts identical features a hair below 0


def frame_score(score: np.ndarray, top_fraction: float = 0.005, min_pixels: int = 100) -> float:
    """Frame-level OOD score: mean of the highest scores over an object-sized area.

    The area is at least `min_pixels`, the notes' definition of an OOD frame, so one
    hot pixel does not raise the flag but a small object does.
    """
    flat = score.ravel()
    k = min(flat.size, max(min_pixels, int(top_fraction * flat.size)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())

