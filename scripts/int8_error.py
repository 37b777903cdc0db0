#!/usr/bin/env python3
"""How far int8 weights move a pixel checkpoint's denoiser (docs/results.md, ddim int8): the
relative squared error of its output, int8 against fp32, on frames noised to a few timesteps,
for the package's per-output-channel scales and for finer groups of G weights per scale
(group-wise scales, the usual next step for weight-only int8; simulated here, not shipped).

usage: scripts/int8_error.py PIXEL_CHECKPOINT DATA   (the checkpoint's own training frames are used)
"""
import copy
import sys

import torch
import torch.nn.functional as F

from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.networks import quantization as Q
from ros_anomaly_diffusion.core.networks.denoisers import load_denoiser
from ros_anomaly_diffusion.core.samplers import NoiseSchedule, ScheduleConfig

TIMESTEPS = (100, 300, 600, 900)


def rounded(w: torch.Tensor, group: int) -> torch.Tensor:
    """w through symmetric int8 with one scale per `group` consecutive weights of an output channel."""
    flat = w.reshape(w.shape[0], -1, group)
    amax = flat.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return ((flat / scale).round().clamp(-127, 127) * scale).reshape(w.shape)


@torch.no_grad()
def main(directory: str, data: str) -> None:
    torch.manual_seed(0)
    config = ckpt.load_config(directory)
    net = load_denoiser(directory, config)
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    names = set(config["training"]["frames"])
    frames = [f for f in open_dataset(data) if f.name in names][:4]
    x = torch.stack([torch.from_numpy(f.rgb()).permute(2, 0, 1).float() / 255 for f in frames])
    x = F.interpolate(x, size=tuple(config["image_size"]), mode="area") * 2 - 1
    noise = torch.randn_like(x)
    noised = {t: schedule.add_noise(x, noise, torch.full((len(x),), t)) for t in TIMESTEPS}
    ref = {t: net(noised[t], t) for t in TIMESTEPS}
    print("relative squared output error at t =", ", ".join(map(str, TIMESTEPS)))
    for group in (None, 64, 16):
        q = copy.deepcopy(net)
        for name in Q.selected_layer_names(q):
            layer = q.get_submodule(name)
            # per output channel: the package's own int8 layer, dequantised
            layer.weight.copy_(Q.QuantizedConv2d.from_float(layer).dequantized_weight() if group is None
                               else rounded(layer.weight, group))
        errors = [float((q(noised[t], t) - ref[t]).square().mean() / ref[t].square().mean()) for t in TIMESTEPS]
        label = "per output channel (the package's)" if group is None else f"groups of {group}"
        print(f"{label}: " + ", ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
