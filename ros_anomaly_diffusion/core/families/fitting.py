"""What every family's `fit` shares: the training options, frame loading and
augmentation, and `DenoiserTrainer` (masked denoising loss, EMA of the weights,
resumable state). Below the family modules; `training.train` orchestrates above them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..data import OOD, Frame
from ..samplers import NoiseSchedule, ScheduleConfig

log = logging.getLogger(__name__)
STATE = "train_state"


@dataclass
class TrainOptions:
    variant: str = "ddim"
    image_size: tuple[int, int] = (64, 80)  # (H, W) the model sees; the reference used 176x216
    preset: str = "small"
    steps: int = 3000
    batch_size: int = 8
    lr: float = 3e-4
    ema_decay: float = 0.995
    seed: int = 0
    frames: str = "all"  # all | id (frames with OOD objects left out entirely)
    scenes: str = "all"  # all | train | val | test (RUGD scene split)
    calib_fraction: float = 0.2  # ID frames held out for threshold calibration
    mask_fpr: float = 0.01  # pixel false-positive rate on ID calibration pixels
    frame_fpr: float = 0.05  # false-alarm rate of the OOD flag on ID calibration frames
    save_every: int = 500
    device: str = "cpu"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # latent family: "taef2" (the shipped pretrained TAEF2), a local diffusers AutoencoderDC
    # folder, or "trained" (also ""): a compact DC-AE trained on the frames
    autoencoder: str = "taef2"


def load_frames(frames: list[Frame], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames at `size` as (N, 3, H, W) in [0, 1] and loss weights (N, 1, H, W): 0 on OOD pixels."""
    h, w = size
    images, weights = [], []
    for f in tqdm(frames, desc="loading frames", leave=False):
        images.append(cv2.resize(f.rgb(), (w, h), interpolation=cv2.INTER_AREA))
        label = f.label()
        weights.append(np.ones((h, w), np.float32) if label is None else
                       (cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST) != OOD).astype(np.float32))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(weights)).unsqueeze(1)


def augment(x: torch.Tensor, wgt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip, a random crop of 85-100 % resized back, brightness +-10 %."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x, wgt = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(
        flip[:, None, None, None], wgt.flip(-1), wgt)
    scale = float(0.85 + 0.15 * torch.rand(1, generator=gen))
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    x = F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)
    wgt = F.interpolate(wgt[..., top:top + ch, left:left + cw], size=(h, w), mode="nearest")
    x = (x * (0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=gen))).clamp(0, 1)
    return x, wgt


class DenoiserTrainer:
    """Masked denoising loss on samples in [-1, 1]; any family's denoiser and data."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, opts: TrainOptions, out: Path):
        self.net, self.schedule, self.opts, self.out = net, schedule, opts, out
        self.device = torch.device(opts.device)
        self.net.to(self.device).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=opts.lr)
        self.ema = EMAModel(self.net.parameters(), decay=opts.ema_decay)
        self.step = 0

    def loss(self, x0: torch.Tensor, wgt: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=gen).to(self.device)
        x0, wgt = x0.to(self.device), wgt.to(self.device)
        pred = self.net(self.schedule.add_noise(x0, noise, t), t)
        err = (pred - self.schedule.training_target(x0, noise, t)) ** 2
        return (err * wgt).sum() / (wgt.sum() * x0.shape[1]).clamp_min(1.0)

    def fit(self, sample_batch, total_steps: int, progress: bool = True) -> None:
        gen = torch.Generator().manual_seed(self.opts.seed + self.step)
        bar = tqdm(total=total_steps, initial=self.step, desc="training", disable=not progress)
        while self.step < total_steps:
            x0, wgt = sample_batch(gen)
            loss = self.loss(x0, wgt, gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            self.ema.step(self.net.parameters())
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % self.opts.save_every == 0 or self.step == total_steps:
                self.save_state()
        bar.close()

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The network's state dict with the EMA weights in place of the raw ones."""
        self.ema.store(self.net.parameters())
        self.ema.copy_to(self.net.parameters())
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.ema.restore(self.net.parameters())
        return state

    # Resumable state: raw and EMA weights, Adam moments, step; all safetensors + JSON.
    def save_state(self) -> None:
        opt_state = self.opt.state_dict()
        moments = {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
        ckpt.save(self.out / STATE, {"step": self.step, "options": jsonable(asdict(self.opts))},
                  {"model": self.net.state_dict(), "ema": self.ema_state(), "optimizer": moments})

    def load_state(self) -> bool:
        if not (self.out / STATE / ckpt.CONFIG).is_file():
            return False
        config = ckpt.load_config(self.out / STATE)
        self.step = int(config["step"])
        ckpt.load_into(self.net, self.out / STATE, "ema")
        self.ema = EMAModel(self.net.parameters(), decay=self.opts.ema_decay)
        # The EMA's decay warms up with its step count (decay 0 at its first step): restarted at
        # 0, the first resumed step would replace the saved EMA with the raw weights.
        self.ema.optimization_step = self.step
        ckpt.load_into(self.net, self.out / STATE, "model")
        moments = ckpt.load_tensors(self.out / STATE, "optimizer")
        opt_state = self.opt.state_dict()
        for key, value in moments.items():
            i, name = key.split(".", 1)
            opt_state["state"].setdefault(int(i), {})[name] = value
        self.opt.load_state_dict(opt_state)
        log.info("resumed %s at step %d", self.out / STATE, self.step)
        return True


def jsonable(d: dict) -> dict:
    """`d` with dataclasses and tuples turned into plain JSON types."""
    return json.loads(json.dumps(d, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else list(o)))
