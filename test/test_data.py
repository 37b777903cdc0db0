"""core.data on the real RUGD sample and on generated folders; core.synthetic round trip."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ros_anomaly_diffusion.core.data import (
    IGNORE,
    OOD,
    RUGD_COLORMAP,
    Frame,
    is_ood_label,
    load_label,
    open_dataset,
    parse_colormap,
)
from ros_anomaly_diffusion.core.splits import select
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset


# Inspected by hand (unique colours of every annotation PNG, matched against the colormap):
# frames with >= 100 pixels of vehicle / container / building / bicycle / person / bridge /
# picnic-table, with their OOD pixel counts. The other 7 sample frames have none at all.
SAMPLE_OOD = {
    "creek_02001": 18509,  # bridge 10306 + vehicle 8203
    "park-1_00001": 22269,  # vehicle 15537 + building 6732
    "park-1_02001": 1648,  # building
    "trail-11_00001": 753,  # building
    "trail-13_00001": 171,  # vehicle
    "trail-14_01001": 188,  # building
    "trail-3_00001": 1472,  # building 1293 + container/generic-object 179
    "trail-4_00001": 22802,  # building
    "trail-7_00001": 1217,  # building
    "trail_02001": 701,  # container/generic-object
}
SAMPLE_ID = {"trail-10_00001", "trail-11_02001", "trail-3_02001", "trail-4_02001", "trail-6_00001",
             "trail-9_00001", "trail_00001"}
# RUGD colours of the OOD classes, written out independently of core.data.
OOD_RGB = [(255, 255, 0), (255, 0, 127), (255, 0, 0), (0, 255, 128), (204, 153, 255), (102, 255, 255), (114, 85, 47)]


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR))
    return path


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# ---- real RUGD sample ----

def test_sample_colormap_parsed_and_matches_constant(rugd_sample):
    cmap = parse_colormap(rugd_sample / "RUGD_annotation-colormap.txt")
    assert len(cmap.names) == 25
    assert cmap == RUGD_COLORMAP
    assert cmap.color("person") == (204, 153, 255)


def test_sample_dataset_listing(rugd_sample):
    ds = open_dataset(rugd_sample)
    names = [f.name for f in ds]
    assert len(ds) == 17 and ds.labelled and ds.colormap is not None
    assert names == sorted(names) and set(names) == set(SAMPLE_OOD) | SAMPLE_ID
    frame = ds[0]
    assert frame.label_path is not None and frame.label_path.stem == frame.image_path.stem == frame.name
    rgb = frame.rgb()
    assert rgb.shape == (550, 688, 3) and rgb.dtype == np.uint8


def test_sample_labels_match_annotation_colours(rugd_sample):
    ds = open_dataset(rugd_sample)
    for frame in ds:
        label = frame.label()
        assert label is not None and label.shape == (550, 688) and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= {0, 1, IGNORE}
        raw = read_rgb(frame.label_path)
        expected_ood = sum(int(np.all(raw == c, axis=-1).sum()) for c in OOD_RGB)
        expected_void = int(np.all(raw == 0, axis=-1).sum())
        assert int((label == OOD).sum()) == expected_ood == SAMPLE_OOD.get(frame.name, 0), frame.name
        assert int((label == IGNORE).sum()) == expected_void, frame.name
    # The only void pixels of the sample: 14 in trail-10_00001.
    by_name = {f.name: f for f in ds}
    assert int((by_name["trail-10_00001"].label() == IGNORE).sum()) == 14


def test_sample_id_ood_split(rugd_sample):
    ds = open_dataset(rugd_sample)
    id_frames, ood_frames = select(ds, "id"), select(ds, "ood")
    assert {f.name for f in ood_frames} == set(SAMPLE_OOD)
    assert {f.name for f in id_frames} == SAMPLE_ID
    # A higher bar moves the frames with few OOD pixels (171, 188) to the ID side.
    id200 = [f for f in ds if not f.is_ood(min_pixels=200)]
    assert {f.name for f in id200} == SAMPLE_ID | {"trail-13_00001", "trail-14_01001"}


def test_ood_frame_rule_at_100_pixels():
    """Notes sec. 3, the one rule evaluation, the demo and the splits use: >= 100 OOD pixels;
    ignored pixels never count."""
    label = np.full((20, 20), IGNORE, np.uint8)
    label.flat[:99] = OOD
    assert not is_ood_label(label)
    label.flat[99] = OOD
    assert is_ood_label(label)
    assert not is_ood_label(label, min_pixels=101)


# ---- label decoding corner cases ----

def test_load_label_unknown_colour_and_void_ignored(tmp_path: Path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0] = [(0, 102, 0), (255, 255, 0), (0, 0, 0)]  # grass (ID), vehicle (OOD), void
    rgb[1] = [(1, 2, 3), (204, 153, 255), (108, 64, 20)]  # unknown colour, person (OOD), dirt (ID)
    label = load_label(write_rgb(tmp_path / "l.png", rgb), RUGD_COLORMAP)
    np.testing.assert_array_equal(label, [[0, 1, IGNORE], [IGNORE, 1, 0]])


def test_load_label_palette_png(tmp_path: Path):
    Image = pytest.importorskip("PIL.Image")
    idx = np.array([[3, 8], [21, 0]], np.uint8)  # grass, vehicle, rock, void as class indices
    img = Image.fromarray(idx, mode="P")
    img.putpalette([v for c in RUGD_COLORMAP.colors for v in c])
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_label(tmp_path / "p.png", RUGD_COLORMAP), [[0, 1], [0, IGNORE]])


def test_parse_colormap_rejects_malformed(tmp_path: Path):
    bad = tmp_path / "colormap.txt"
    bad.write_text("0 void 0 0 0\n1 dirt 108 64\n")
    with pytest.raises(ValueError, match="colormap.txt:2"):
        parse_colormap(bad)


# ---- plain folders and bad paths ----

def test_plain_image_folder(tmp_path: Path):
    red = np.zeros((4, 5, 3), np.uint8)
    red[..., 0] = 255
    write_rgb(tmp_path / "b.png", red)
    write_rgb(tmp_path / "a.jpg", red)
    write_rgb(tmp_path / "c.bmp", red)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert [f.name for f in ds] == ["a", "b", "c"]
    assert not ds.labelled and ds.colormap is None
    frame = ds[1]
    np.testing.assert_array_equal(frame.rgb()[0, 0], [255, 0, 0])  # RGB order, not BGR
    assert frame.label() is None and frame.is_ood() is None
    with pytest.raises(ValueError, match="needs labels"):
        select(ds, "ood")


def test_bad_paths_give_clear_errors(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        open_dataset(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_dataset(tmp_path / "empty")
    rugd = tmp_path / "rugd"
    (rugd / "images").mkdir(parents=True)
    (rugd / "annotations").mkdir()
    write_rgb(rugd / "images" / "x_00001.png", np.zeros((4, 4, 3)))
    with pytest.raises(FileNotFoundError, match="colormap"):
        open_dataset(rugd)
    broken = Frame("broken", tmp_path / "broken.png", None)
    broken.image_path.write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        broken.rgb()


def test_rugd_folder_with_missing_annotation(tmp_path: Path):
    root = tmp_path / "rugd"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    RUGD_COLORMAP.write(root / "my-colormap.txt")
    write_rgb(root / "images" / "s_00001.png", np.zeros((4, 4, 3)))
    write_rgb(root / "images" / "s_00002.png", np.zeros((4, 4, 3)))
    write_rgb(root / "annotations" / "s_00001.png", np.full((4, 4, 3), (255, 0, 0)))  # building
    ds = open_dataset(root)
    assert not ds.labelled
    assert ds[0].label_path is not None and ds[1].label_path is None
    assert int((ds[0].label() == OOD).sum()) == 16 and ds[0].is_ood(min_pixels=16) and not ds[0].is_ood()


# ---- synthetic generator ----

def test_synthetic_round_trip(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "syn", n_id=6, n_ood=4, seed=3)
    ds = open_dataset(root)
    assert [f.name for f in ds] == [f"synthetic_{i:05d}" for i in range(1, 11)]
    assert ds.labelled and ds.colormap == RUGD_COLORMAP
    id_frames, ood_frames = select(ds, "id"), select(ds, "ood")
    assert len(id_frames) == 6 and len(ood_frames) == 4
    for f in ds:
        rgb, label = f.rgb(), f.label()
        assert rgb.shape == (176, 216, 3) and label.shape == (176, 216)
        assert not (label == IGNORE).any()  # every label colour is an exact RUGD colour
    for f in id_frames:
        assert not (f.label() == OOD).any()
    for f in ood_frames:
        raw = read_rgb(f.label_path)
        per_class = [int(np.all(raw == c, axis=-1).sum()) for c in OOD_RGB]
        assert sum(per_class) >= 100
        assert all(n == 0 or n >= 300 for n in per_class) and 1 <= sum(n > 0 for n in per_class) <= 2
        # Anomalies look different from the scene: their mean colour is far from the rest.
        label = f.label()
        assert np.abs(f.rgb()[label == OOD].mean(0) - f.rgb()[label == 0].mean(0)).max() > 20


def test_synthetic_sequence_drifts_smoothly(tmp_path: Path):
    ds = open_dataset(make_synthetic_dataset(tmp_path, n_id=12, n_ood=0, seed=1))
    sky = [np.all(read_rgb(f.label_path) == (0, 0, 255), axis=-1).mean() for f in ds]
    assert np.abs(np.diff(sky)).max() < 0.03
    images = [f.rgb().astype(np.float32) for f in ds]
    near = np.mean([np.abs(a - b).mean() for a, b in zip(images, images[1:])])
    assert near < np.abs(images[0] - images[-1]).mean()


def test_synthetic_deterministic(tmp_path: Path):
    a = make_synthetic_dataset(tmp_path / "a", n_id=3, n_ood=2, seed=7)
    b = make_synthetic_dataset(tmp_path / "b", n_id=3, n_ood=2, seed=7)
    c = make_synthetic_dataset(tmp_path / "c", n_id=3, n_ood=2, seed=8)
    for sub in ("images", "annotations"):
        for p in sorted((a / sub).iterdir()):
            assert p.read_bytes() == (b / sub / p.name).read_bytes()
    assert (a / "images" / "synthetic_00001.png").read_bytes() != (c / "images" / "synthetic_00001.png").read_bytes()
    # A second, smaller run in the same folder leaves no stale frames behind.
    make_synthetic_dataset(tmp_path / "a", n_id=2, n_ood=0, seed=7)
    assert len(open_dataset(tmp_path / "a")) == 2
