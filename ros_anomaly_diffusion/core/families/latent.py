"""Latent variant (family "latent", variant "dcae"): autoencoder + a diffusion prior of latents.

Method notes, section 1, "Latent variant": frames are encoded by a pretrained
autoencoder (the notes use a deep-compression DC-AE), an unconditional denoiser is trained on
the latents of ID frames, and the frame is scored under it in latent space. New checkpoints
get a local prior of latent patches (networks/denoisers.py, trained on latent crops) scored
per latent cell (`LatentEditingScorer`, "latent" analysis); `train --denoiser dit` keeps the
notes' diffusion transformer, whose guided DDIM edit is decoded and compared in pixel space
through backbone features (`FeatureDistance`).

The autoencoder (`TrainOptions.autoencoder`, `train --autoencoder`) is one of
* "taef2" (default): the pretrained TAEF2 shipped with the package (`networks/taef2.py`;
  compression 8, 32 latent channels, so a 64x80 frame gives an 8x10x32 latent grid),
* PATH: a pretrained DC-AE from a local diffusers folder (the paper used
  dc-ae-f32c32-in-1.0: compression 32, 32 latent channels), safetensors only, or
* "trained" (or ""): a compact AutoencoderDC trained on the user's frames in `fit`
  (compression 8).

Whichever it is, the checkpoint is self-contained: config.json says which autoencoder
("autoencoder": {"kind": "taef2"} or {"kind": "dcae", "config": <diffusers config>}; no
"kind", as written before TAEF2: DC-AE), the latent normalisation and the denoiser
config; autoencoder.safetensors and denoiser.safetensors hold the weights.

Latents are normalised as z = (E(x) - shift) * scale with shift/scale measured on the
training frames' latents (unit variance), so the noise schedule sees data of the
same scale as the pixel model does.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderDC
from torch import nn
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..analysis import FeatureDistance
from ..data import Frame
from ..networks.autoencoder import (LatentCodec, autoencoder_config, autoencoder_entry, autoencoder_from_entry,
                                    autoencoder_state, build_autoencoder, compression, diffusers_config,
                                    latent_channels, latent_size, latent_weights, load_pretrained_autoencoder)
from ..networks.taef2 import SOURCE as TAEF2_SOURCE
from ..networks.taef2 import load_taef2
from ..networks.backbone import FeatureExtractor
from ..networks.denoisers import build_denoiser, dit_config, local_config, pad_to, runtime_denoiser
from ..samplers import EditSampler, Editor, NoiseSchedule, ScheduleConfig
from ..scorer import ExportTarget, ScoreOutput
from ..settings import EAGER, ComputeSettings, Settings
from .feature_space import unit_map
from .fitting import (STATE, DenoiserTrainer, FrameStream, TrainOptions, augment, frame_passes, make_accelerator,
                      mean_std, random_crop, summed)

log = logging.getLogger(__name__)

FAMILY = "latent"
RUNS_ON_TENSORRT = False  # backend tensorrt: its DiT is exported for trtexec instead
AE_STATE = "autoencoder_state"  # the trained autoencoder, kept so that a resumed run reuses it
AE_LR = 1e-3
TRAINED = "trained"  # TrainOptions.autoencoder: a compact DC-AE trained on the frames ("" too)

# --------------------------------------------------------------------------- scorer


REFERENCES = ("input", "reconstruction")
# A new checkpoint's denoiser (TrainOptions.denoiser empty) and its analysis: a local prior of
# latent patches (3x3 blocks, RECEPTIVE_FIELD latent cells; method notes section 5), trained on
# CROP x CROP latent windows of frames at LOCAL_SIZE, scored where it lives, per latent cell
# (EDIT_SAMPLER, chosen on fold 0 of `bench --folds 3 --seed 0` on the sample). "dit" is the
# scene-level network of the notes, analysed on decoded frames.
DEFAULT_DENOISER = "local"
LOCAL_SIZE = (256, 320)
DIT_SIZE = (64, 80)
RECEPTIVE_FIELD = 13
CROP = 16
EDIT_SAMPLER = EditSampler(score="error", start_timestep=500, steps=5, guidance_scale=0.0,
                           reconstruction_guidance=1.0, seed=0, draws=4)


class LatentEditingScorer(nn.Module):
    """encode -> score the latents under the ID prior (config "analysis"):

    * "latent" (a local denoiser's checkpoint): per latent cell, samplers.Editor.score (the
      guided DDIM edit's distance from the reconstruction, or the denoising error), averaged
      over seeded draws, mapped into [0, 1] with the ID statistics stored in the checkpoint.
      TAEF2 renders smooth man-made objects well and foliage badly, so comparing decoded
      frames would score ID texture above objects; in latent space that bias is absent.
    * "decoded" (the DiT of the notes): the edit is decoded and compared through backbone
      features (`FeatureDistance`) with the input frame (reference "input"), its
      autoencoder round trip ("reconstruction") or, with reconstruction_guidance w_r > 0,
      the decoded reconstruction: the same latent edit with the strong guidance w_r.
    """

    def __init__(self, codec: LatentCodec, net: nn.Module, schedule: NoiseSchedule, settings: Settings,
                 device: torch.device, reference: str = "input", stats: dict | None = None):
        super().__init__()
        if reference not in REFERENCES:
            raise ValueError(f"analysis_reference must be one of {list(REFERENCES)}, got {reference!r}")
        self.reference, self.stats = reference, stats
        self.codec, self.net = codec, net  # the denoiser as loaded (quantized or not; `export` writes it)
        self.editor = Editor(net, schedule, clip=None)  # unit-variance latents exceed [-1, 1]
        self.distance = None if stats else FeatureDistance(FeatureExtractor().to(device),
                                                           settings.geometry.size)
        self.configure(settings)

    def configure(self, s: Settings) -> None:
        """Take new live settings (the sampler) for the next frame."""
        self.settings, self.sampler = s, EditSampler.from_settings(s.sampler)
        self.size = s.geometry.size
        if self.stats:
            self.sampler.warn_unless_measured("dcae", self.stats["sampler"])

    @property
    def nfe(self) -> int:
        if self.stats:
            return self.editor.score_nfe(self.sampler)
        edit = dataclasses.replace(self.sampler, score="edit")
        return self.editor.score_nfe(edit)

    def networks(self) -> dict[str, nn.Module]:
        return {"denoiser": self.net, "autoencoder": self.codec.ae}

    @torch.no_grad()
    def export_target(self, size: tuple[int, int]) -> ExportTarget:
        device = next(self.net.parameters()).device
        latent = self.codec.encode(torch.zeros(1, 3, *size, device=device))
        return ExportTarget("denoiser", self.net, tuple(latent.shape[1:]))

    @torch.no_grad()
    def forward(self, batch01: torch.Tensor) -> ScoreOutput:
        size, s = batch01.shape[-2:], self.sampler
        z = self.codec.encode(batch01)  # once, for the edit and the reference
        if self.stats:
            return ScoreOutput(unit_map(self.editor.score(z, s), self.size, self.stats["pixel"]), None)
        edits, refs = self.editor.ddim(z, start_timestep=s.start_timestep, steps=s.steps, guidance=s.guidance_scale,
                                       seed=s.seed, draws=s.draws, reconstruction_guidance=s.reconstruction_guidance)
        decoded = [self.codec.decode(e, size) for e in edits]
        if refs is not None:  # the reference (see the class docstring)
            references = [self.codec.decode(r, size) for r in refs]
        else:
            references = [batch01 if self.reference == "input" else self.codec.decode(z, size)] * len(decoded)
        # opposite feature directions (cos < 0) are as anomalous as it gets: capped at 1
        maps = torch.stack([self.distance(r, e) for r, e in zip(references, decoded)]).mean(0).clamp(0, 1)
        return ScoreOutput(maps, decoded[0])


def load_latent_models(directory: Path, config: dict, device: torch.device, compute: ComputeSettings = EAGER):
    """(codec, denoiser, schedule) of a latent-family checkpoint; the denoiser quantized as the
    checkpoint was written or as compute.quantization asks (the autoencoder stays fp32)."""
    ae_cfg = config["autoencoder"]
    ae = autoencoder_from_entry(ae_cfg)
    ckpt.load_into(ae, directory, "autoencoder")
    codec = LatentCodec(ae.to(device).eval(), ae_cfg["latent_shift"], ae_cfg["latent_scale"])
    net = runtime_denoiser(directory, config, device, compute)
    return codec, net, NoiseSchedule(ScheduleConfig(**config["schedule"]))


def build(directory: Path, config: dict, settings: Settings, device: torch.device):
    codec, net, schedule = load_latent_models(Path(directory), config, device, settings.compute)
    return LatentEditingScorer(codec, net, schedule, settings, device, config.get("analysis_reference", "input"),
                               config.get("latent_scores"))


# --------------------------------------------------------------------------- training


def latent_config(opts: TrainOptions, ae, source: str, shift: float, scale: float) -> dict:
    factor = compression(ae)
    grid = latent_size(image_size(opts), factor)
    return {"family": FAMILY, "image_size": list(image_size(opts)),
            "autoencoder": {**autoencoder_entry(ae), "source": source, "compression": factor,
                            "latent_shift": shift, "latent_scale": scale},
            "latent_size": list(grid),
            "denoiser": denoiser_entry(opts, latent_channels(ae), grid), "schedule": opts.schedule.to_dict()}


def denoiser_entry(opts: TrainOptions, channels: int, grid: tuple[int, int]) -> dict:
    """config.json "denoiser" of a new checkpoint: kind "local" (default) or "dit"."""
    kind = opts.denoiser or DEFAULT_DENOISER
    if kind == "dit":
        return {"kind": kind, "config": dit_config(opts.preset, channels, grid)}
    if kind == "local":
        return {"kind": kind, "config": local_config(kind, opts.preset, channels,
                                                     receptive_field=opts.receptive_field or RECEPTIVE_FIELD)}
    raise ValueError(f"the latent family's denoiser is 'local' or 'dit', not {kind!r}")


def image_size(opts: TrainOptions) -> tuple[int, int]:
    """opts.image_size, or when not set LOCAL_SIZE for a local denoiser and DIT_SIZE for the DiT."""
    if opts.image_size:
        return tuple(int(v) for v in opts.image_size)
    return LOCAL_SIZE if (opts.denoiser or DEFAULT_DENOISER) == "local" else DIT_SIZE


@torch.no_grad()
def latent_statistics(codec: LatentCodec, frames: list[Frame], opts: TrainOptions, acc: Accelerator) -> dict:
    """Over every frame (each process its shard, summed across processes): the mean and std of
    the raw latents (the DiT's normalisation) and the autoencoder's reconstruction quality,
    mean L1 and PSNR (dB, images in [0, 1]) of decode(encode(x))."""
    # latent values: count, sum, sum of squares; frames: count, L1 sum, PSNR sum
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)
    for batch in frame_passes(frames, image_size(opts), acc, opts.batch_size, opts.workers):
        xb = batch.images.to(acc.device)
        raw = codec.raw(xb).double()
        rec = codec.decode(codec.encode(xb), xb.shape[-2:])
        mse = ((rec - xb) ** 2).mean(dim=(1, 2, 3)).double()
        sums += torch.stack([raw.new_tensor(raw.numel()), raw.sum(), raw.square().sum(), raw.new_tensor(len(xb)),
                             (rec - xb).abs().mean(dim=(1, 2, 3)).double().sum(),
                             (10 * torch.log10(1 / mse.clamp_min(1e-10))).sum()])
    sums = summed(sums, acc)
    mean, std = mean_std(*sums[:3])
    n = float(sums[3])
    return {"shift": float(mean), "std": float(std), "l1": float(sums[4]) / n, "psnr_db": float(sums[5]) / n}


def train_autoencoder(ae: AutoencoderDC, frames: list[Frame], opts: TrainOptions, acc: Accelerator,
                      progress: bool) -> list[float]:
    """Reconstruction training (L1 + L2 on all pixels, augmented frames streamed from disk) of a
    compact DC-AE, under the run's Accelerator.

    All pixels count, OOD ones included: the autoencoder is a generic image codec (the
    pretrained DC-AE saw ImageNet); only the diffusion model must not learn OOD content.
    """
    ae.to(acc.device).train()
    optim = torch.optim.Adam(ae.parameters(), lr=AE_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(1, opts.steps), eta_min=AE_LR * 0.05)
    model, optim, sched = acc.prepare(ae, optim, sched)
    gen = torch.Generator().manual_seed(opts.seed + 7919 + 1_000_003 * acc.process_index)
    stream = FrameStream(frames, image_size(opts), opts, acc, seed=opts.seed + 7919)
    losses = []
    factor = compression(ae)
    bar = tqdm(total=opts.steps, desc="training autoencoder", disable=not (progress and acc.is_main_process))
    while len(losses) < opts.steps:  # one loss per optimizer step (a disabled bar does not count)
        batch = stream.next()
        xb, _ = augment(batch.images, batch.weights, gen)
        xb = pad_to(xb.to(acc.device) * 2 - 1, factor)
        with acc.accumulate(model):
            rec = model(xb).sample.float()  # through the (DDP) wrapper: decode(encode(x))
            loss = (rec - xb).abs().mean() + ((rec - xb) ** 2).mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            losses.append(float(acc.reduce(loss.detach(), "mean")))
            bar.update(1)
    bar.close()
    return losses


def autoencoder_choice(opts: TrainOptions) -> str:
    """"taef2", "trained" or a path (as given); "" (older callers) is "trained"."""
    return (opts.autoencoder or TRAINED).strip() or TRAINED


def _same_autoencoder(a: str, b: str) -> bool:
    if TRAINED in (a, b) or "taef2" in (a, b):
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_resume(choice: str, out: Path) -> None:
    """A run resumed in `out` must use the autoencoder its DiT state was trained with."""
    if not (out / STATE / ckpt.CONFIG).is_file():
        return
    before = (ckpt.load_config(out / STATE).get("options", {}).get("autoencoder") or TRAINED).strip() or TRAINED
    if not _same_autoencoder(before, choice):
        raise ValueError(f"{out}: the training state there was made with autoencoder {before!r}, not {choice!r}; "
                         f"resume with --autoencoder {before} or write to another folder")


def _autoencoder_for(opts: TrainOptions, frames: list[Frame], out: Path, acc: Accelerator, progress: bool):
    """(autoencoder, source, info): the shipped TAEF2, a pretrained DC-AE when opts.autoencoder
    names a folder, else a DC-AE trained here (or reloaded from a previous run's
    autoencoder_state/ when resuming)."""
    choice = autoencoder_choice(opts)
    _check_resume(choice, out)
    if choice == "taef2":
        ae = load_taef2()
        log.info("pretrained autoencoder %s: compression %d, %d latent channels", TAEF2_SOURCE,
                 compression(ae), latent_channels(ae))
        return ae, TAEF2_SOURCE, {}
    if choice != TRAINED:
        ae = load_pretrained_autoencoder(choice)
        log.info("pretrained autoencoder %s: compression %d, %d latent channels", choice,
                 compression(ae), latent_channels(ae))
        return ae, str(Path(choice).expanduser().resolve()), {}
    state_dir = out / AE_STATE
    if (state_dir / ckpt.CONFIG).is_file():
        saved = ckpt.load_config(state_dir)
        ae = build_autoencoder(saved["autoencoder"])
        ckpt.load_into(ae, state_dir, "autoencoder")
        log.info("reusing the autoencoder trained before in %s", state_dir)
        return ae, TRAINED, saved.get("info", {})
    ae = build_autoencoder(autoencoder_config(opts.preset))
    losses = train_autoencoder(ae, frames, opts, acc, progress)
    ae.eval()
    info = {"steps": opts.steps, "lr": AE_LR,
            "final_loss": float(sum(losses[-20:]) / max(1, len(losses[-20:]))) if losses else None}
    if acc.is_main_process:
        ckpt.save(state_dir, {"autoencoder": diffusers_config(ae), "info": info}, {"autoencoder": ae.state_dict()})
    acc.wait_for_everyone()
    return ae, TRAINED, info


def fit(train_frames: list[Frame], out: Path, opts: TrainOptions, progress: bool,
        acc: Accelerator | None = None) -> tuple[dict, dict]:
    """Latent family (dcae): the autoencoder (pretrained or trained here), then the DiT on
    normalised latents of augmented frames streamed from disk, OOD latent cells masked out of
    the loss."""
    out = Path(out)
    acc = acc or make_accelerator(opts, out)
    ae, source, ae_info = _autoencoder_for(opts, train_frames, out, acc, progress)
    ae.to(acc.device).eval().requires_grad_(False)
    codec = LatentCodec(ae)
    stats = latent_statistics(codec, train_frames, opts, acc)
    shift, scale = stats["shift"], 1.0 / max(stats["std"], 1e-6)
    codec.shift, codec.scale = shift, scale
    quality = {"l1": stats["l1"], "psnr_db": stats["psnr_db"]}
    if acc.is_main_process:
        log.info("autoencoder (%s): reconstruction on the training frames L1 %.4f, PSNR %.2f dB; shift %.4f, "
                 "scale %.4f", source, quality["l1"], quality["psnr_db"], shift, scale)

    config = latent_config(opts, ae, source, shift, scale)
    kind = config["denoiser"]["kind"]
    net = build_denoiser(kind, config["denoiser"]["config"])
    schedule = NoiseSchedule(opts.schedule)
    trainer = DenoiserTrainer(net, schedule, opts, out, acc)
    trainer.load_state()
    factor = codec.factor
    size = tuple(config["image_size"])
    cached = kind != "dit" and _fits_in_memory(codec, size, len(train_frames), opts)
    frames = None if cached else FrameStream(train_frames, size, opts, acc, seed=opts.seed + trainer.step)
    if cached:  # encoded once: the autoencoder costs far more than a local prior's training step
        latents = [(codec.encode(b.images.to(acc.device)), latent_weights(b.weights, factor).to(acc.device))
                   for b in frame_passes(train_frames, size, acc, opts.batch_size, opts.workers)]
        z_all, w_all = (torch.cat(v) for v in zip(*latents))

    @torch.no_grad()
    def sample_batch(gen):
        if cached:
            pick = torch.randint(0, len(z_all), (opts.batch_size,), generator=gen)
            z, w = random_crop(z_all[pick], w_all[pick], CROP, gen)
            flip = (torch.rand(len(pick), generator=gen) < 0.5)[:, None, None, None].to(z.device)
            return torch.where(flip, z.flip(-1), z), torch.where(flip, w.flip(-1), w)
        batch = frames.next()
        xb, wb = augment(batch.images, batch.weights, gen)
        z, w = codec.encode(xb.to(acc.device)), latent_weights(wb, factor)
        return (z, w) if kind == "dit" else random_crop(z, w, CROP, gen)  # a local prior learns patches

    trainer.fit(sample_batch, opts.steps, progress)
    ema = trainer.ema_state()
    config["training"] = {"steps": trainer.step, "skipped_frames": 0 if cached else frames.skipped,
                          "latents_in_memory": cached,
                          "autoencoder": {**ae_info, "source": source, "reconstruction_train": quality}}
    if kind != "dit":
        net.load_state_dict(ema)
        if cached:  # the latents encoded for training, a batch at a time
            batches = zip(z_all.split(opts.batch_size), w_all.split(opts.batch_size))
        else:
            batches = ((codec.encode(b.images.to(acc.device)), latent_weights(b.weights, factor).to(acc.device))
                       for b in frame_passes(train_frames, size, acc, opts.batch_size, opts.workers))
        config["analysis"] = "latent"
        config["latent_scores"] = latent_score_statistics(net.eval(), schedule, batches, acc)
    return config, {"autoencoder": autoencoder_state(ae), "denoiser": ema}


def _fits_in_memory(codec: LatentCodec, size: tuple[int, int], frames: int, opts: TrainOptions) -> bool:
    """Whether this process's latents of the training frames fit in opts.feature_cache_mb."""
    channels = latent_channels(codec.ae)
    h, w = latent_size(size, codec.factor)
    return frames * (channels + 1) * h * w * 4 / 2**20 <= opts.feature_cache_mb


@torch.no_grad()
def latent_score_statistics(net: nn.Module, schedule: NoiseSchedule, batches, acc: Accelerator,
                            sampler: EditSampler = EDIT_SAMPLER) -> dict:
    """ID mean/std of the latent score (Editor.score with `sampler`) over the ID latent cells of
    batches (latents, latent weights) of the training frames, every process's shard; the map into
    [0, 1] of the scorer."""
    editor = Editor(net, schedule, clip=None)
    sums = torch.zeros(3, dtype=torch.float64)
    for z, weights in batches:
        d = editor.score(z, sampler)[weights[:, 0] >= 1].double().cpu()
        sums += torch.stack([d.new_tensor(d.numel()), d.sum(), d.square().sum()])
    mean, std = mean_std(*summed(sums, acc))
    return {"sampler": sampler.to_dict(), "pixel": {"mean": float(mean), "std": max(float(std), 1e-6)}}
