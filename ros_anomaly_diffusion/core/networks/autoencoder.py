"""Autoencoders of the latent family: the shipped pretrained TAEF2 (`taef2.py`), or
diffusers' `AutoencoderDC` (DC-AE), either pretrained (a local diffusers folder,
safetensors only) or a compact one trained on the user's frames (AE_PRESETS); and
`LatentCodec`, which hides which one it is (TAEF2 takes images in [0, 1], DC-AE in
[-1, 1]), its padding and the latent normalisation z = (E(x) - shift) * scale.

A checkpoint's config.json describes its autoencoder as {"kind": "taef2"} or
{"kind": "dcae", "config": <diffusers config>}; written before TAEF2, it has no "kind"
and is a DC-AE.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC

from .. import checkpoint as ckpt
from .denoisers import pad_to
from .taef2 import TAEF2

KINDS = ("taef2", "dcae")

log = logging.getLogger(__name__)

# Compact AutoencoderDC configurations trained on the user's frames. Spatial
# compression is 2 ** (levels - 1): 8 for all presets, so a 64x80 frame gives an 8x10
# latent grid (the pretrained f32 DC-AE would give 2x3). ResBlocks only (no
# EfficientViT linear attention): cheapest on a CPU, and the grid is small anyway.
AE_PRESETS = {
    "tiny": dict(channels=(8, 16, 32, 32), layers=(1, 1, 1, 1), latent_channels=8),
    "small": dict(channels=(16, 32, 64, 64), layers=(1, 1, 1, 1), latent_channels=16),
    "medium": dict(channels=(32, 64, 128, 128), layers=(1, 1, 2, 2), latent_channels=16),
    "reference": dict(channels=(64, 128, 256, 256), layers=(2, 2, 2, 2), latent_channels=32),
}


def autoencoder_config(preset: str) -> dict:
    """diffusers AutoencoderDC kwargs of a compact, locally trained DC-AE."""
    if preset not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; choose one of {sorted(AE_PRESETS)}")
    p = AE_PRESETS[preset]
    n = len(p["channels"])
    return dict(
        in_channels=3,
        latent_channels=p["latent_channels"],
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=list(p["channels"]),
        decoder_block_out_channels=list(p["channels"]),
        encoder_layers_per_block=list(p["layers"]),
        decoder_layers_per_block=list(p["layers"]),
        encoder_qkv_multiscales=[[] for _ in range(n)],
        decoder_qkv_multiscales=[[] for _ in range(n)],
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=1.0,
    )


def diffusers_config(model) -> dict:
    """A diffusers model's config as plain JSON (private `_...` keys dropped)."""
    return json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                                 default=list))


def build_autoencoder(config: dict) -> AutoencoderDC:
    return AutoencoderDC.from_config(config).eval()


