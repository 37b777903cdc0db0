"""Denoising networks behind one call signature: net(x_t, t).

Two designs, each with size presets; `build_denoiser` turns a checkpoint's {"kind", "config"}
into any of them and `load_denoiser` loads a checkpoint's weights into it, so no loader needs a
family module. `runtime_denoiser` is what a scorer runs: the loaded network, quantized as the
settings ask (quantization.py) on the settings' backend (backends.py).

* Bounded receptive field (`LocalDenoiser`, kinds "cell" and "local"): residual blocks of
  1x1 ("cell": an MLP per location) or 3x3 ("local") convolutions with a timestep
  embedding, optionally behind a space-to-depth stem. The output at a location depends
  on the input within `receptive_field` of it and nowhere else, so what the model learns
  is what a *patch* of ID terrain looks like: a dozen frames give thousands of patches,
  and a network trained on crops runs unchanged on whole frames. The editing families'
  default (method notes, section 5).
* Scene-level (diffusers' UNet2DModel with attention, the latent family's DiT): whole-frame
  context, for teams with thousands of frames and a GPU.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .. import checkpoint as ckpt
from ..settings import EAGER, ComputeSettings
from . import quantization as Q
from .backends import with_backend

log = logging.getLogger(__name__)

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

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x.shape[0])
        h, w = x.shape[-2:]
        # return_dict=False: the output dataclass of this legacy model warns on every call
        out = self.net(pad_to(x, self.patch_size), timestep=t.to(x.device), return_dict=False)[0]
        return out[..., :h, :w]


# Bounded-receptive-field presets: (width, residual blocks). "cell" (1x1) is an MLP per
# location; "local" (3x3) blocks widen the receptive field by 4 stem cells each.
LOCAL_PRESETS = {
    "cell": {"tiny": (64, 2), "small": (256, 3), "medium": (512, 4), "reference": (768, 6)},
    "local": {"tiny": (32, 2), "small": (64, 4), "medium": (96, 6), "reference": (128, 8)},
}


def local_config(kind: str, preset: str, in_channels: int, stem: int = 1, receptive_field: int | None = None
                 ) -> dict:
    """Config of a LocalDenoiser of `kind` ("cell" or "local"). With `receptive_field` (local
    only: the side, in input cells, of the window an output cell sees), the number of
    blocks is the fewest that reach it instead of the preset's."""
    if kind not in LOCAL_PRESETS:
        raise ValueError(f"unknown bounded-receptive-field kind {kind!r}; choose one of {sorted(LOCAL_PRESETS)}")
    if preset not in LOCAL_PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose one of {sorted(LOCAL_PRESETS[kind])}")
    width, blocks = LOCAL_PRESETS[kind][preset]
    if receptive_field is not None:
        if kind == "cell":
            raise ValueError("a 'cell' denoiser sees one cell (receptive_field 1); use kind 'local' for more")
        # side = stem * (4 * blocks + 2) - 1 (see LocalDenoiser.receptive_field)
        blocks = max(1, math.ceil(((receptive_field + 1) / stem - 2) / 4))
    return dict(in_channels=in_channels, width=width, blocks=blocks, kernel_size=1 if kind == "cell" else 3,
                stem=stem)


