"""Weight-only quantization of the denoiser: fp16 or int8, on selected layers or all.

Selected layers are the bulk of the network's weights that tolerate low precision:
attention projections (to_q, to_k, to_v, to_out.0 of every diffusers `Attention`),
ResNet convolutions (conv1, conv2, conv_shortcut of every `ResnetBlock2D`, conv1 and
conv2 of the bounded-receptive-field denoisers' `ResidualBlock`) and the
feed-forward Linears of transformer blocks (`FeedForward`, the DiT). Never selected:
norms, biases, time embeddings (and the time projections inside ResNet blocks),
the first and last layers (conv_in / conv_out, pos_embed / proj_out), up- and
down-sampling convolutions, adaLN modulation. "all" takes every Conv2d and Linear.
Per family: the pixel UNet gives ResNet convs and attention projections, the latent
family's DiT its attention projections and feed-forward layers, the feature_diffusion family's
UNet (no attention in its down/up blocks) its ResNet convs and mid-block attention projections,
the "cell" and "local" denoisers their residual blocks' convolutions.

A block of the package's own networks names its selected layers in a class attribute
`QUANTIZABLE` (networks/denoisers.py's ResidualBlock: conv1, conv2). A denoiser is loaded as
stored by denoisers.load_denoiser (a quantized checkpoint's layers rebuilt first,
`prepare_for_quantized_state`, and its dtypes checked, `check_dtypes`); `quantize_as_asked`
then applies what the settings ask for. engine/quantize.py writes quantized checkpoints.

int8 is real int8: per-output-channel symmetric scales (scale = max|w| / 127), the
weight stored as a torch.int8 buffer in memory and in the safetensors file, and
dequantised one layer at a time in the forward pass (`weight_int8.float() * scale`,
then the input's dtype). fp16 stores the weight as float16 and computes in the
input's dtype. Biases stay float32 in both. Weights are buffers, not parameters:
these modules are for inference, and diffusers' `ModelMixin.dtype` (the first
floating-point *parameter*) stays float32, so the time embedding is not silently
cast to fp16 on the CPU.

A quantized checkpoint records `config["quantization"] = {"precision", "layers",
"files"}`; `prepare_for_quantized_state` rebuilds the module structure so that its
state dict loads with an exact key, shape and dtype match.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .. import checkpoint as ckpt
from ..settings import ComputeSettings

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
LAYERS = ("selected", "all")
QUANTIZED_FILES = ("denoiser",)  # checkpoint files that hold a denoiser; the only ones quantized

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
RESNET_CONVS = ("conv1", "conv2", "conv_shortcut")


def check_precision(precision: str, layers: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {list(LAYERS)}, got {layers!r}")


# --------------------------------------------------------------------------- layer selection

def _is_weight_layer(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, QuantizedLinear, QuantizedConv2d, Fp16Linear, Fp16Conv2d))


def selected_layer_names(net: nn.Module, layers: str = "selected") -> list[str]:
    """Names (as in `net.named_modules()`) of the layers `quantize` replaces.

    Works on any module: the rules are by diffusers block class (Attention,
    ResnetBlock2D, FeedForward), so conv_in/conv_out, time embeddings, norms,
    Downsample2D/Upsample2D convs, patch embedding, adaLN and output projections are
    left out because they are not inside such a block. Already-quantized layers
    count as their float counterparts, so the answer is the same before and after.
    """
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {list(LAYERS)}, got {layers!r}")
    if layers == "all":
        return [n for n, m in net.named_modules() if _is_weight_layer(m)]
    chosen: set[str] = set()
    for name, m in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, Attention):
            for attr in ATTENTION_PROJECTIONS:
                if _is_weight_layer(getattr(m, attr, None)):
                    chosen.add(prefix + attr)
            out = getattr(m, "to_out", None)
            if isinstance(out, nn.ModuleList) and len(out) and _is_weight_layer(out[0]):
                chosen.add(prefix + "to_out.0")
        elif isinstance(m, ResnetBlock2D) or hasattr(type(m), "QUANTIZABLE"):
            for attr in RESNET_CONVS if isinstance(m, ResnetBlock2D) else type(m).QUANTIZABLE:
                if _is_weight_layer(getattr(m, attr, None)):
                    chosen.add(prefix + attr)
        elif isinstance(m, FeedForward):
            chosen.update(prefix + n for n, sub in m.named_modules() if n and _is_weight_layer(sub))
    # Keep the order of the network.
    return [n for n, _ in net.named_modules() if n in chosen]


# --------------------------------------------------------------------------- quantized modules

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale of shape (out,)).

    |w - q * scale| <= scale / 2 for every element; an all-zero channel gets scale 1
    and q = 0 (no division by zero).
    """
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with non-finite values")
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _bias(module: nn.Module, out_features: int, bias: torch.Tensor | None, has_bias: bool) -> None:
    if has_bias:
        b = bias.detach().float().clone() if bias is not None else torch.zeros(out_features)
        module.bias = nn.Parameter(b, requires_grad=False)
    else:
        module.register_parameter("bias", None)


