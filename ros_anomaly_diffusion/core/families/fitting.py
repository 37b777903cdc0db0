"""What every family's `fit` shares: the training options, the `accelerate` set-up, the
frames streamed from disk, augmentation, and `DenoiserTrainer` (masked denoising loss,
EMA of the weights, resumable state). Below the family modules; `training.train`
orchestrates above them.

Training runs under Hugging Face `accelerate` (`make_accelerator`): the same code is one
process on a CPU or GPU (`ros-anomaly-diffusion train`) or several (`accelerate launch -m
ros_anomaly_diffusion train ...`: DDP, gradients averaged across processes). Every process
reads its own shard of the frames (`shard`), decoded lazily by DataLoader workers
(`FrameStream`, core/datasets.py), so no process holds the whole set in memory; `opts.steps`
counts optimizer steps, each of `batch_size` frames per process times `grad_accum`
micro-batches. Only the main process writes files.

What a statistic (`summed`, `gathered`) covers does not depend on the process count; its
value may, within float rounding: the processes' partial sums are added in another order than
one process adds its batches, and each process computes with its own thread count (one under
`accelerate launch` unless told otherwise), which changes how the CPU's convolution kernels
add up. knn.fit states the tolerances that are tested.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..datasets import FrameBatch, FrameDataset, frame_loader
from ..networks.denoisers import KINDS
from ..samplers import NoiseSchedule, ScheduleConfig
from ..settings import VARIANT_NAMES, check_value

log = logging.getLogger(__name__)
STATE = "train_state"


def _opt(default, help: str, *, lo=None, hi=None, choices=None, metavar=None, factory=None):
    """A TrainOptions field: its default, the help the `train` command shows, its range (lo <= v
    <= hi) or choices, checked when the options are made."""
    meta = dict(help=help, lo=lo, hi=hi, choices=choices, metavar=metavar)
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class TrainOptions:
    """How `train` fits a family and calibrates it. Each field is a `train` option of the same
    name (cli.py generates the parser from these fields); None and empty mean "the family's
    default"."""
    variant: str = _opt("knn", "the variant whose family is trained and calibrated; knn is the shipped "
                               "model's", choices=VARIANT_NAMES)
    image_size: tuple[int, int] | None = _opt(
        None, "the size H W the model sees; default: the family's (pixel 128x160, latent and feature families "
              "256x320; 64x80 for the scene-level unet and dit; the reference used 176x216)", metavar=("H", "W"))
    preset: str = _opt("small", "network width", choices=("tiny", "small", "medium", "reference"))
    denoiser: str = _opt("", "the denoiser's design (networks/denoisers.py): cell (an MLP per location) or local "
                             "(3x3 blocks, bounded receptive field), the editing families' defaults; unet or dit "
                             "(scene-level, for thousands of frames and a GPU); empty: the family's default",
                         choices=("", *KINDS))
    receptive_field: int = _opt(0, "local denoiser: the side in cells (pixels, latent cells) of the window each "
                                   "output sees; 0: the family's default", lo=0)
    steps: int = _opt(3000, "optimizer steps", lo=1)
    batch_size: int = _opt(8, "frames (or crops) per micro-batch and process", lo=1)
    lr: float = _opt(3e-4, "Adam learning rate", lo=0.0)
    ema_decay: float = _opt(0.995, "decay of the weights' exponential moving average (the checkpoint's weights)",
                            lo=0.0, hi=1.0)
    seed: int = _opt(0, "seed of the weights, batches, augmentation and calibration split", lo=0)
    frames: str = _opt("all", "which labelled frames to train on: all (OOD pixels masked out of the loss), id "
                              "(frames with OOD objects left out) or ood", choices=("all", "id", "ood"))
    scenes: str = _opt("all", "RUGD reference scene split", choices=("all", "train", "val", "test"))
    calib_fraction: float = _opt(0.2, "share of the ID frames held out for threshold calibration", lo=0.0, hi=0.9)
    mask_fpr: float = _opt(0.01, "pixel false-positive rate of the mask threshold on ID calibration pixels",
                           lo=1e-6, hi=0.5)
    frame_fpr: float = _opt(0.05, "false-alarm rate of the OOD flag on ID calibration frames", lo=1e-6, hi=0.5)
    save_every: int = _opt(500, "steps between saves of the resumable OUT/train_state/", lo=1)
    device: str = _opt("cpu", "torch device: cpu, cuda or cuda:N")
    schedule: ScheduleConfig = _opt(None, "noise schedule, KEY=VALUE of samplers.ScheduleConfig "
                                          "(num_train_timesteps, beta_schedule, beta_start, beta_end, "
                                          "prediction_type), repeatable", metavar="KEY=VALUE",
                                    factory=ScheduleConfig)
    autoencoder: str = _opt("taef2", "latent variants: taef2 (the pretrained TAEF2 shipped with the package), "
                                     "trained (a compact DC-AE trained on the frames) or PATH, a local diffusers "
                                     "AutoencoderDC folder (config.json + .safetensors)", metavar="taef2|trained|PATH")
    mixed_precision: str = _opt("no", "autocast precision of the forward passes (weights stay fp32); bf16 on CPUs "
                                      "with bf16 units", choices=("no", "bf16", "fp16"))
    grad_accum: int = _opt(1, "micro-batches per optimizer step", lo=1)
    grad_clip: float = _opt(1.0, "gradient-norm clip", lo=0.0)
    workers: int = _opt(0, "DataLoader processes decoding frames (0: in the trainer)", lo=0)
    log_every: int = _opt(50, "log loss and learning rate every N steps (main process)", lo=1)
    log_with: str = _opt("", "also log to TensorBoard under OUT/logs (pip install tensorboard)",
                         choices=("", "tensorboard"))
    feature_cache_mb: int = _opt(1024, "keep what the training set needs in memory up to this size (MB): the "
                                       "backbone features (feature families), the latents or the decoded frames "
                                       "(local priors); larger sets and 0 stream from disk", lo=0)

    def __post_init__(self):
        for f in fields(self):
            if f.name not in ("image_size", "schedule"):
                meta = f.metadata
                reason = check_value(f.name, getattr(self, f.name), f.default, meta["lo"], meta["hi"], meta["choices"])
                if reason:
                    raise ValueError(reason)
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)
            if len(self.image_size) != 2 or min(self.image_size) < 16:
                raise ValueError(f"image_size must be H W of at least 16 pixels each, got {self.image_size}")


