"""Latent variant (family "latent", variant "dcae"): autoencoder + DiT, guided DDIM on latents.

Method notes, section 1, "Latent variant": frames are encoded by a pretrained
autoencoder (the notes use a deep-compression DC-AE), an unconditional diffusion transformer is
trained on the latents of ID frames, and the same guided DDIM edit as the pixel
variant runs in latent space (the guidance compares latents). The edited latents are
decoded and compared with the input frame in pixel space (`FeatureDistance`).

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
from ..networks.denoisers import DiTDenoiser, dit_config, pad_to
from ..networks.quantization import load_denoiser
from ..samplers import NoiseSchedule, ScheduleConfig, edit_and_reconstruction
from ..scorer import ScoreOutput
from ..settings import Settings
from .fitting import (STATE, DenoiserTrainer, FrameStream, TrainOptions, augment, frame_passes, make_accelerator,
                      mean_std, summed)

log = logging.getLogger(__name__)

FAMILY = "latent"
RUNS_ON_TENSORRT = False  # backend tensorrt: its DiT is exported for trtexec instead
AE_STATE = "autoencoder_state"  # the trained autoencoder, kept so that a resumed run reuses it
AE_LR = 1e-3
TRAINED = "trained"  # TrainOptions.autoencoder: a compact DC-AE trained on the frames ("" too)

# --------------------------------------------------------------------------- scorer


REFERENCES = ("input", "reconstruction")


class LatentEditingScorer:
    """encode -> guided DDIM on the latents -> decode -> FeatureDistance(input, decoded).

    reference "input" (default) compares the decoded edit with the input frame itself, so
    whatever the autoencoder cannot reproduce also counts as change; "reconstruction"
    compares it with decode(encode(input)) instead (one more decode), which leaves only
    what the diffusion edit changed. Chosen by the checkpoint's `analysis_reference`.
    With reconstruction_guidance w_r > 0 (Settings) the reference is the model's own
    reconstruction instead: the same latent edit with the strong guidance w_r, decoded, so
    the autoencoder's and the DiT's rendering cancel out (see pixel.EditingScorer).
    """

    def __init__(self, codec: LatentCodec, net: nn.Module, schedule: NoiseSchedule, settings: Settings,
                 device: torch.device, reference: str = "input"):
        if reference not in REFERENCES:
            raise ValueError(f"analysis_reference must be one of {list(REFERENCES)}, got {reference!r}")
        self.reference = reference
        self.codec, self.net = codec, net  # the DiT as loaded (quantized or not)
        self.distance = FeatureDistance(FeatureExtractor().to(device),
                                        (settings.analysis_height, settings.analysis_width))
        self.schedule = schedule
        self.apply(settings)

    def apply(self, s: Settings) -> None:
        """Take new live settings (sampler parameters) for the next frame."""
        # no clamp: unit-variance latents exceed [-1, 1]
        self.editor, self.reconstructor = edit_and_reconstruction(
            self.net, self.schedule, s.steps, s.start_timestep, s.guidance_scale, s.reconstruction_guidance, clip=None)
        self.settings = s

    @property
    def nfe(self) -> int:
        return self.editor.nfe + (0 if self.reconstructor is None else self.reconstructor.nfe)

    @torch.no_grad()
    def edit(self, batch01: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.editor.edit(self.codec.encode(batch01), seed=self.settings.seed),
                                 batch01.shape[-2:])

    @torch.no_grad()
    def __call__(self, batch01: torch.Tensor) -> ScoreOutput:
        size, seed = batch01.shape[-2:], self.settings.seed
        z = self.codec.encode(batch01)  # once, for the edit and the reference
        edited = self.codec.decode(self.editor.edit(z, seed=seed), size)
        if self.reconstructor is not None:  # the reference (see the class docstring)
            ref = self.codec.decode(self.reconstructor.edit(z, seed=seed), size)
        else:
            ref = batch01 if self.reference == "input" else self.codec.decode(z, size)
        return ScoreOutput(self.distance(ref, edited), edited)


def load_latent_models(directory: Path, config: dict, device: torch.device, settings: Settings | None = None):
    """(codec, denoiser, schedule) of a latent-family checkpoint; the DiT quantized as the
    checkpoint was written or as settings.quantization asks (the autoencoder stays fp32)."""
    ae_cfg = config["autoencoder"]
    ae = autoencoder_from_entry(ae_cfg)
    ckpt.load_into(ae, directory, "autoencoder")
    codec = LatentCodec(ae.to(device).eval(), ae_cfg["latent_shift"], ae_cfg["latent_scale"])
    net = load_denoiser(directory, config, device, settings)
    return codec, net, NoiseSchedule(ScheduleConfig(**config["schedule"]))


def build(directory: Path, config: dict, settings: Settings, device: torch.device):
    codec, net, schedule = load_latent_models(Path(directory), config, device, settings)
    return LatentEditingScorer(codec, net, schedule, settings, device, config.get("analysis_reference", "input"))


# --------------------------------------------------------------------------- training


def latent_config(opts: TrainOptions, ae, source: str, shift: float, scale: float) -> dict:
    factor = compression(ae)
    grid = latent_size(opts.image_size, factor)
    return {"family": FAMILY, "image_size": list(opts.image_size),
            "autoencoder": {**autoencoder_entry(ae), "source": source, "compression": factor,
                            "latent_shift": shift, "latent_scale": scale},
            "latent_size": list(grid),
            "denoiser": {"kind": "dit", "config": dit_config(opts.preset, latent_channels(ae), grid)},
            "schedule": opts.schedule.to_dict()}


@torch.no_grad()
def latent_statistics(codec: LatentCodec, frames: list[Frame], opts: TrainOptions, acc: Accelerator) -> dict:
    """Over every frame (each process its shard, summed across processes): the mean and std of
    the raw latents (the DiT's normalisation) and the autoencoder's reconstruction quality,
    mean L1 and PSNR (dB, images in [0, 1]) of decode(encode(x))."""
    # latent values: count, sum, sum of squares; frames: count, L1 sum, PSNR sum
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)
    for batch in frame_passes(frames, opts.image_size, acc, opts.batch_size, opts.workers):
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
    stream = FrameStream(frames, opts.image_size, opts, acc, seed=opts.seed + 7919)
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
    net = DiTDenoiser(config["denoiser"]["config"])
    trainer = DenoiserTrainer(net, NoiseSchedule(opts.schedule), opts, out, acc)
    trainer.load_state()
    factor = codec.factor
    frames = FrameStream(train_frames, opts.image_size, opts, acc, seed=opts.seed + trainer.step)

    @torch.no_grad()
    def sample_batch(gen):
        batch = frames.next()
        xb, wb = augment(batch.images, batch.weights, gen)
        return codec.encode(xb.to(acc.device)), latent_weights(wb, factor)

    trainer.fit(sample_batch, opts.steps, progress)
    config["training"] = {"steps": trainer.step, "skipped_frames": frames.skipped,
                          "autoencoder": {**ae_info, "source": source, "reconstruction_train": quality}}
    return config, {"autoencoder": autoencoder_state(ae), "denoiser": trainer.ema_state()}


def init_checkpoint(directory: str | Path, *, preset: str = "tiny", image_size: tuple[int, int] | None = None,
                    seed: int = 0, calibration: dict | None = None, autoencoder: str = "dcae") -> Path:
    """A latent-family checkpoint with an untrained DiT (tests, smoke runs), 32x40 unless image_size
    is given; autoencoder "dcae": an untrained tiny DC-AE, "taef2": the shipped TAEF2."""
    torch.manual_seed(seed)
    opts = TrainOptions(variant="dcae", preset=preset, image_size=tuple(image_size or (32, 40)))
    if autoencoder == "taef2":
        ae, source = load_taef2(), TAEF2_SOURCE
    elif autoencoder == "dcae":
        ae, source = build_autoencoder(autoencoder_config(preset)), "untrained"
    else:
        raise ValueError(f"autoencoder must be 'dcae' or 'taef2', got {autoencoder!r}")
    config = latent_config(opts, ae, source, 0.0, 1.0)
    if calibration:
        config["calibration"] = calibration
    net = DiTDenoiser(config["denoiser"]["config"])
    return ckpt.save(directory, config, {"autoencoder": autoencoder_state(ae), "denoiser": net.state_dict()})