class QuantizedLinear(nn.Module):
    """nn.Linear with an int8 weight and per-output-channel float32 scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        _bias(self, out_features, None, bias)

    @classmethod
    def from_float(cls, m: nn.Linear) -> "QuantizedLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.weight_int8, q.weight_scale = quantize_per_channel(m.weight)
        _bias(q, m.out_features, m.bias, m.bias is not None)
        return q.to(m.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class _ConvGeometry(nn.Module):
    """Stride, padding, dilation, groups and padding mode of a Conv2d, and its forward."""

    def _copy_geometry(self, m: nn.Conv2d) -> None:
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.kernel_size, self.stride, self.padding = m.kernel_size, m.stride, m.padding
        self.dilation, self.groups, self.padding_mode = m.dilation, m.groups, m.padding_mode
        self._reversed_padding_repeated_twice = m._reversed_padding_repeated_twice

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class QuantizedConv2d(_ConvGeometry):
    """nn.Conv2d with an int8 weight and per-output-channel float32 scales."""

    def __init__(self, m: nn.Conv2d):
        super().__init__()
        self._copy_geometry(m)
        self.register_buffer("weight_int8", torch.zeros(tuple(m.weight.shape), dtype=torch.int8,
                                                        device=m.weight.device))
        self.register_buffer("weight_scale", torch.ones(m.weight.shape[0], dtype=torch.float32,
                                                        device=m.weight.device))
        _bias(self, m.out_channels, None, m.bias is not None)

    @classmethod
    def from_float(cls, m: nn.Conv2d) -> "QuantizedConv2d":
        q = cls(m)
        q.weight_int8, q.weight_scale = quantize_per_channel(m.weight)
        _bias(q, m.out_channels, m.bias, m.bias is not None)
        return q.to(m.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale.float()[:, None, None, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.dequantized_weight(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 per-channel"


class Fp16Linear(nn.Module):
    """nn.Linear with its weight stored as float16, computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))
        _bias(self, out_features, None, bias)

    @classmethod
    def from_float(cls, m: nn.Linear) -> "Fp16Linear":
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.weight = m.weight.detach().to(torch.float16).contiguous()
        _bias(q, m.out_features, m.bias, m.bias is not None)
        return q.to(m.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weight"


class Fp16Conv2d(_ConvGeometry):
    """nn.Conv2d with its weight stored as float16, computed in the input's dtype."""

    def __init__(self, m: nn.Conv2d):
        super().__init__()
        self._copy_geometry(m)
        self.register_buffer("weight", torch.zeros(tuple(m.weight.shape), dtype=torch.float16,
                                                   device=m.weight.device))
        _bias(self, m.out_channels, None, m.bias is not None)

    @classmethod
    def from_float(cls, m: nn.Conv2d) -> "Fp16Conv2d":
        q = cls(m)
        q.weight = m.weight.detach().to(torch.float16).contiguous()
        _bias(q, m.out_channels, m.bias, m.bias is not None)
        return q.to(m.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp16 weight"


QUANTIZED_TYPES = (QuantizedLinear, QuantizedConv2d, Fp16Linear, Fp16Conv2d)


def _replacement(m: nn.Module, precision: str, with_weights: bool) -> nn.Module:
    if isinstance(m, QUANTIZED_TYPES):
        raise ValueError(f"layer is already quantized ({type(m).__name__})")
    if isinstance(m, nn.Linear):
        cls = QuantizedLinear if precision == "int8" else Fp16Linear
        if with_weights:
            return cls.from_float(m)
        return cls(m.in_features, m.out_features, m.bias is not None).to(m.weight.device)
    if isinstance(m, nn.Conv2d):
        cls = QuantizedConv2d if precision == "int8" else Fp16Conv2d
        return cls.from_float(m) if with_weights else cls(m)
    raise TypeError(f"cannot quantize a {type(m).__name__} (only Linear and Conv2d)")


def _swap(net: nn.Module, precision: str, layers: str, with_weights: bool) -> nn.Module:
    check_precision(precision, layers)
    already = [n for n, m in net.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    if already:
        raise ValueError(f"network is already quantized ({len(already)} layers, e.g. {already[0]})")
    for name in selected_layer_names(net, layers):
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        new = _replacement(parent.get_submodule(attr), precision, with_weights)
        new.train(parent.training)
        setattr(parent, attr, new)
    return net


@torch.no_grad()
def quantize(net: nn.Module, precision: str, layers: str = "selected") -> nn.Module:
    """Replace the chosen layers of `net` (in place) by fp16 or int8 ones; returns `net`."""
    return _swap(net, precision, layers, with_weights=True)


def prepare_for_quantized_state(net: nn.Module, precision: str, layers: str = "selected") -> nn.Module:
    """Give a freshly built float network the structure of a quantized one (weights left
    as placeholders), so the quantized state dict loads with exact keys, shapes and dtypes."""
    return _swap(net, precision, layers, with_weights=False)


# --------------------------------------------------------------------------- checkpoints

def _file_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype ("F32", "F16", "I8", ...) from the file's header only."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


def check_dtypes(module: nn.Module, directory: str | Path, name: str) -> None:
    """Refuse a file whose tensors have other dtypes than `module` expects (load_state_dict
    would otherwise cast silently: float weights into an int8 buffer, say)."""
    path = Path(directory) / f"{name}.safetensors"
    found = _file_dtypes(path)
    wrong = []
    for key, tensor in module.state_dict().items():
        want = _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
        if key in found and found[key] != want:
            wrong.append(f"{key} is {found[key]}, expected {want}")
    if wrong:
        raise ckpt.CheckpointError(
            f"{path}: tensor dtypes do not match the quantization described in {ckpt.CONFIG} "
            f"({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")


def checkpoint_quantization(directory: str | Path, config: dict) -> dict | None:
    """The validated `quantization` entry of a checkpoint config, or None."""
    q = config.get("quantization")
    if not q:
        return None
    where = Path(directory) / ckpt.CONFIG
    if not isinstance(q, dict) or q.get("precision") not in PRECISIONS or q.get("layers") not in LAYERS:
        raise ckpt.CheckpointError(f"{where}: invalid quantization entry {q!r} (expected precision in "
                                   f"{list(PRECISIONS)} and layers in {list(LAYERS)})")
    return q


def quantization_hint(directory: str | Path, name: str, q: dict | None) -> str:
    if q is not None:
        return f"{ckpt.CONFIG} says it is quantized ({q['precision']}, {q['layers']} layers)"
    try:
        dtypes = set(_file_dtypes(Path(directory) / f"{name}.safetensors").values())
    except ckpt.CheckpointError:
        return f"{ckpt.CONFIG} says it is not quantized"
    looks = " but the file holds int8 tensors" if "I8" in dtypes else ""
    return f"{ckpt.CONFIG} says it is not quantized{looks}"


def quantize_denoiser(net: nn.Module, config: dict, precision: str, layers: str) -> nn.Module:
    """`quantize`, refusing a denoiser in which the rule finds nothing: that would run
    float while the settings, the bench row or the checkpoint say quantized."""
    check_precision(precision, layers)
    if not selected_layer_names(net, layers):
        raise ValueError(f"{config.get('family')!r} family: quantize_layers={layers!r} selects no layer of its "
                         f"{config['denoiser']['kind']!r} denoiser, so quantization={precision!r} would do nothing")
    return quantize(net, precision, layers)


def stored_quantization(directory: str | Path, config: dict, name: str = "denoiser") -> dict | None:
    """The checkpoint's quantization entry when file `name` was written quantized, else None."""
    return of_file(checkpoint_quantization(directory, config), name)


def of_file(entry: dict | None, name: str) -> dict | None:
    """A validated quantization entry if it covers file `name`, else None."""
    return entry if entry is not None and name in entry.get("files", list(QUANTIZED_FILES)) else None


def quantize_as_asked(net: nn.Module, directory: str | Path, config: dict, compute: ComputeSettings,
                      name: str = "denoiser") -> nn.Module:
    """A loaded denoiser quantized as `compute.quantization` ("none", "fp16", "int8") with
    `compute.quantize_layers` asks; one written quantized (`quantize_checkpoint`) stays as it
    was written, with a warning when the settings ask for something else."""
    wanted, layers = compute.quantization, compute.quantize_layers
    if wanted == "none":
        return net
    q = stored_quantization(directory, config, name)
    if q is None:
        return quantize_denoiser(net, config, wanted, layers)
    if (wanted, layers) != (q["precision"], q["layers"]):
        log.warning("%s is already quantized (%s, %s layers): quantization=%s/%s ignored",
                    Path(directory), q["precision"], q["layers"], wanted, layers)
    return net


def weight_summary(module: nn.Module) -> str:
    """Size and storage types of a module's weights (parameters and buffers, largest share
    first), e.g. '0.41 MB int8+float32': what /diagnostics says of each network, so a robot's
    log shows whether quantization took."""
    by_dtype: dict[torch.dtype, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    kinds = "+".join(str(d).removeprefix("torch.") for d, _ in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
    return f"{sum(by_dtype.values()) / 2**20:.2f} MB {kinds}".rstrip()