def make_accelerator(opts: TrainOptions, out: Path | None = None) -> Accelerator:
    """The Accelerator of one training run. accelerate keeps mixed precision and gradient
    accumulation in per-process singletons; a run in a process that already trained (tests,
    `bench --train` fitting several families) starts from a clean state rather than inheriting
    the previous run's (accelerate refuses a second mixed-precision setting otherwise)."""
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    trackers = {}
    if opts.log_with:
        if opts.log_with != "tensorboard":
            raise ValueError(f"log_with must be '' or 'tensorboard', got {opts.log_with!r}")
        try:
            import tensorboard  # noqa: F401  (accelerate's tracker needs it)
        except ImportError:
            raise ValueError("log_with=tensorboard needs the tensorboard package: pip install tensorboard") from None
        trackers = {"log_with": "tensorboard", "project_dir": str(Path(out or ".") / "logs")}
    return Accelerator(cpu=torch.device(opts.device).type == "cpu", mixed_precision=opts.mixed_precision,
                       gradient_accumulation_steps=opts.grad_accum, **trackers)


def shard(n: int, acc: Accelerator) -> list[int]:
    """Indices of the n frames this process reads: every num_processes-th, from its rank (none
    when there are fewer frames than processes)."""
    return list(range(acc.process_index, n, acc.num_processes))


class FrameStream:
    """Endless batches of this process's shard of `frames` at `size` (FrameBatch: images in
    [0, 1], per-pixel weights 0 on OOD pixels), drawn at random with replacement and decoded
    lazily in opts.workers DataLoader workers. Frames that fail to decode are skipped and
    counted (`skipped`: draws that hit one); a shard where nothing decodes is an error."""

    def __init__(self, frames: Sequence, size: tuple[int, int] | None, opts: TrainOptions, acc: Accelerator,
                 seed: int, weight_grid: tuple[int, int] | None = None):
        self.indices = shard(len(frames), acc)
        if not self.indices:
            raise ValueError(f"{len(frames)} frames for {acc.num_processes} processes: process "
                             f"{acc.process_index} has none")
        dataset = FrameDataset([frames[i] for i in self.indices], size, weight_grid=weight_grid)
        self.loader = frame_loader(dataset, opts.batch_size, seed=seed + 1009 * acc.process_index,
                                   workers=opts.workers, infinite=True)
        self._batches = iter(self.loader)
        self.skipped = 0

    def next(self) -> FrameBatch:
        for _ in range(1000):
            batch = next(self._batches)
            self.skipped += batch.skipped
            if len(batch.indices):
                return batch
        raise ValueError(f"none of the {len(self.indices)} frames of this process could be decoded")


