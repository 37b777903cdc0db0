"""RUGD-format datasets: colour-coded labels -> ID / OOD / ignore masks, frame listing.

A RUGD-format folder holds `images/`, `annotations/` (colour-coded RGB label PNGs with
the same file stem as the image) and a `*colormap*.txt` file with lines
`index name R G B`. A plain folder of images (no labels) is accepted too, so the same
code path serves recorded robot logs that were never annotated.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import cv2
import numpy as np

IGNORE = 255
ID, OOD = 0, 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# Method notes sec. 3: these classes never occur in the training scenes' "normal"
# appearance, so they are the anomalies; names as spelled in the RUGD colormap file.
OOD_CLASSES = frozenset(
    {"vehicle", "container/generic-object", "building", "bicycle", "person", "bridge", "picnic-table"}
)
# Void marks unannotated pixels; scoring them either way would be noise.
IGNORED_CLASSES = frozenset({"void"})
# Notes sec. 3: a frame with at least this many OOD pixels is an OOD frame.
MIN_OOD_PIXELS = 100

# The 25 RUGD classes (index, name, RGB) exactly as in RUGD_annotation-colormap.txt, so
# the synthetic generator can write a colormap file that real-data code reads unchanged.
RUGD_CLASSES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (0, "void", (0, 0, 0)),
    (1, "dirt", (108, 64, 20)),
    (2, "sand", (255, 229, 204)),
    (3, "grass", (0, 102, 0)),
    (4, "tree", (0, 255, 0)),
    (5, "pole", (0, 153, 153)),
    (6, "water", (0, 128, 255)),
    (7, "sky", (0, 0, 255)),
    (8, "vehicle", (255, 255, 0)),
    (9, "container/generic-object", (255, 0, 127)),
    (10, "asphalt", (64, 64, 64)),
    (11, "gravel", (255, 128, 0)),
    (12, "building", (255, 0, 0)),
    (13, "mulch", (153, 76, 0)),
    (14, "rock-bed", (102, 102, 0)),
    (15, "log", (102, 0, 0)),
    (16, "bicycle", (0, 255, 128)),
    (17, "person", (204, 153, 255)),
    (18, "fence", (102, 0, 204)),
    (19, "bush", (255, 153, 204)),
    (20, "sign", (0, 102, 102)),
    (21, "rock", (153, 204, 255)),
    (22, "bridge", (102, 255, 255)),
    (23, "concrete", (101, 101, 11)),
    (24, "picnic-table", (114, 85, 47)),
)


@dataclass(frozen=True)
class Colormap:
    """Class names and their label colours (RGB), in file order."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def color(self, name: str) -> tuple[int, int, int]:
        try:
            return self.colors[self.names.index(name)]
        except ValueError:
            raise KeyError(f"class {name!r} not in colormap ({', '.join(self.names)})") from None

    def target_values(self) -> np.ndarray:
        """Per class: 0 (ID), 1 (OOD) or IGNORE, aligned with `names`."""
        return np.array(
            [IGNORE if n in IGNORED_CLASSES else OOD if n in OOD_CLASSES else ID for n in self.names],
            dtype=np.uint8,
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        rows = (f"{i} {n} {r} {g} {b}\n" for i, (n, (r, g, b)) in enumerate(zip(self.names, self.colors)))
        path.write_text("".join(rows))
        return path


RUGD_COLORMAP = Colormap(tuple(n for _, n, _ in RUGD_CLASSES), tuple(c for _, _, c in RUGD_CLASSES))


def parse_colormap(path: str | Path) -> Colormap:
    """Read a RUGD colormap file (`index name R G B` per line, blank lines skipped)."""
    path = Path(path)
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            rgb = (int(parts[2]), int(parts[3]), int(parts[4]))
            if not all(0 <= c <= 255 for c in rgb):
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'index name R G B' with 0-255 colours, got {line!r}") from None
        names.append(parts[1])
        colors.append(rgb)
    if not names:
        raise ValueError(f"colormap file {path} has no classes")
    if len(set(colors)) != len(colors):
        raise ValueError(f"colormap file {path} assigns the same colour to several classes")
    return Colormap(tuple(names), tuple(colors))


def is_ood_label(label: np.ndarray, min_pixels: int = MIN_OOD_PIXELS) -> bool:
    """Whether a label (0 ID, 1 OOD, IGNORE) makes its frame an OOD frame: >= min_pixels OOD pixels."""
    return bool(np.count_nonzero(label == OOD) >= min_pixels)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack RGB triplets into one int per pixel so colours can be looked up in bulk."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _read_rgb(path: Path) -> np.ndarray:
    # IMREAD_COLOR also expands palette / grey / 16-bit / RGBA PNGs to 8-bit BGR.
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image file {path} (missing, unreadable or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_label(path: str | Path, colormap: Colormap) -> np.ndarray:
    """Colour-coded label PNG -> uint8 (H, W): 0 = ID, 1 = OOD, IGNORE = void or unknown colour."""
    codes = _rgb_codes(_read_rgb(Path(path)))
    class_codes = _rgb_codes(np.array(colormap.colors, dtype=np.uint8))
    order = np.argsort(class_codes)
    sorted_codes = class_codes[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    # Colours outside the colormap (resampling artefacts, foreign palettes) are not trusted.
    known = sorted_codes[pos] == codes
    values = colormap.target_values()[order][pos]
    return np.where(known, values, IGNORE).astype(np.uint8)


@dataclass(frozen=True)
class Frame:
    """One image, with its label file when annotated."""

    name: str
    image_path: Path
    label_path: Path | None
    colormap: Colormap = RUGD_COLORMAP

    def rgb(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        return _read_rgb(self.image_path)

    def label(self) -> np.ndarray | None:
        """uint8 (H, W) with 0 = ID, 1 = OOD, IGNORE; None when unlabelled."""
        return None if self.label_path is None else load_label(self.label_path, self.colormap)

    def is_ood(self, min_pixels: int = MIN_OOD_PIXELS) -> bool | None:
        """`is_ood_label` of this frame's label; None if unlabelled."""
        label = self.label()
        return None if label is None else is_ood_label(label, min_pixels)


class Dataset(Sequence[Frame]):
    """Frames sorted by name; `colormap` is None for a plain image folder."""

    def __init__(self, root: Path, frames: Sequence[Frame], colormap: Colormap | None):
        self.root = root
        self.frames = tuple(sorted(frames, key=lambda f: f.name))
        self.colormap = colormap

    @property
    def labelled(self) -> bool:
        return all(f.label_path is not None for f in self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    @overload
    def __getitem__(self, index: int) -> Frame: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Frame, ...]: ...
    def __getitem__(self, index: int | slice) -> Frame | tuple[Frame, ...]:
        return self.frames[index]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, {len(self)} frames, labelled={self.labelled})"


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _by_stem(files: list[Path], folder: Path) -> dict[str, Path]:
    # The full RUGD release nests frames in per-scene folders; stems are globally unique there.
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise ValueError(f"duplicate file name {p.stem!r} under {folder}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def open_dataset(path: str | Path) -> Dataset:
    """Open a RUGD-format folder (images/ + annotations/ + *colormap*.txt) or a plain image folder.

    In a RUGD folder, annotations are matched to images by file stem (recursively, so the
    released per-scene layout works); images without an annotation get label_path None and
    make `labelled` False.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a directory")
    images_dir, ann_dir = root / "images", root / "annotations"

    if images_dir.is_dir() and ann_dir.is_dir():
        cmaps = sorted(root.glob("*colormap*.txt"))
        if len(cmaps) != 1:
            raise FileNotFoundError(
                f"RUGD-format folder {root} needs exactly one *colormap*.txt file, found {[p.name for p in cmaps]}"
            )
        colormap = parse_colormap(cmaps[0])
        images = _by_stem(_image_files(images_dir, recursive=True), images_dir)
        labels = _by_stem(_image_files(ann_dir, recursive=True), ann_dir)
        frames = [Frame(stem, p, labels.get(stem), colormap) for stem, p in images.items()]
        if not frames:
            raise ValueError(f"RUGD-format folder {root} has no images in {images_dir}")
        return Dataset(root, frames, colormap)

    # Plain folder; an images/ subfolder without annotations is treated the same way.
    folder = images_dir if images_dir.is_dir() else root
    files = _image_files(folder, recursive=False)
    if not files:
        raise ValueError(
            f"{root} is neither a RUGD-format folder (images/, annotations/, *colormap*.txt) "
            f"nor a folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images"
        )
    return Dataset(root, [Frame(p.stem, p, None) for p in files], None)

