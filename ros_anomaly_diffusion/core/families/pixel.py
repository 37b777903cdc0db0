"""The pixel family (variants ddpm and ddim): a UNet on the frames themselves, edited
towards the ID model by guided DDPM or DDIM, scored by the feature change.

Checkpoint: config.json {"family": "pixel", "image_size", "denoiser": {"kind": "unet",
"config"}, "schedule"} and denoiser.safetensors.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import checkpoint as ckpt
from ..analysis import FeatureDistance
from ..data import Frame
from ..networks.backbone import FeatureExtractor
from ..networks.denoisers import build_denoiser, unet_config
from ..networks.quantization import load_denoiser
from ..samplers import GuidedDDPM, NoiseSchedule, ScheduleConfig, edit_and_reconstruction
from ..scorer import ScoreOutput
from ..settings import Settings
from .fitting import DenoiserTrainer, FrameStream, TrainOptions, augment, make_accelerator

log = logging.getLogger(__name__)

FAMILY = "pixel"
RUNS_ON_TENSORRT = True  # backend tensorrt: its UNet denoiser compiles with torch-tensorrt


class EditingScorer:
    """Analysis by synthesis: edit the frame towards the ID model, measure the change.

    The change is measured against the frame itself or, with reconstruction_guidance w_r > 0,
    against the model's own reconstruction of the frame: the same guided DDIM run (seed,
    start, steps) with the strong guidance w_r, which keeps everything, objects included,
    but renders it as the model does. Whatever the model cannot reproduce (texture, blur of
    a small CPU model) then differs in neither and only what the weak-guidance edit painted
    over remains."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, settings: Settings, sampler: str,
                 device: torch.device):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        self.net, self.schedule = net, schedule  # the denoiser as loaded (quantized or not)
        self.distance = FeatureDistance(FeatureExtractor().to(device),
                                        (settings.analysis_height, settings.analysis_width))
        self.ddpm = GuidedDDPM(net, schedule) if sampler == "ddpm" else None
        self.apply(settings)

    def apply(self, s: Settings) -> None:
        """Take new live settings (sampler parameters) for the next frame."""
        ddim, self.reconstructor = edit_and_reconstruction(self.net, self.schedule, s.steps, s.start_timestep,
                                                           s.guidance_scale, s.reconstruction_guidance)
        if self.ddpm is not None:
            self.ddpm.guidance_scale = s.ddpm_guidance_scale
        self.editor = ddim if self.ddpm is None else self.ddpm
        self.settings = s

    @property
    def nfe(self) -> int:
        return self.editor.nfe + (0 if self.reconstructor is None else self.reconstructor.nfe)

    def edit(self, batch01: torch.Tensor) -> torch.Tensor:
        return (self.editor.edit(batch01 * 2 - 1, seed=self.settings.seed) + 1) / 2

    def reference(self, batch01: torch.Tensor) -> torch.Tensor:
        """What the edit is compared with: the frame, or the model's reconstruction of it."""
        if self.reconstructor is None:
            return batch01
        return (self.reconstructor.edit(batch01 * 2 - 1, seed=self.settings.seed) + 1) / 2

    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        edited = self.edit(batch01)
        return ScoreOutput(self.distance(self.reference(batch01), edited), edited)


def load_pixel_denoiser(directory: Path, config: dict, device: torch.device, settings: Settings | None = None):
    """(denoiser, schedule); quantized as the checkpoint was written or as settings.quantization asks."""
    net = load_denoiser(directory, config, device, settings)
    return net, NoiseSchedule(ScheduleConfig(**config["schedule"]))


def build(directory: Path, config: dict, settings: Settings, device: torch.device,
          sampler: str = "ddim") -> EditingScorer:
    """The scorer of the variant that edits with `sampler` (ddpm or ddim)."""
    net, schedule = load_pixel_denoiser(directory, config, device, settings)  # on settings.backend
    return EditingScorer(net, schedule, settings, sampler, device)


def pixel_config(opts: TrainOptions) -> dict:
    return {"family": FAMILY, "image_size": list(opts.image_size),
            "denoiser": {"kind": "unet", "config": unet_config("pixel", opts.preset, 3, opts.image_size)},
            "schedule": opts.schedule.to_dict()}


def init_checkpoint(directory: str | Path, *, preset: str = "tiny", image_size: tuple[int, int] | None = None,
                    seed: int = 0, calibration: dict | None = None) -> Path:
    """An untrained pixel-family checkpoint (tests, smoke runs), 32x40 unless image_size is given."""
    torch.manual_seed(seed)
    config = pixel_config(TrainOptions(preset=preset, image_size=tuple(image_size or (32, 40))))
    if calibration:
        config["calibration"] = calibration
    net = build_denoiser("unet", config["denoiser"]["config"])
    return ckpt.save(directory, config, {"denoiser": net.state_dict()})


def fit(train_frames: list[Frame], out: Path, opts: TrainOptions, progress: bool,
        acc: Accelerator | None = None) -> tuple[dict, dict]:
    """Pixel family (ddpm, ddim): the UNet on augmented frames streamed from disk, OOD pixels
    masked out."""
    acc = acc or make_accelerator(opts, out)
    config = pixel_config(opts)
    net = build_denoiser("unet", config["denoiser"]["config"])
    trainer = DenoiserTrainer(net, NoiseSchedule(opts.schedule), opts, out, acc)
    trainer.load_state()
    frames = FrameStream(train_frames, opts.image_size, opts, acc, seed=opts.seed + trainer.step)

    def sample_batch(gen):
        batch = frames.next()
        xb, wb = augment(batch.images, batch.weights, gen)
        return xb * 2 - 1, wb

    trainer.fit(sample_batch, opts.steps, progress)
    config["training"] = {"steps": trainer.step, "skipped_frames": frames.skipped}
    return config, {"denoiser": trainer.ema_state()}
