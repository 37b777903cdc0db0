"""`ros-anomaly-diffusion quantize`: a checkpoint's copy with its denoiser weights quantized
(core/networks/quantization.py), every other file and the config copied."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core import checkpoint as ckpt
from ..core.networks.denoisers import load_denoiser
from ..core.networks.quantization import QUANTIZED_FILES, check_precision, quantize_denoiser


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, precision: str,
                        layers: str = "selected") -> Path:
    """Write a copy of checkpoint `src_dir` to `out_dir` with its denoiser file(s) quantized.

    Every other file (autoencoder, ...) and the whole config (calibration included)
    are copied unchanged; config["quantization"] records what was done.
    """
    check_precision(precision, layers)
    src, out = Path(src_dir), Path(out_dir)
    config = ckpt.load_config(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: write the quantized checkpoint to a new folder, not over its source")
    if config.get("quantization"):
        raise ckpt.CheckpointError(f"{src / ckpt.CONFIG}: already quantized ({config['quantization']})")
    names = [Path(f).stem for f in config.get("files", []) if f.endswith(".safetensors")]
    todo = [n for n in names if n in QUANTIZED_FILES]
    if not todo:
        raise ckpt.CheckpointError(f"{src / ckpt.CONFIG}: a {config.get('family')!r} checkpoint, with no denoiser "
                                   f"file to quantize (files: {names})")
    if "denoiser" not in config:
        raise ckpt.CheckpointError(f"{src / ckpt.CONFIG}: no 'denoiser' entry describing the network")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for n in names:
        if n in todo:
            net = load_denoiser(src, config, name=n)
            tensors[n] = quantize_denoiser(net, config, precision, layers).state_dict()
        else:
            tensors[n] = ckpt.load_tensors(src, n)
    config = {k: v for k, v in config.items() if k not in ("format", "files")}
    config["quantization"] = {"precision": precision, "layers": layers, "files": todo}
    return ckpt.save(out, config, tensors)
