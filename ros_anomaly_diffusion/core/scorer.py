"""What every variant family's scorer returns (below the families and the registry, so
that they all import it without importing each other)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreOutput:
    maps: torch.Tensor  # (B, H, W) in [0, 1] at the analysis size
    edited01: torch.Tensor | None  # (B, 3, h, w) in [0, 1], editing variants only
    # (B,) in [0, 1]: the variant's own frame score (inversion); None: the Detector's top-k mean of the map
    frame_scores: torch.Tensor | None = None
