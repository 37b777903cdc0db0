"""Training of a variant's model and calibration of its thresholds (orchestration,
above the registry and the Detector).

`train()` runs the fit of the variant's family (Variant.fit in the registry: the
denoiser on ID pixels only, OOD pixels of labelled frames masked out of the loss,
augmentation, EMA, resumable state; see core/families/fitting.py) under `accelerate`, one
process or several (`accelerate launch -m ros_anomaly_diffusion train ...`), writes a
checkpoint folder (main process), then calibrates the mask and flag thresholds on held-out
ID frames (for opts.variant and any other variant of the family asked for).
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from ..config import variant_settings
from ..core import checkpoint as ckpt
from ..core.data import Frame, open_dataset
from ..core.detector import Detector, validate_frame
from ..core.families.fitting import TrainOptions, jsonable, make_accelerator, shard
from ..core.metrics import calibrate_threshold
from ..core.scorer import MomentScaled, ScoreOutput
from ..core.splits import select
from ..core.variants import family_variants, get_variant

log = logging.getLogger(__name__)


def split_calibration(frames: list[Frame], fraction: float, seed: int) -> tuple[list[Frame], list[Frame]]:
    """(training frames, held-out ID calibration frames); at least one frame each when possible."""
    id_frames = [f for f in frames if f.label_path is None or not f.is_ood()]
    k = min(len(id_frames) - 1, max(1, round(fraction * len(id_frames)))) if fraction > 0 else 0
    held = set(f.name for f in random.Random(seed).sample(id_frames, max(k, 0)))
    return [f for f in frames if f.name not in held], [f for f in id_frames if f.name in held]


def train(data: str | Path | Sequence, out_dir: str | Path, opts: TrainOptions, progress: bool = True,
          names: Collection[str] | None = None, also_calibrate: Sequence[str] = ()) -> Path:
    """Fit the model of `opts.variant`'s family, write the checkpoint, calibrate the thresholds
    of opts.variant and of the family's variants in `also_calibrate` (ddpm's 1000 steps a frame
    are not spent unless asked for; `calibrate` does it later).

    `data`: a RUGD-format or plain image folder, or frames already opened (e.g. the messages
    of a rosbag2, ros.bag.bag_frames). Each family's fit function (Variant.fit in the
    registry) takes the training frames and returns (config, {file name: state dict}); this
    function does the rest. With `names`, only the frames of data with those names are used
    at all (training and calibration): the cross-validated benchmark's training folds.
    """
    variant = get_variant(opts.variant)
    foreign = [v for v in also_calibrate if v not in family_variants(variant.family)]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} cannot run a {variant.family} checkpoint "
                         f"(its variants: {', '.join(family_variants(variant.family))})")
    out = Path(out_dir)
    frames = select(open_dataset(data) if isinstance(data, (str, Path)) else data, opts.frames, opts.scenes)
    if names is not None:
        names = set(names)
        frames = [f for f in frames if f.name in names]
    train_frames, calib_frames = split_calibration(frames, opts.calib_fraction, opts.seed)
    if not train_frames:
        raise ValueError(f"no training frames in {data} (frames={opts.frames}, scenes={opts.scenes})")
    torch.manual_seed(opts.seed)
    acc = make_accelerator(opts, out)
    if acc.is_main_process and opts.log_with:
        acc.init_trackers(f"{opts.variant}", config={k: v for k, v in jsonable(asdict(opts)).items()
                                                     if isinstance(v, (int, float, str, bool))})
    config, tensors = variant.fit(train_frames, out, opts, progress, acc)
    # which frames each process read (fitting.shard: the rule every family splits them by)
    by_process = gather_object([[train_frames[i].name for i in shard(len(train_frames), acc)]])
    config["variant"] = variant.name  # what the entry points run when no variant is given
    config.setdefault("training", {}).update(frames=[f.name for f in train_frames],
                                             options=jsonable(asdict(opts)), processes=acc.num_processes,
                                             frames_by_process=by_process)
    if acc.is_main_process:  # one writer; the other processes wait for the checkpoint
        ckpt.save(out, config, tensors)
        log.info("process %d of %d wrote the checkpoint %s", acc.process_index, acc.num_processes, out)
        if calib_frames:
            for name in [variant.name, *(v for v in also_calibrate if v != variant.name)]:
                calibrate(out, calib_frames, name, opts.mask_fpr, opts.frame_fpr, str(acc.device), progress)
        else:
            log.warning("no held-out ID frames: thresholds left at their defaults")
    acc.wait_for_everyone()
    acc.end_training()
    return out


def id_pixels(score: np.ndarray, frame: Frame) -> np.ndarray:
    """The values of a map (any size) on the frame's ID pixels (all of them when unlabelled)."""
    label = frame.label()
    if label is None:
        return score.ravel()
    return score[cv2.resize(label, score.shape[::-1], interpolation=cv2.INTER_NEAREST) == 0]


