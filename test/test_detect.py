"""`ros-anomaly-diffusion detect`: the shipped model on unlabelled frames from an image folder,
a rosbag2 and a video file; overlays, masks, 16-bit score maps and frames.csv that agree with
the Detector; unreadable frames skipped, not fatal."""
from __future__ import annotations

import csv
import shutil

import cv2
import numpy as np
import pytest

from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.settings import Settings
from ros_anomaly_diffusion.core.temporal import FlagFilter
from ros_anomaly_diffusion.ros.sources import FrameSource

pytestmark = pytest.mark.timeout(300)


def rows_of(out):
    with open(out / "frames.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def plain_folder(rugd_sample, tmp_path_factory):
    """Six RUGD frames as a user's own unlabelled images (no annotations), plus a corrupt file."""
    folder = tmp_path_factory.mktemp("plain")
    for f in list(open_dataset(rugd_sample))[:6]:
        shutil.copy(f.image_path, folder / f.image_path.name)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def test_detect_on_a_folder_writes_what_the_detector_says(plain_folder, tmp_path, caplog):
    out = tmp_path / "out"
    assert cli(["-q", "detect", "--source", str(plain_folder), "--out", str(out)]) == 0
    rows = rows_of(out)
    names = sorted(p.stem for p in plain_folder.glob("*.png") if p.stem != "zz_broken")
    assert [r["name"] for r in rows] == names  # every readable frame, in order; the broken one skipped
    assert "zz_broken" in caplog.text
    for sub in ("overlays", "masks", "scores"):
        assert sorted(p.stem for p in (out / sub).glob("*.png")) == names
    det = Detector("", variant_settings(Settings().variant))  # what detect ran: the shipped model, its config
    rgb = cv2.cvtColor(cv2.imread(str(plain_folder / f"{names[0]}.png")), cv2.COLOR_BGR2RGB)
    r = det.process(rgb)
    score = cv2.imread(str(out / "scores" / f"{names[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert score.dtype == np.uint16 and score.shape == rgb.shape[:2]
    np.testing.assert_allclose(score / 65535.0, r.score, atol=1.0 / 65535)
    mask = cv2.imread(str(out / "masks" / f"{names[0]}.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(mask == 255, r.mask)
    assert float(rows[0]["frame_score"]) == pytest.approx(r.frame_score, abs=1e-6)
    assert int(rows[0]["ood"]) == int(r.is_ood)
    # the filtered flag is the node's filter over the frames in order
    flags = FlagFilter(det.settings.temporal.flag_filter())
    assert [int(r["ood_filtered"]) for r in rows] == [
        int(flags.update(float(r["frame_score"]), det.frame_threshold)) for r in rows]


def test_detect_on_a_video_and_a_bag(rugd_sample, tmp_path):
    from ros_anomaly_diffusion.ros import bag

    frames = [f.rgb() for f in list(open_dataset(rugd_sample))[:4]]
    h, w = 240, 320
    video = tmp_path / "drive.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (w, h))
    for rgb in frames:
        writer.write(cv2.resize(rgb, (w, h))[..., ::-1])
    writer.release()
    source = FrameSource(video)
    assert (source.kind, source.length) == ("video", 4)
    got = [f.rgb for f in source.iterate(lambda *a: None)]
    assert len(got) == 4 and got[0].shape == (h, w, 3)
    assert np.abs(got[0].astype(int) - cv2.resize(frames[0], (w, h)).astype(int)).mean() < 8  # JPEG, RGB order
    out = tmp_path / "video_out"
    assert cli(["-q", "detect", "--source", str(video), "--out", str(out)]) == 0
    assert [r["name"] for r in rows_of(out)] == [f"frame_{i:06d}" for i in range(4)]

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, rgb in enumerate(frames):
        cv2.imwrite(str(folder / f"f{i}.png"), rgb[..., ::-1])
    bag_dir = tmp_path / "drive_bag"
    assert bag.folder_to_bag(folder, bag_dir, topic="/cam/image_raw") == 4
    out = tmp_path / "bag_out"
    assert cli(["-q", "detect", "--source", str(bag_dir), "--out", str(out)]) == 0
    assert [r["name"] for r in rows_of(out)] == [f"{i:06d}" for i in range(4)]


def test_detect_refuses_what_is_not_a_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli(["-q", "detect", "--source", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")]) == 1
    assert cli(["-q", "detect", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
