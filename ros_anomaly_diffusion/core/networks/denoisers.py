"""Denoising networks (diffusers models) behind one call signature: net(x_t, t).

The pixel- and feature-space UNet and the latent family's DiT, with their size presets;
`build_denoiser` turns a checkpoint's {"kind", "config"} into either, so the one loader
(quantization.load_denoiser) needs no family module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel, UNet2DModel
from torch import nn

# UNet width presets by the space the UNet denoises. Pixels: "reference" is the original
# work's network (about 36M parameters), "small" fits a CPU, "tiny" is for tests.
# Backbone features (16x20 cells at 256x320): one down level (16x20 -> 8x10), no
# attention; "small" keeps S = 3 (2 network calls) plus the backbone within ~66 ms a
# frame on 2 CPU cores.
UNET_PRESETS = {
    "pixel": {
        "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=8),
        "small": dict(block_out_channels=(16, 32, 64), layers_per_block=1, attention_levels=(2,), norm_num_groups=8),
        "medium": dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_levels=(2,),
                       norm_num_groups=16),
        "reference": dict(block_out_channels=(64, 128, 256, 512), layers_per_block=2, attention_levels=(3,),
                          norm_num_groups=32),
    },
    "features": {
        "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
        "small": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16),
        "medium": dict(block_out_channels=(128, 256), layers_per_block=1, norm_num_groups=32),
        "reference": dict(block_out_channels=(128, 256), layers_per_block=2, norm_num_groups=32),
    },
}
_ATTENTION_HEAD_DIM = {"pixel": 8, "features": 32}

# Diffusion-transformer sizes of the latent family (hidden width = heads * head_dim); "reference"
# is DiT-S.
DIT_PRESETS = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16),
    "small": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32),
    "medium": dict(num_layers=8, num_attention_heads=6, attention_head_dim=64),
    "reference": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
}


def unet_config(space: str, preset: str, in_channels: int, sample_size: tuple[int, int] | None = None) -> dict:
    """A diffusers UNet2DModel config (plain dict, stored in the checkpoint) of a UNet that
    denoises `space` ("pixel" or "features") with `in_channels` channels."""
    presets = UNET_PRESETS[space]
    if preset not in presets:
        raise ValueError(f"unknown UNet preset {preset!r} for {space}; choose one of {sorted(presets)}")
    p = presets[preset]
    levels = len(p["block_out_channels"])
    attention = p.get("attention_levels", ())
    down = ["AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if levels - 1 - i in attention else "UpBlock2D" for i in range(levels)]
    return dict(
        sample_size=list(sample_size) if sample_size else None,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=list(p["block_out_channels"]),
        layers_per_block=p["layers_per_block"],
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=p["norm_num_groups"],
        attention_head_dim=_ATTENTION_HEAD_DIM[space],
    )


class UNetDenoiser(nn.Module):
    """Pixel- or feature-space denoiser: diffusers UNet2DModel, unconditional."""

    kind = "unet"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.net = UNet2DModel(**self.config)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        return self.net(x, t).sample


def pad_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Replicate-pad (bottom, right) to a multiple of `factor`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def dit_config(preset: str, latent_channels: int, grid: tuple[int, int], patch_size: int = 1) -> dict:
    """diffusers Transformer2DModel kwargs: a DiT with adaLN-single, timestep-only conditioning."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    p = DIT_PRESETS[preset]
    return dict(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=p["num_layers"],
        num_attention_heads=p["num_attention_heads"],
        attention_head_dim=p["attention_head_dim"],
        patch_size=patch_size,
        sample_size=max(grid),
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        cross_attention_dim=None,
        caption_channels=None,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1,
        num_embeds_ada_norm=1000,
    )


class DiTDenoiser(nn.Module):
    """Unconditional latent denoiser: net(z_t, t) -> model output (v or eps), same shape.

    Why diffusers' `Transformer2DModel` with norm_type "ada_norm_single" and not
    `DiTTransformer2DModel`: the latter is class-conditional (AdaLN-Zero needs class
    labels, so unconditional use would mean a dummy constant label) and, worse, it
    un-patchifies with height = width = sqrt(tokens), i.e. only square latent grids,
    while camera frames give e.g. 8x10. Transformer2DModel with adaLN-single is the same
    DiT block stack (patch embedding + fixed 2-D sin-cos positions, self-attention,
    MLP, adaptive LayerNorm modulation from one shared timestep MLP, as in PixArt-alpha)
    conditioned on the timestep only, and it un-patchifies with the true (h, w). With
    cross_attention_dim=None the blocks have no cross-attention, so nothing but x_t and
    t goes in. Grids that are not a multiple of patch_size are replicate-padded and the
    output cropped back.
    """

    kind = "dit"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.net = Transformer2DModel(**self.config)
        self.patch_size = int(self.config["patch_size"])

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x.shape[0])
        h, w = x.shape[-2:]
        # return_dict=False: the output dataclass of this legacy model warns on every call
        out = self.net(pad_to(x, self.patch_size), timestep=t.to(x.device), return_dict=False)[0]
        return out[..., :h, :w]


def build_denoiser(kind: str, config: dict) -> nn.Module:
    if kind == "unet":
        return UNetDenoiser(config)
    if kind == "dit":
        return DiTDenoiser(config)
    raise ValueError(f"unknown denoiser kind {kind!r} (expected 'unet' or 'dit')")
