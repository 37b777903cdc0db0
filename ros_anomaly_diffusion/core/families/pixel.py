"""The pixel family (variants ddpm and ddim): a denoiser of the frames themselves, edited
towards the ID model by guided DDPM or DDIM (samplers.Editor), scored by the feature change.

New checkpoints get a patch prior (a local denoiser, networks/denoisers.py) at 128x160,
trained on crops, whose edits are compared with the frame in the backbone's deepest taps
(strides 16 and 32): a small patch prior renders foliage only roughly, and those taps see
terrain where the shallow ones see the difference in texture. `train --denoiser unet` keeps
the scene-level UNet and the analysis taps it was measured with (strides 4, 8, 16).

Checkpoint: config.json {"family": "pixel", "image_size", "denoiser": {"kind", "config"},
"schedule", "analysis_strides"} and denoiser.safetensors. Calibration (`calibrate`) adds, per
variant, the ID moments of the raw map ("score_moments"): the feature distance has no fixed ID
scale (its ID median is near 0.7 in the deep taps, so clamped at 1 the top of a map saturated),
so it is z-scored with them and mapped to [0, 1] as the other families' scores are.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from ..analysis import FeatureDistance
from ..data import Frame
from ..networks.backbone import FeatureExtractor
from ..networks.denoisers import build_denoiser, local_config, runtime_denoiser, unet_config
from ..samplers import EditSampler, Editor, NoiseSchedule, ScheduleConfig
from ..scorer import ExportTarget, ScoreOutput
from ..settings import ComputeSettings, Settings
from .feature_space import to_unit
from .fitting import (DenoiserTrainer, FrameStream, TrainOptions, augment, frame_passes, make_accelerator,
                      random_crop)

log = logging.getLogger(__name__)

FAMILY = "pixel"
RUNS_ON_TENSORRT = True  # backend tensorrt: its UNet denoiser compiles with torch-tensorrt


# The patch prior (the default denoiser, method notes section 5): a local denoiser behind a 2x2
# space-to-depth stem, trained on CROP x CROP windows of frames at LOCAL_SIZE (a person is a
# few pixels at 64x80); it runs unchanged on whole frames. The scene-level UNet's size: UNET_SIZE.
DEFAULT_DENOISER = "local"
LOCAL_SIZE = (128, 160)
UNET_SIZE = (64, 80)
LOCAL_STEM = 2
CROP = 64
# The backbone taps the edit is compared with the frame in: a patch prior's edit in the deepest
# two (chosen on fold 0 of `bench --folds 3 --seed 0`: pixel AP 0.30 there against 0.07 in
# strides 4-16), the UNet's in the ones its figures were measured with.
LOCAL_ANALYSIS_STRIDES = (16, 32)
UNET_ANALYSIS_STRIDES = (4, 8, 16)


class EditingScorer(torch.nn.Module):
    """Analysis by synthesis: edit the frame towards the ID model, measure the change.

    The change is measured against the frame itself or, with reconstruction_guidance w_r > 0,
    against the model's own reconstruction of the frame: the same guided DDIM run (seed,
    start, steps) with the strong guidance w_r, which keeps everything, objects included,
    but renders it as the model does. Whatever the model cannot reproduce (texture, blur of
    a small CPU model) then differs in neither and only what the weak-guidance edit painted
    over remains. With `draws` K > 1 the maps of K seeded edits are averaged (one batched
    network call per step).

    `moments` ({"mean", "std"} of the raw map on ID pixels, measured by calibration with this
    variant's settings) map the distance to [0, 1] like a z-score (`to_unit`); without them
    (a checkpoint not calibrated for the variant) the distance is clamped to [0, 1]."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, settings: Settings, sampler: str,
                 device: torch.device, analysis_strides: tuple[int, ...] = UNET_ANALYSIS_STRIDES,
                 moments: dict | None = None):
        super().__init__()
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        self.net = net  # the denoiser as loaded (quantized or not; `export` writes it)
        self.editor = Editor(net, schedule, clip=1.0)
        self.sampler, self.moments = sampler, moments
        self.distance = FeatureDistance(FeatureExtractor(tuple(analysis_strides)).to(device),
                                        settings.geometry.size)
        self.configure(settings)

    def configure(self, s: Settings) -> None:
        """Take new live settings (the edit's sampler, DDPM's guidance) for the next frame."""
        self.edit = EditSampler.from_settings(s.sampler)
        self.ddpm_guidance = dict(guidance=s.sampler.ddpm_guidance_scale, reference=s.sampler.ddpm_guidance_reference)

    @property
    def nfe(self) -> int:
        e = self.edit
        reconstruction = e.reconstruction_guidance > 0
        if self.sampler == "ddim":
            return self.editor.ddim_nfe(e.start_timestep, e.steps, e.draws, reconstruction)
        ddpm = e.draws * self.editor.schedule.T  # all T steps a draw, plus the DDIM reconstruction
        return ddpm + (self.editor.ddim_nfe(e.start_timestep, e.steps, e.draws) if reconstruction else 0)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.net}

    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        return ExportTarget("denoiser", self.net, (3, *size))

    def edits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edits, reconstructions or None), each (K, B, 3, h, w) in [-1, 1], of x in [-1, 1]."""
        e = self.edit
        ddim = dict(start_timestep=e.start_timestep, steps=e.steps, seed=e.seed, draws=e.draws)
        if self.sampler == "ddim":
            return self.editor.ddim(x, guidance=e.guidance_scale, reconstruction_guidance=e.reconstruction_guidance,
                                    **ddim)
        edits = self.editor.ddpm(x, **self.ddpm_guidance, seed=e.seed, draws=e.draws)
        if e.reconstruction_guidance <= 0:
            return edits, None
        return edits, self.editor.ddim(x, guidance=e.reconstruction_guidance, **ddim)[0]

    def raw_maps(self, batch01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the feature distance (B, H, W) averaged over the draws, unscaled; the first draw's
        edits (B, 3, h, w) in [0, 1])."""
        edits, refs = self.edits(batch01 * 2 - 1)
        edits01 = (edits + 1) / 2
        refs01 = batch01.expand_as(edits01) if refs is None else (refs + 1) / 2
        return torch.stack([self.distance(r, e) for r, e in zip(refs01, edits01)]).mean(0), edits01[0]

    def scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw maps -> maps in [0, 1]: z-scored with the ID moments and `to_unit`, or clamped."""
        if self.moments is None:
            return raw.clamp(0, 1)
        return to_unit((raw - self.moments["mean"]) / self.moments["std"])

    def forward(self, batch01: torch.Tensor) -> ScoreOutput:
        raw, edited01 = self.raw_maps(batch01)
        return ScoreOutput(self.scaled(raw), edited01)


def load_pixel_denoiser(directory: Path, config: dict, device: torch.device, compute: ComputeSettings):
    """(denoiser, schedule); quantized as the checkpoint was written or as compute.quantization asks."""
    net = runtime_denoiser(directory, config, device, compute)
    return net, NoiseSchedule(ScheduleConfig(**config["schedule"]))


def build(directory: Path, config: dict, settings: Settings, device: torch.device,
          sampler: str = "ddim") -> EditingScorer:
    """The scorer of the variant that edits with `sampler` (ddpm or ddim)."""
    net, schedule = load_pixel_denoiser(directory, config, device, settings.compute)  # on its backend
    strides = config.get("analysis_strides", UNET_ANALYSIS_STRIDES)  # checkpoints before the key: the UNet's
    moments = config.get("calibration", {}).get(settings.variant, {}).get("score_moments")
    return EditingScorer(net, schedule, settings, sampler, device, tuple(strides), moments)


def image_size(opts: TrainOptions) -> tuple[int, int]:
    """The pixel family's input size: opts.image_size, or when not set LOCAL_SIZE for a local
    denoiser and UNET_SIZE for the UNet."""
    if opts.image_size:
        return tuple(int(v) for v in opts.image_size)
    return LOCAL_SIZE if (opts.denoiser or DEFAULT_DENOISER) in ("local", "cell") else UNET_SIZE


def pixel_config(opts: TrainOptions) -> dict:
    size, kind = image_size(opts), opts.denoiser or DEFAULT_DENOISER
    if kind == "unet":
        denoiser = unet_config("pixel", opts.preset, 3, size)
    elif kind in ("local", "cell"):
        denoiser = local_config(kind, opts.preset, 3, stem=LOCAL_STEM,
                                receptive_field=opts.receptive_field or None if kind == "local" else None)
    else:
        raise ValueError(f"the pixel family's denoiser is 'local', 'cell' or 'unet', not {kind!r}")
    strides = UNET_ANALYSIS_STRIDES if kind == "unet" else LOCAL_ANALYSIS_STRIDES
    return {"family": FAMILY, "image_size": list(size), "denoiser": {"kind": kind, "config": denoiser},
            "schedule": opts.schedule.to_dict(), "analysis_strides": list(strides)}


def fit(train_frames: list[Frame], out: Path, opts: TrainOptions, progress: bool,
        acc: Accelerator | None = None) -> tuple[dict, dict]:
    """Pixel family (ddpm, ddim): the denoiser on augmented frames (crops of them for a local
    one) streamed from disk, OOD pixels masked out."""
    acc = acc or make_accelerator(opts, out)
    config = pixel_config(opts)
    kind = config["denoiser"]["kind"]
    net = build_denoiser(kind, config["denoiser"]["config"])
    trainer = DenoiserTrainer(net, NoiseSchedule(opts.schedule), opts, out, acc)
    trainer.load_state()
    size = tuple(config["image_size"])
    # A few frames are decoded once and kept (decoding, not the network, is most of a local
    # prior's training step); a set larger than opts.feature_cache_mb streams from disk.
    cached = len(train_frames) * 4 * size[0] * size[1] * 4 / 2**20 <= opts.feature_cache_mb
    if cached:
        held = [(b.images, b.weights) for b in frame_passes(train_frames, size, acc, opts.batch_size, opts.workers)]
        images, weights = (torch.cat(v) for v in zip(*held))
    else:
        frames = FrameStream(train_frames, size, opts, acc, seed=opts.seed + trainer.step)

    def sample_batch(gen):
        if cached:
            pick = torch.randint(0, len(images), (opts.batch_size,), generator=gen)
            xb, wb = augment(images[pick], weights[pick], gen)
        else:
            batch = frames.next()
            xb, wb = augment(batch.images, batch.weights, gen)
        if kind != "unet":  # a bounded receptive field learns patches: crops suffice
            xb, wb = random_crop(xb, wb, CROP, gen)
        return xb * 2 - 1, wb

    trainer.fit(sample_batch, opts.steps, progress)
    config["training"] = {"steps": trainer.step, "frames_in_memory": cached,
                          "skipped_frames": 0 if cached else frames.skipped}
    return config, {"denoiser": trainer.ema_state()}
