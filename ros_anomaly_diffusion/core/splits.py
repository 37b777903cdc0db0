"""Which frames a command uses: the RUGD scene split, the ID/OOD frame split and the folds of
cross-validation (scene-grouped, OOD frames spread)."""
from __future__ import annotations

import random
from collections.abc import Sequence

from .data import Frame

# Reference scene split of the method notes (sec. 3); frames are named <scene>_<frame>.
RUGD_SCENES = {
    "train": ("park-2", "trail", "trail-3", "trail-4", "trail-6", "trail-9", "trail-10", "trail-11",
              "trail-12", "trail-14", "trail-15"),
    "val": ("park-8", "trail-5"),
    "test": ("creek", "park-1", "trail-7", "trail-13"),
}
FRAME_KINDS = ("all", "id", "ood")


def scene_of(frame: Frame) -> str:
    return frame.name.rsplit("_", 1)[0]


def select(frames: Sequence[Frame], kind: str = "all", scenes: str = "all") -> list[Frame]:
    """Frames of the given kind (all, id: < 100 OOD pixels, ood: >= 100) in the given scene split."""
    if kind not in FRAME_KINDS:
        raise ValueError(f"frames must be one of {FRAME_KINDS}, got {kind!r}")
    if scenes != "all" and scenes not in RUGD_SCENES:
        raise ValueError(f"scenes must be 'all' or one of {sorted(RUGD_SCENES)}, got {scenes!r}")
    chosen = [f for f in frames if scenes == "all" or scene_of(f) in RUGD_SCENES[scenes]]
    if kind != "all":
        unlabelled = [f.name for f in chosen if f.label_path is None]
        if unlabelled:
            raise ValueError(f"frames={kind!r} needs labels; unlabelled: {unlabelled[:3]}")
        chosen = [f for f in chosen if f.is_ood() == (kind == "ood")]
    return chosen


def assign_folds(frames: Sequence, k: int, seed: int = 0) -> list[list[str]]:
    """Split labelled frames into k folds of frame names (each sorted), seeded and deterministic.

    Frames of one scene (`splits.scene_of`: the name before the last '_') go to the same fold,
    so near-duplicate frames of a scene never straddle training and test. Only when there are
    fewer scenes than folds are scenes cut, the largest first, into two runs of consecutive
    frames (each with an OOD frame where it has two or more, then as even as possible).
    Whole scenes are then dealt greedily: scenes with OOD frames first (most OOD frames,
    then most frames first; equal ones in a seeded random order), each to the fold with the
    fewest OOD frames so far (then the fewest frames); scenes without OOD frames to the fold
    with the fewest frames. Every fold gets at least one scene and, when there are at least
    k OOD frames in k or more scenes, at least one OOD frame (is_ood: >= 100 OOD pixels).
    """
    frames = sorted(frames, key=lambda f: f.name)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if len(frames) < k:
        raise ValueError(f"{len(frames)} frames cannot make {k} folds")
    unlabelled = [f.name for f in frames if f.label_path is None]
    if unlabelled:
        raise ValueError(f"cross-validation needs labelled frames; unlabelled: {unlabelled[:3]}")
    ood = {f.name: bool(f.is_ood()) for f in frames}
    scenes: dict[str, list[str]] = {}
    for f in frames:
        scenes.setdefault(scene_of(f), []).append(f.name)
    units = list(scenes.values())
    while len(units) < k:
        units.sort(key=len, reverse=True)  # stable: of equally long scenes the first by name
        units = _cut(units[0], ood) + units[1:]
    def n_ood(unit: list[str]) -> int:
        return sum(ood[n] for n in unit)

    random.Random(seed).shuffle(units)
    units.sort(key=lambda u: (-n_ood(u), -len(u)))  # stable: the seeded order among equal scenes
    folds: list[list[str]] = [[] for _ in range(k)]
    fold_ood = [0] * k
    for u in units:
        if n_ood(u):
            i = min(range(k), key=lambda j: (fold_ood[j], len(folds[j])))
        else:
            i = min(range(k), key=lambda j: (len(folds[j]), fold_ood[j]))
        folds[i] += u
        fold_ood[i] += n_ood(u)
    return [sorted(f) for f in folds]


def _cut(names: list[str], ood: dict[str, bool]) -> list[list[str]]:
    """Two runs of consecutive frames: each with an OOD frame if there are two, then even."""
    total = sum(ood[n] for n in names)

    def cost(c: int) -> tuple:
        left = sum(ood[n] for n in names[:c])
        return (total >= 2 and not 0 < left < total, abs(2 * c - len(names)), abs(2 * left - total))

    c = min(range(1, len(names)), key=cost)
    return [names[:c], names[c:]]


def fold_info(frames: Sequence, folds: list[list[str]], seed: int) -> dict:
    """The fold assignment as recorded in folds.json and results.md."""
    by_name = {f.name: f for f in frames}
    return {"k": len(folds), "seed": seed, "folds": [
        {"frames": names, "ood_frames": [n for n in names if by_name[n].is_ood()],
         "scenes": sorted({scene_of(by_name[n]) for n in names})} for names in folds]}
