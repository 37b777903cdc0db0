"""TAEF2: the tiny distilled autoencoder of the FLUX.2 latent space (madebyollin/taesd, MIT),
shipped with the package in `ros_anomaly_diffusion/models/taef2/`.

Written by hand because diffusers' `AutoencoderTiny` cannot express it: its
`AutoencoderTinyBlock` has no "pool" branch (x + 1x1 conv, GroupNorm, ReLU, 1x1 conv)
that TAEF2's midblocks carry, and its state-dict keys (`encoder.layers.N...`) are not
those of the released files (`N...`, an nn.Sequential). `build_encoder` and `build_decoder` return that
nn.Sequential, so their state-dict keys are exactly the safetensors files' keys.

Images in [0, 1], (B, 3, H, W) with H and W multiples of 8; latents (B, 32, H/8, W/8),
roughly in [-3, 3] (no scale factor). Weights are loaded from safetensors only, with
strict key and shape matching.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "taef2"
ENCODER_FILE, DECODER_FILE = "taef2_encoder", "taef2_decoder"  # .safetensors in WEIGHTS
COMPRESSION = 8
LATENT_CHANNELS = 32
WIDTH = 64
SOURCE = "taef2 (madebyollin/taesd @5cccb12, MIT)"


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Three 3x3 convs (ReLU after the first two) plus the identity, summed, then ReLU.
    A midblock first adds pool(x): 1x1 conv n->4n, GroupNorm(4), ReLU, 1x1 conv 4n->n."""

    def __init__(self, n: int, midblock: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n), nn.ReLU(),
                                  nn.Conv2d(4 * n, n, 1, bias=False)) if midblock else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): 3 tanh(x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def build_encoder(n: int = WIDTH, latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """Image in [0, 1] -> latents; keys as in taef2_encoder.safetensors."""
    return nn.Sequential(
        _conv(3, n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n), Block(n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n), Block(n), Block(n),
        _conv(n, n, stride=2, bias=False), Block(n, True), Block(n, True), Block(n, True),
        _conv(n, latent_channels))


def build_decoder(n: int = WIDTH, latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """Latents -> image, roughly in [0, 1]; keys as in taef2_decoder.safetensors."""
    return nn.Sequential(
        Clamp(), _conv(latent_channels, n), nn.ReLU(), Block(n, True), Block(n, True), Block(n, True),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n), Block(n), Block(n),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n), Block(n), Block(n),
        nn.Upsample(scale_factor=2), _conv(n, n, bias=False), Block(n),
        _conv(n, 3))


class TAEF2(nn.Module):
    """Encoder and decoder together; state-dict keys `encoder.<file key>`, `decoder.<file key>`."""

    compression = COMPRESSION
    latent_channels = LATENT_CHANNELS

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = build_encoder(), build_decoder()

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> (B, 32, H/8, W/8)."""
        return self.encoder(x01)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images, roughly in [0, 1] (not clamped)."""
        return self.decoder(z)


def load_strict(module: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors file into `module`: the same keys and shapes or CheckpointError,
    naming the file and the offending keys."""
    state = ckpt.load_tensors(path.parent, path.name.removesuffix(".safetensors"))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise ckpt.CheckpointError(f"{path}: does not match the TAEF2 network ({detail})")
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module


def load_taef2(directory: str | Path = WEIGHTS) -> TAEF2:
    """The pretrained TAEF2 (fp32, eval mode) from taef2_encoder/decoder.safetensors in `directory`."""
    directory = Path(directory)
    ae = TAEF2()
    load_strict(ae.encoder, directory / f"{ENCODER_FILE}.safetensors")
    load_strict(ae.decoder, directory / f"{DECODER_FILE}.safetensors")
    return ae.eval()