def frame_passes(frames: Sequence, size: tuple[int, int] | None, acc: Accelerator, batch_size: int = 8,
                 workers: int = 0, subset: Sequence[int] | None = None, weight_grid: tuple[int, int] | None = None):
    """One pass, in order, over this process's shard of `frames` (or of the frames at positions
    `subset`): FrameBatch-es whose `indices` are positions in `frames`; undecodable frames
    skipped. For statistics and feature banks, which add up over the processes."""
    positions = list(range(len(frames))) if subset is None else list(subset)
    mine = [positions[i] for i in shard(len(positions), acc)]  # may be empty: adds nothing
    dataset = FrameDataset([frames[i] for i in mine], size, weight_grid=weight_grid)
    for batch in frame_loader(dataset, batch_size, seed=0, workers=workers, shuffle=False, drop_last=False):
        if len(batch.indices):
            yield batch._replace(indices=torch.as_tensor([mine[int(i)] for i in batch.indices]))


def summed(t: torch.Tensor, acc: Accelerator | None = None) -> torch.Tensor:
    """`t` added up over every process of the run (`t` itself with one process): the same sum
    as one process's up to the rounding of adding the partial sums in another order."""
    if acc is None or acc.num_processes == 1:
        return t
    return acc.reduce(t.to(acc.device), "sum").to(t.device)


def mean_std(count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation (ddof 1), elementwise, from a count, a sum and a sum of
    squares (float64): what statistics added up batch by batch and across processes end as.
    Both 0 for a count of 0; std 0 for a count of 1."""
    n = count.clamp_min(1)
    mean = total / n
    return mean, ((total_sq - n * mean.square()).clamp_min(0) / (count - 1).clamp_min(1)).sqrt()


def gathered(parts: list[torch.Tensor], acc: Accelerator | None = None) -> torch.Tensor:
    """The tensors of this process concatenated, then those of every process (rank order):
    the values behind a statistic that is not a plain sum (moments of z-scored sums, ...)."""
    mine = torch.cat(parts) if parts else torch.zeros(0)
    if acc is None or acc.num_processes == 1:
        return mine
    return torch.cat(gather_object([mine]))


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


def random_crop(x: torch.Tensor, wgt: torch.Tensor, size: int, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random size x size window (the same for the batch) of samples and weights: what a
    bounded-receptive-field denoiser trains on (it runs unchanged on whole frames)."""
    h, w = x.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    return x[..., top:top + ch, left:left + cw], wgt[..., top:top + ch, left:left + cw]


class DenoiserTrainer:
    """Masked denoising loss on samples in [-1, 1]; any family's denoiser and data, under an
    Accelerator (one is made from opts when none is given)."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, opts: TrainOptions, out: Path,
                 acc: Accelerator | None = None):
        self.net, self.schedule, self.opts, self.out = net, schedule, opts, out
        self.acc = acc or make_accelerator(opts, out)
        self.device = self.acc.device
        self.net.to(self.device).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=opts.lr)
        self.ema = EMAModel(self.net.parameters(), decay=opts.ema_decay)
        self.step = 0

    def loss(self, x0: torch.Tensor, wgt: torch.Tensor, gen: torch.Generator, model=None) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=gen).to(self.device)
        x0, wgt = x0.to(self.device), wgt.to(self.device)
        pred = (model or self.net)(self.schedule.add_noise(x0, noise, t), t).float()  # autocast may give bf16
        err = (pred - self.schedule.training_target(x0, noise, t)) ** 2
        return (err * wgt).sum() / (wgt.sum() * x0.shape[1]).clamp_min(1.0)

    def fit(self, sample_batch, total_steps: int, progress: bool = True) -> None:
        """Train until optimizer step total_steps; sample_batch(generator) -> (x0, weights) of
        this process. Each process draws from its own generator (seed, rank, step)."""
        acc = self.acc
        model, opt = acc.prepare(self.net, self.opt)
        gen = torch.Generator().manual_seed(self.opts.seed + self.step + 1_000_003 * acc.process_index)
        bar = tqdm(total=total_steps, initial=self.step, desc="training",
                   disable=not (progress and acc.is_main_process))
        while self.step < total_steps:
            x0, wgt = sample_batch(gen)
            with acc.accumulate(model):
                loss = self.loss(x0, wgt, gen, model)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), self.opts.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue  # a micro-batch of an accumulated step
            self.ema.step(self.net.parameters())
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % self.opts.log_every == 0 or self.step == total_steps:
                self._log(float(acc.reduce(loss.detach(), "mean")))
            if self.step % self.opts.save_every == 0 or self.step == total_steps:
                if acc.is_main_process:
                    self.save_state()
                acc.wait_for_everyone()
        bar.close()

    def _log(self, loss: float) -> None:
        lr = self.opt.param_groups[0]["lr"]
        if self.acc.is_main_process:
            log.info("step %d: loss %.5f, lr %.2e", self.step, loss, lr)
        self.acc.log({"loss": loss, "lr": lr}, step=self.step)

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
