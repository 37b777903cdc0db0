"""`ros-anomaly-diffusion demo --data`: real RUGD frames through replay and detector_node over
DDS with the model shipped with the package (no training), results matched to frames and
scored, pictures where it says."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.ros.demo import SHIPPED_VARIANT

pytestmark = pytest.mark.timeout(400)


def test_demo_on_real_frames_uses_the_shipped_model(rugd_sample, tmp_path):
    assert ckpt.load_config(ckpt.DEFAULT_MODEL)["family"] == SHIPPED_VARIANT  # knn: family and variant share it
    data = tmp_path / "rugd"
    frames = [f for f in open_dataset(rugd_sample)]
    picked = [f for f in frames if f.is_ood()][:2] + [f for f in frames if not f.is_ood()][:2]
    for sub in ("images", "annotations"):
        (data / sub).mkdir(parents=True)
    for f in picked:
        shutil.copy(f.image_path, data / "images" / f.image_path.name)
        shutil.copy(f.label_path, data / "annotations" / f.label_path.name)
    for cmap in rugd_sample.glob("*colormap*"):
        shutil.copy(cmap, data / cmap.name)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "ros-anomaly-diffusion"), "demo", "--data", str(data), "--out", str(out),
           "--rate", "4", "--timeout", "240"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=380)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the model shipped with the package" in run.stdout and "training" not in run.stdout
    assert f"pictures: {out / 'sheet.png'}" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames_with_results"] == metrics["frames_replayed"] == 4
    assert metrics["checkpoint"] == str(ckpt.DEFAULT_MODEL) and metrics["pixel_auroc"] > 0.5
    assert (out / "sheet.png").is_file() and len(list((out / "overlays").glob("*.png"))) == 4


def test_the_synthetic_demo_calibrates_its_model_with_the_parameters_its_node_gets(tmp_path):
    """Without --data the demo trains the family's default network and runs it with
    SYNTHETIC_PARAMETERS; its thresholds come from the same held-out frames scored with those
    parameters, not with the parameter file's."""
    from ros_anomaly_diffusion.engine.training import calibrate
    from ros_anomaly_diffusion.ros import demo

    args = demo.parse(["--out", str(tmp_path), "--train-steps", "2"])
    train_dir, _ = demo.prepare(args)
    model = demo.ensure_model(args, train_dir)
    config = ckpt.load_config(model)
    assert config["denoiser"]["kind"] == "local" and demo.node_parameters(args) == {"reconstruction_guidance": 1.0}
    stored = config["calibration"]["ddim"]
    held = [f for f in open_dataset(train_dir) if f.name in set(stored["frames"])]
    assert held
    as_node = calibrate(model, held, "ddim", progress=False, **demo.node_parameters(args))
    as_file = calibrate(model, held, "ddim", progress=False)
    assert stored["mask_threshold"] == pytest.approx(as_node["mask_threshold"], rel=1e-3)
    assert as_file["mask_threshold"] != pytest.approx(as_node["mask_threshold"], rel=1e-2)
    assert demo.node_parameters(demo.parse(["--data", str(tmp_path)])) == {}  # real terrain: the file's