def load_pretrained_autoencoder(path: str | Path) -> AutoencoderDC:
    """A DC-AE from a local diffusers-format folder (config.json + *.safetensors).

    Nothing is downloaded and pickled weights (.bin/.pt/...) are refused: loading them
    could execute code. A pipeline folder with the autoencoder in vae/ is accepted too.
    """
    p = Path(path).expanduser()
    expected = "a diffusers AutoencoderDC folder with config.json and diffusion_pytorch_model.safetensors"
    if not p.exists():
        raise ckpt.CheckpointError(f"{p}: autoencoder folder not found (expected {expected}; "
                                   "nothing is downloaded, give a local folder)")
    if p.is_file():
        why = ("pickle files are refused because loading them can execute code"
               if p.suffix in ckpt.PICKLE_SUFFIXES else "it is a file")
        raise ckpt.CheckpointError(f"{p}: not usable as the autoencoder ({why}); expected {expected}")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"
    if not (p / "config.json").is_file():
        raise ckpt.CheckpointError(f"{p / 'config.json'}: missing (expected {expected})")
    try:
        raw = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ckpt.CheckpointError(f"{p / 'config.json'}: not valid JSON ({err})") from err
    cls = raw.get("_class_name") if isinstance(raw, dict) else None
    if cls != "AutoencoderDC":
        raise ckpt.CheckpointError(f"{p / 'config.json'}: describes a {cls!r}, expected an 'AutoencoderDC'")
    if not list(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in ckpt.PICKLE_SUFFIXES)
        detail = (f"only pickled weights ({', '.join(pickles)}), which are refused because loading them can "
                  "execute code; convert them to safetensors first" if pickles else "no .safetensors weights")
        raise ckpt.CheckpointError(f"{p}: {detail}")
    try:
        ae, info = AutoencoderDC.from_pretrained(str(p), local_files_only=True, use_safetensors=True,
                                                 output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ckpt.CheckpointError(f"{p}: could not load the AutoencoderDC ({type(err).__name__}: {err})") from err
    # diffusers only warns about weights missing from the file and initialises them at random
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ckpt.CheckpointError(f"{p}: the weights do not match config.json (missing: "
                                   f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    if info.get("unexpected_keys"):
        log.warning("%s: ignoring %d weights the AutoencoderDC does not use", p, len(info["unexpected_keys"]))
    if ae.config.in_channels != 3:
        raise ckpt.CheckpointError(f"{p}: the autoencoder takes {ae.config.in_channels} channels, not RGB")
    return ae.eval()


def autoencoder_kind(ae: TAEF2 | AutoencoderDC) -> str:
    return "taef2" if isinstance(ae, TAEF2) else "dcae"


def compression(ae: TAEF2 | AutoencoderDC) -> int:
    return ae.compression if isinstance(ae, TAEF2) else int(ae.spatial_compression_ratio)


def latent_channels(ae: TAEF2 | AutoencoderDC) -> int:
    return ae.latent_channels if isinstance(ae, TAEF2) else int(ae.config.latent_channels)


def autoencoder_entry(ae: TAEF2 | AutoencoderDC) -> dict:
    """What config.json records to rebuild the autoencoder (its weights are autoencoder.safetensors)."""
    if isinstance(ae, TAEF2):
        return {"kind": "taef2", "latent_channels": ae.latent_channels}
    return {"kind": "dcae", "config": diffusers_config(ae)}


def autoencoder_from_entry(entry: dict) -> TAEF2 | AutoencoderDC:
    """The (untrained) autoencoder a checkpoint's "autoencoder" entry describes; no "kind": DC-AE."""
    kind = entry.get("kind", "dcae")
    if kind == "taef2":
        return TAEF2().eval()
    if kind == "dcae":
        return build_autoencoder(entry["config"])
    raise ckpt.CheckpointError(f"unknown autoencoder kind {kind!r} in {ckpt.CONFIG}; expected one of {list(KINDS)}")


def autoencoder_state(ae: TAEF2 | AutoencoderDC) -> dict[str, torch.Tensor]:
    """The weights the checkpoint stores: TAEF2's in fp16, as released (lossless, half the size)."""
    state = ae.state_dict()
    return {k: v.half() for k, v in state.items()} if isinstance(ae, TAEF2) else state


def latent_size(image_size, factor: int) -> tuple[int, int]:
    """Latent grid of an (H, W) frame; frames are padded up to a multiple of the factor."""
    return math.ceil(image_size[0] / factor), math.ceil(image_size[1] / factor)


def latent_weights(wgt: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel loss weights (B, 1, H, W) -> latent grid: a cell is 0 if any OOD pixel is inside."""
    return -F.max_pool2d(-pad_to(wgt, factor), factor, factor)


class LatentCodec(torch.nn.Module):
    """Frames in [0, 1] <-> normalised latents; which autoencoder (TAEF2 on [0, 1], DC-AE on
    [-1, 1]), its padding to a multiple of its compression and the scaling are hidden."""

    def __init__(self, ae: TAEF2 | AutoencoderDC, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.ae, self.shift, self.scale = ae, float(shift), float(scale)
        self.factor = compression(ae)
        self.kind = autoencoder_kind(ae)

    def raw(self, x01: torch.Tensor) -> torch.Tensor:
        if self.kind == "taef2":
            return self.ae.encode(pad_to(x01, self.factor))
        return self.ae.encode(pad_to(x01 * 2 - 1, self.factor)).latent

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        return (self.raw(x01) - self.shift) * self.scale

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        z = z / self.scale + self.shift
        if self.kind == "taef2":
            x01 = self.ae.decode(z)
        else:
            x01 = (self.ae.decode(z).sample + 1) / 2
        return x01[..., :size[0], :size[1]].clamp(0, 1)