def receptive_field(config: dict) -> int:
    """Side (input cells) of the window, centred on an output cell, that a LocalDenoiser of
    `config` depends on: each k x k convolution reaches (k - 1) / 2 stem cells further, and a
    stem cell spans s input cells, the output cell anywhere in it."""
    radius = config["blocks"] * (config["kernel_size"] - 1)  # stem cells, two convolutions a block
    return config["stem"] * (2 * radius + 2) - 1


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each location. Not GroupNorm: its statistics span the
    whole grid, so a change anywhere would reach every output and no receptive field would
    bound what the model sees."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """x + conv2(silu(norm(conv1(silu(norm(x))) + time))): two k x k convolutions."""

    QUANTIZABLE = ("conv1", "conv2")  # the layers weight-only quantization's "selected" rule takes

    def __init__(self, width: int, time_dim: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.norm1, self.norm2 = ChannelNorm(width), ChannelNorm(width)
        self.conv1 = nn.Conv2d(width, width, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(width, width, kernel_size, padding=pad)
        self.time = nn.Linear(time_dim, width)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[..., None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class LocalDenoiser(nn.Module):
    """Fully convolutional denoiser with a bounded receptive field (kinds "cell" and "local").

    stem s > 1 folds s x s input cells into one (space-to-depth) and unfolds the output, so
    the grid must be a multiple of s (replicate-padded and cropped back otherwise)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c, width, k, s = config["in_channels"], config["width"], config["kernel_size"], config["stem"]
        self.kind = "cell" if k == 1 else "local"
        self.stem = s
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.conv_in = nn.Conv2d(c * s * s, width, 1)
        self.blocks = nn.ModuleList(ResidualBlock(width, width, k) for _ in range(config["blocks"]))
        self.norm_out = ChannelNorm(width)
        self.conv_out = nn.Conv2d(width, c * s * s, 1)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.config)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(self.time_proj(t.to(x.device)).to(x.dtype))
        h, w = x.shape[-2:]
        y = F.pixel_unshuffle(pad_to(x, self.stem), self.stem) if self.stem > 1 else x
        y = self.conv_in(y)
        for block in self.blocks:
            y = block(y, temb)
        y = self.conv_out(F.silu(self.norm_out(y)))
        return F.pixel_shuffle(y, self.stem)[..., :h, :w] if self.stem > 1 else y


KINDS = {"unet": UNetDenoiser, "dit": DiTDenoiser, "cell": LocalDenoiser, "local": LocalDenoiser}


def build_denoiser(kind: str, config: dict) -> nn.Module:
    """The untrained network of a checkpoint's {"kind", "config"} (config.json "denoiser")."""
    if kind not in KINDS:
        raise ValueError(f"unknown denoiser kind {kind!r} (expected one of {sorted(KINDS)})")
    return KINDS[kind](config)


def load_denoiser(directory: str | Path, config: dict, name: str = "denoiser") -> nn.Module:
    """The network of config["denoiser"] with `<name>.safetensors` loaded, as it was written: a
    checkpoint written quantized (`ros-anomaly-diffusion quantize`) gets its quantized layers
    first, and tensors of another dtype than the network expects are refused. On the CPU, eval."""
    net = build_denoiser(config["denoiser"]["kind"], config["denoiser"]["config"])
    entry = Q.checkpoint_quantization(directory, config)
    q = Q.of_file(entry, name)
    if q is not None:
        Q.prepare_for_quantized_state(net, q["precision"], q["layers"])
    try:
        ckpt.load_into(net, directory, name)
    except ckpt.CheckpointError as err:
        hint = Q.quantization_hint(directory, name, entry)
        raise ckpt.CheckpointError(f"{err}; {hint}") from err
    Q.check_dtypes(net, directory, name)
    return net.eval()


def tensorrt_shape(config: dict) -> tuple[int, ...] | None:
    """The one input shape TensorRT compiles a checkpoint's denoiser for: the UNet's sample size,
    a pixel model's frame size; None for the others (exported as ONNX for trtexec instead)."""
    cfg, kind = config["denoiser"]["config"], config["denoiser"]["kind"]
    size = cfg.get("sample_size") if kind == "unet" else (config.get("image_size") if config.get("family") == "pixel"
                                                          else None)
    return (1, cfg["in_channels"], *size) if size else None


def runtime_denoiser(directory: str | Path, config: dict, device: torch.device | str,
                     compute: ComputeSettings = EAGER, name: str = "denoiser") -> nn.Module:
    """A checkpoint's denoiser as a scorer runs it: `load_denoiser`, quantized as `compute` asks
    (quantization.quantize_as_asked), on `device` and compute.backend with compute.precision
    (backends.with_backend; by default unquantized, torch eager, fp32)."""
    net = Q.quantize_as_asked(load_denoiser(directory, config, name), directory, config, compute, name)
    net, how = with_backend(net.to(device), compute.backend, device, shape=tensorrt_shape(config),
                            precision=compute.precision)
    log.info("denoiser runs on %s", how)
    return net
