"""Lazy training data: frames read, decoded and resized one at a time, in DataLoader workers.

Loading every frame up front holds a whole training set in memory, which a long recording
(or a large image folder) does not fit into. Here nothing
holds more than the frame handles (names and paths, or bag message addresses); a sample is
read when the loader asks for it, in its worker process when the loader has workers, so
decoding runs beside training.

* `FrameDataset(frames, size, weight_grid=None)`: a torch Dataset over frame-likes (anything
  with `.name`, `.rgb()` -> uint8 (H, W, 3) and `.label()` -> uint8 (H, W) or None:
  `core.data.Frame`, `ros.bag.BagFrame`). Item i is a `FrameSample`: `image` uint8 (3, H, W),
  `weight` float32 (1, H, W) with 0 on OOD pixels, `index` i (INTER_AREA for the image,
  INTER_NEAREST for the label, as the Detector resizes; at the frame's own size when `size` is
  None). With `weight_grid` (h, w) the weight is per cell of that grid instead (`cell_weights`,
  the feature families' loss weights): 0 for a cell that any full-resolution OOD pixel falls
  into. All ones when the frame is unlabelled. A frame that cannot be read
  or decoded (or has the wrong shape) gives None, logged at WARNING once per frame and
  process with its name and the reason; it never raises.
* `collate_frames(samples) -> FrameBatch`: `images` float32 (B, 3, H, W) in [0, 1], `weights`
  (B, 1, H, W), `indices` int64 (B,), `skipped`: how many None samples were dropped. B may be 0
  (images then (0, 3, 0, 0)): count `skipped` and draw again. The count is part of the batch,
  so it reaches the main process from worker processes as well.
* `frame_loader(dataset, batch_size, *, seed, workers=0, shuffle=True, drop_last=True,
  infinite=False)`: a DataLoader with `collate_frames` and a seeded generator; `infinite=True`
  draws indices uniformly with replacement forever (`InfiniteSampler`, seeded), for training
  by steps rather than epochs (shuffle and drop_last do not apply then).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import OOD

log = logging.getLogger(__name__)


class FrameLike(Protocol):
    name: str

    def rgb(self) -> np.ndarray: ...

    def label(self) -> np.ndarray | None: ...


class FrameSample(NamedTuple):
    image: torch.Tensor  # uint8 (3, H, W)
    weight: torch.Tensor  # float32 (1, H, W) (or (1, h, w) of weight_grid): 0 on OOD pixels / cells, 1 elsewhere
    index: int


class FrameBatch(NamedTuple):
    images: torch.Tensor  # float32 (B, 3, H, W) in [0, 1]
    weights: torch.Tensor  # float32 (B, 1, H, W), or (B, 1, h, w) of the weight grid
    indices: torch.Tensor  # int64 (B,)
    skipped: int  # samples of this batch that could not be decoded (dropped)


def _hw(value: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or min(int(value[0]), int(value[1])) < 1:
        raise ValueError(f"{what} must be (H, W) with H, W >= 1 or None, got {value!r}")
    return int(value[0]), int(value[1])


class FrameDataset(Dataset):
    """Frames decoded on access; see the module docstring."""

    def __init__(self, frames: Sequence[FrameLike], size: tuple[int, int] | None,
                 weight_grid: tuple[int, int] | None = None):
        self.frames = frames
        self.size = _hw(size, "size")
        self.weight_grid = _hw(weight_grid, "weight_grid")
        self._warned: set[int] = set()  # per process: each DataLoader worker has its own copy

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> FrameSample | None:
        index = int(index)
        frame = self.frames[index]  # an index out of range raises IndexError, as a Dataset should
        try:
            return self._sample(frame, index)
        except Exception as err:  # any failure of one frame (I/O, decoding, shape) skips it
            if index not in self._warned:
                self._warned.add(index)
                log.warning("skipping frame %d (%s): %s: %s", index, getattr(frame, "name", "?"),
                            type(err).__name__, err)
            return None

    def _sample(self, frame: FrameLike, index: int) -> FrameSample:
        rgb = frame.rgb()
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.shape[0] > 0 and rgb.shape[1] > 0):
            raise ValueError(f"image is not uint8 (H, W, 3): {getattr(rgb, 'dtype', type(rgb))} "
                             f"{getattr(rgb, 'shape', '')}")
        label = frame.label()
        if label is not None and np.shape(label) != rgb.shape[:2]:
            raise ValueError(f"label shape {np.shape(label)} does not match the image's {rgb.shape[:2]}")
        h, w = self.size or rgb.shape[:2]
        # INTER_AREA for the image (as the Detector), INTER_NEAREST for the label (classes stay classes)
        image = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if self.size else rgb
        if self.weight_grid is not None:
            weight = cell_weights(label, self.weight_grid)[0, 0].numpy()
        elif label is None:
            weight = np.ones((h, w), np.float32)
        else:
            small = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST) if self.size else label
            weight = (small != OOD).astype(np.float32)
        # torch.tensor copies: contiguous (3, H, W), never a view of a read-only decode buffer
        return FrameSample(torch.tensor(image.transpose(2, 0, 1)), torch.from_numpy(weight)[None], index)


def cell_weights(label: np.ndarray | None, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) loss weights on a feature grid: 0 for a cell that any OOD pixel falls into."""
    gh, gw = grid
    if label is None:
        return torch.ones(1, 1, gh, gw)
    # INTER_AREA averages the full-resolution pixels covering each cell: > 0 iff one is OOD.
    coverage = cv2.resize((label == OOD).astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((coverage <= 0).astype(np.float32))[None, None]


def collate_frames(samples: Sequence[FrameSample | None]) -> FrameBatch:
    """Stack the decoded samples; None (undecodable) ones are dropped and counted in `skipped`."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return FrameBatch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 1, 0, 0), torch.zeros(0, dtype=torch.int64),
                          skipped)
    shapes = {tuple(s.image.shape) for s in good}
    if len(shapes) > 1:
        raise ValueError(f"frames of different sizes in one batch {sorted(shapes)}; give FrameDataset a size")
    images = torch.stack([s.image for s in good]).float() / 255.0
    return FrameBatch(images, torch.stack([s.weight for s in good]),
                      torch.tensor([s.index for s in good], dtype=torch.int64), skipped)


class InfiniteSampler(Sampler[int]):
    """Indices in [0, n) drawn uniformly with replacement, without end; each iteration starts
    the same sequence for the same seed."""

    def __init__(self, n: int, seed: int, chunk: int = 1024):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.chunk = int(n), int(seed), int(chunk)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randint(self.n, (self.chunk,), generator=gen).tolist()


def frame_loader(dataset: Dataset, batch_size: int, *, seed: int, workers: int = 0, shuffle: bool = True,
                 drop_last: bool = True, infinite: bool = False) -> DataLoader:
    """A DataLoader of `FrameBatch`es over `dataset` (a FrameDataset), seeded; see the module docstring."""
    gen = torch.Generator().manual_seed(int(seed))
    sampler = InfiniteSampler(len(dataset), seed) if infinite else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and not infinite, sampler=sampler,
                      drop_last=drop_last and not infinite, num_workers=workers, collate_fn=collate_frames,
                      generator=gen)
    # (no worker_init_fn calling cv2.setNumThreads: in a forked worker whose parent had used
    # OpenCV's thread pool, that call deadlocks tearing down the pool; cv2 itself works there)