def score_moments(raw_maps: list[torch.Tensor], frames: list[Frame]) -> dict[str, float]:
    """Mean and standard deviation of a MomentScaled scorer's raw maps (one (1, H, W) per frame,
    at the analysis size) over the ID pixels of `frames`."""
    v = np.concatenate([id_pixels(m[0].float().cpu().numpy(), f).astype(np.float64) for m, f in zip(raw_maps, frames)])
    if v.size < 2:
        raise ValueError("no ID pixel in the calibration frames to measure the score's ID moments on")
    return {"mean": float(v.mean()), "std": max(float(v.std()), 1e-6)}


@torch.no_grad()
def calibrate(checkpoint_dir: str | Path, frames: list[Frame], variant: str = "", mask_fpr: float = 0.01,
              frame_fpr: float = 0.05, device: str = "cpu", progress: bool = True, **overrides) -> dict:
    """Set the mask and flag thresholds from ID frames; stored in the checkpoint per variant
    (empty: the one the checkpoint was trained for). The frames are scored with the variant's
    parameter file and `overrides` (Settings fields), which should be what the node will run.
    A MomentScaled scorer's (the pixel family's) ID score moments are measured on the same
    frames' raw maps, which are then scaled with them for the thresholds (one network pass a
    frame), and stored with the thresholds ("score_moments"). Fewer than 1 / frame_fpr frames
    cannot place the flag's threshold at that rate: said in a warning."""
    # explicit thresholds: only the scores count here, and the uncalibrated warning is for users
    settings = variant_settings(variant, **dict(dict(checkpoint=str(checkpoint_dir), device=device,
                                                     mask_threshold=0.5, frame_threshold=0.5), **overrides))
    det = Detector(checkpoint_dir, settings)
    variant = det.variant.name
    bar = dict(desc=f"calibrating {variant}", disable=not progress)

    def decoded(f: Frame) -> np.ndarray:
        rgb = f.rgb()
        validate_frame(rgb)
        return rgb

    moments = None
    if isinstance(det.scorer, MomentScaled):  # its raw maps give its scale, then the thresholds
        raw = [det.scorer.raw_maps(det.to_model([decoded(f)]))[0] for f in tqdm(frames, **bar)]
        moments = det.scorer.moments = score_moments(raw, frames)
        # decoded again rather than held: a calibration set's full-size frames need not fit in memory
        scored = ((f.rgb(), ScoreOutput(det.scorer.scaled(m), None)) for f, m in zip(frames, raw))
    else:
        scored = ((rgb, det.scorer(det.to_model([rgb]))) for rgb in map(decoded, tqdm(frames, **bar)))
    pixel_scores, frame_scores = [], []
    for f, (rgb, out) in zip(frames, scored):
        r = det.post_process([rgb], out)[0]
        pixel_scores.append(id_pixels(r.score, f))
        frame_scores.append(r.frame_score)
    if 0 < frame_fpr and len(frames) * frame_fpr < 1:
        log.warning("%s: the flag's threshold comes from %d ID frame(s), too few for frame_fpr %g (%d or more): "
                    "it is near their highest frame score, and about 1 in %d or more unseen ID frames will "
                    "exceed it; calibrate on more ID frames", variant, len(frames), frame_fpr,
                    math.ceil(1 / frame_fpr), len(frames) + 1)
    result = {"mask_threshold": calibrate_threshold(np.concatenate(pixel_scores), mask_fpr),
              "frame_threshold": calibrate_threshold(np.array(frame_scores), frame_fpr),
              "frames": [f.name for f in frames], "mask_fpr": mask_fpr, "frame_fpr": frame_fpr}
    if moments is not None:
        result["score_moments"] = moments
    calibration = dict(det.config.get("calibration", {}), **{variant: result})
    ckpt.update_config(checkpoint_dir, calibration=calibration)
    return result
