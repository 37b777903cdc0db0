"""Benchmark: every listed variant on the same frames, one table (bench_rows runs a row,
bench_report writes the table and plot).

Cross-validated (`bench_folds`, `bench --train --folds K`): the frames are split into K
folds (`splits.assign_folds`: whole scenes per fold, OOD frames spread); for each fold every
family is trained and calibrated on the other folds' frames only (CKPT_ROOT/fold<i>) and
every row runs on the fold's frames, saving its score maps; the metrics are then pooled
over all folds' frames, exactly as one run over all of them would compute them.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bench_report import FOLD_COLUMNS, fold_notes, machine, pool_folds, write_csv, write_table
from .bench_rows import COLUMNS, parse_row, preload_libraries, row_process


def recorded_rows(root: Path) -> list[str]:
    """The rows of `bench --checkpoints CKPT_ROOT` without --variants: one per family checkpoint
    in CKPT_ROOT (CKPT_ROOT/<family>), the variant it was trained for, in registry order."""
    from ..core import checkpoint as ckpt
    from ..core.variants import FAMILY_DEFAULT_VARIANT, checkpoint_variant

    rows = [checkpoint_variant(ckpt.load_config(root / family)) for family in FAMILY_DEFAULT_VARIANT
            if (root / family / ckpt.CONFIG).is_file()]
    if not rows:
        raise ValueError(f"no checkpoint in {root} (CKPT_ROOT/<family>: "
                         f"{', '.join(FAMILY_DEFAULT_VARIANT)}): name the rows with --variants")
    return rows


def train_all(train_data: str, ckpt_root: Path, rows: list[str], steps: int, device: str,
              frames: str = "id", image_size: tuple[int, int] | None = None, preset: str = "small",
              seed: int = 0, names: Sequence[str] | None = None, *, calib_fraction: float) -> dict[str, float]:
    """Train each family that a row needs once on train_data (frames: id = ID frames only; with
    `names`, only those frames), calibrated for every variant of the rows on `calib_fraction` of
    the ID frames held out of its training; returns the seconds each family's `train` (fit and
    calibration) took."""
    from ..core.variants import get_variant
    from .training import TrainOptions, train

    seconds: dict[str, float] = {}
    variants = list(dict.fromkeys(parse_row(spec)[0] for spec in rows))
    for name in variants:
        family = get_variant(name).family
        if family in seconds:
            continue
        print(f"training {family} (for {name}) in {Path(ckpt_root) / family} ...", flush=True)
        t0 = time.perf_counter()
        train(train_data, Path(ckpt_root) / family,
              TrainOptions(variant=name, steps=steps, device=device, frames=frames, image_size=image_size,
                           preset=preset, seed=seed, calib_fraction=calib_fraction), names=names,
              also_calibrate=[v for v in variants if get_variant(v).family == family])
        seconds[family] = time.perf_counter() - t0
    return seconds


def bench(data: str, ckpt_root: str, rows: list[str], out: str, frames: str = "all", device: str = "cpu",
          max_frames: int = 0, timeout_s: float = 3600) -> list[dict]:
    results = []
    for spec in rows:
        print(f"benchmarking {spec} ...", flush=True)
        results.append(row_process(data, ckpt_root, spec, frames, device, max_frames, timeout_s))
        write_table(results, Path(out))  # after every row: a long run that is stopped keeps its rows
    return results


def claim_fold_root(fold_root: Path, test: list[str], train: list[str]) -> None:
    """Record which frames a fold's checkpoints may be trained on; refuse a folder whose
    checkpoints were trained on another split (resuming those would train on test frames)."""
    record = {"test_frames": test, "train_frames": train}
    path = fold_root / "frames.json"
    if path.is_file():
        if json.loads(path.read_text()) != record:
            raise ValueError(f"{fold_root} holds checkpoints of another fold assignment (see {path}); "
                             "use a new --checkpoints folder or delete it")
    elif fold_root.exists() and any(fold_root.iterdir()):
        raise ValueError(f"{fold_root} is not empty and has no frames.json: not a fold of this run; "
                         "use a new --checkpoints folder")
    fold_root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", spec)


def bench_folds(data: str, ckpt_root: str, rows: list[str], out: str, k: int, seed: int = 0, frames: str = "all",
                device: str = "cpu", max_frames: int = 0, train_steps: int = 3000, train_frames: str = "all",
                image_size: tuple[int, int] | None = None, preset: str = "small", timeout_s: float = 3600,
                *, calib_fraction: float) -> list[dict]:
    """K-fold cross-validated benchmark: for fold i, every family a row needs is trained and
    calibrated in CKPT_ROOT/fold<i> on the other folds' frames only (train_frames: all = OOD
    pixels masked out of the loss; id = OOD frames left out), then every row runs on fold i's
    frames (those of the `frames` kind, at most max_frames of them) in its own process and
    saves its score maps to OUT/fold<i>/. The table pools every fold's frames."""
    from ..core.data import open_dataset
    from ..core.splits import assign_folds, fold_info, select
    from ..core.variants import get_variant

    out_dir, root = Path(out), Path(ckpt_root)
    dataset = open_dataset(data)
    folds = assign_folds(dataset, k, seed)
    info = fold_info(dataset, folds, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "folds.json").write_text(json.dumps(info, indent=1))
    for i, fold in enumerate(info["folds"]):
        print(f"fold {i}: {len(fold['frames'])} frames ({len(fold['ood_frames'])} OOD), "
              f"scenes {', '.join(fold['scenes'])}: {' '.join(fold['frames'])}", flush=True)
    families = {spec: get_variant(parse_row(spec)[0]).family for spec in rows}
    of_kind = {f.name for f in select(dataset, frames)}
    preload_libraries()  # imported before the first fold's training, so its train_s does not include them
    times: dict[str, list[float]] = {}
    per_fold: list[dict] = []
    npz: list[list[Path]] = [[] for _ in rows]
    for i, test in enumerate(folds):
        train_names = sorted(n for j, fold in enumerate(folds) if j != i for n in fold)
        fold_root, fold_out = root / f"fold{i}", out_dir / f"fold{i}"
        if not of_kind.intersection(test):
            print(f"fold {i}: no frames of kind {frames!r} to test on; skipped", flush=True)
            continue
        claim_fold_root(fold_root, test, train_names)
        print(f"fold {i}: training on {len(train_names)} frames, testing on {len(test)}", flush=True)
        for family, s in train_all(data, fold_root, rows, train_steps, device, train_frames, image_size, preset,
                                   seed, train_names, calib_fraction=calib_fraction).items():
            times.setdefault(family, []).append(s)
        (out_dir / "train_times.json").write_text(json.dumps(
            {"seconds": times, "what": "engine.training.train per family and fold: fit, checkpoint, calibration",
             "steps": train_steps, "machine": machine(device)}, indent=1))
        fold_out.mkdir(parents=True, exist_ok=True)
        names_file = fold_out / "frames.json"
        names_file.write_text(json.dumps(test))
        for r, spec in enumerate(rows):
            print(f"fold {i}: benchmarking {spec} ...", flush=True)
            scores = fold_out / f"{r:02d}_{_slug(spec)}.npz"
            row = row_process(data, str(fold_root), spec, frames, device, max_frames, timeout_s, names_file, scores)
            per_fold.append(dict(row, fold=i, row=r))
            npz[r].append(scores)
        write_csv(per_fold, out_dir / "per_fold.csv", ("fold",) + COLUMNS)
    results = []
    for r, spec in enumerate(rows):
        folds_of_row = [f for f in per_fold if f["row"] == r]
        m = pool_folds(data, npz[r])
        aps = np.array([f["pixel_ap"] for f in folds_of_row], float)
        aps = aps[np.isfinite(aps)]
        row = {c: m[c] for c in COLUMNS + ("false_alarm_rate", "detection_rate") if c in m}
        row.update(variant=spec, model=folds_of_row[0]["model"], nfe=folds_of_row[0]["nfe"],
                   peak_mem_mb=max(f["peak_mem_mb"] for f in folds_of_row),
                   infer_mem_mb=max(f["infer_mem_mb"] for f in folds_of_row),
                   model_mb=float(np.mean([f["model_mb"] for f in folds_of_row])),
                   ap_fold_mean=float(aps.mean()) if aps.size else math.nan,
                   ap_fold_std=float(aps.std(ddof=1)) if aps.size > 1 else math.nan,
                   folds=len(folds_of_row), train_s=float(np.mean(times[families[spec]])))
        results.append({c: row[c] for c in FOLD_COLUMNS})
    write_table(results, out_dir, FOLD_COLUMNS, fold_notes(info, data, frames, max_frames, device))
    return results
