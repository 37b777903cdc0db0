"""A checkpoint knows its variant: `train` records it in config.json, and every entry point
given a checkpoint and no variant runs it as that variant (eval, detect, calibrate, export,
quantize, bench, soak/camsoak's node command, the node itself). An explicit variant the
checkpoint's family serves is honoured; one it cannot serve is refused naming those it can."""
from __future__ import annotations

import json
import shutil
from argparse import Namespace

import pytest

from conftest import detector_args, random_frame
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.settings import Settings


@pytest.fixture(scope="module")
def ddim_checkpoint(rugd_sample, tmp_path_factory):
    """`train --variant ddim` as a user runs it: a tiny pixel model, calibrated for ddim."""
    out = tmp_path_factory.mktemp("variant") / "ddim"
    assert cli(["-q", "train", "--variant", "ddim", "--data", str(rugd_sample), "--out", str(out), "--image-size",
                "32", "40", "--preset", "tiny", "--steps", "2", "--batch-size", "2"]) == 0
    return out


def test_train_records_the_variant_and_calibrates_it(ddim_checkpoint):
    config = ckpt.load_config(ddim_checkpoint)
    assert config["family"] == "pixel" and config["variant"] == "ddim"
    assert set(config["calibration"]) == {"ddim"}


def test_a_variant_the_checkpoint_was_not_calibrated_for_is_named_in_a_warning(ddim_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="ros_anomaly_diffusion.core.detector"):
        Detector(ddim_checkpoint, Settings.of(checkpoint=str(ddim_checkpoint), variant="ddim", segments="none"))
        assert "not calibrated" not in caplog.text
        det = Detector(ddim_checkpoint, Settings.of(checkpoint=str(ddim_checkpoint), variant="ddpm", segments="none"))
    assert "not calibrated for variant ddpm" in caplog.text and "calibrate --variant ddpm" in caplog.text
    assert det.mask_threshold == det.frame_threshold == 0.5


def test_eval_and_calibrate_run_the_checkpoints_variant(ddim_checkpoint, rugd_sample, tmp_path):
    assert cli(["-q", "eval", "--data", str(rugd_sample), "--checkpoint", str(ddim_checkpoint), "--out",
                str(tmp_path / "eval"), "--set", "segments=none"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["variant"] == "ddim"

    before = ckpt.load_config(ddim_checkpoint)["calibration"]["ddim"]
    assert cli(["-q", "calibrate", "--data", str(rugd_sample), "--checkpoint", str(ddim_checkpoint),
                "--frame-fpr", "0.2"]) == 0
    calibration = ckpt.load_config(ddim_checkpoint)["calibration"]
    assert set(calibration) == {"ddim"} and calibration["ddim"]["frame_fpr"] == 0.2 != before["frame_fpr"]


def test_detect_names_the_variant_it_ran(ddim_checkpoint, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "a.png"), random_frame(48, 64))
    assert cli(["-q", "detect", "--source", str(frames), "--checkpoint", str(ddim_checkpoint), "--out",
                str(tmp_path / "det")]) == 0
    assert "with variant ddim" in capsys.readouterr().out


def test_export_and_quantize_keep_the_variant(ddim_checkpoint, rugd_sample, tmp_path):
    assert cli(["-q", "export", "--checkpoint", str(ddim_checkpoint), "--out", str(tmp_path / "onnx")]) == 0
    assert [p.name for p in (tmp_path / "onnx").glob("*.onnx")] == ["ddim_denoiser.onnx"]
    quantized = tmp_path / "int8"
    assert cli(["-q", "quantize", "--checkpoint", str(ddim_checkpoint), "--out", str(quantized),
                "--precision", "int8"]) == 0
    assert ckpt.load_config(quantized)["variant"] == "ddim"
    assert cli(["-q", "eval", "--data", str(rugd_sample), "--checkpoint", str(quantized), "--out",
                str(tmp_path / "eval"), "--set", "segments=none"]) == 0


def test_bench_without_variants_runs_each_checkpoint_as_its_variant(ddim_checkpoint, rugd_sample, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(ddim_checkpoint, root / "pixel")
    assert cli(["-q", "bench", "--data", str(rugd_sample), "--checkpoints", str(root), "--out", str(tmp_path / "b"),
                "--max-frames", "2"]) == 0
    assert (tmp_path / "b" / "results.csv").read_text().splitlines()[1].startswith("ddim,")
    assert cli(["-q", "bench", "--data", str(rugd_sample), "--checkpoints", str(tmp_path / "none"), "--out",
                str(tmp_path / "c")]) == 1  # no checkpoint there: refused, naming --variants


def test_an_explicit_variant_of_the_family_is_honoured_another_is_refused_naming_what_serves(ddim_checkpoint):
    assert Detector(ddim_checkpoint, Settings.of(checkpoint=str(ddim_checkpoint))).variant.name == "ddim"
    ddpm = Detector(ddim_checkpoint, Settings.of(checkpoint=str(ddim_checkpoint), variant="ddpm"))
    assert ddpm.variant.name == "ddpm" and ddpm.settings.variant == "ddpm"
    with pytest.raises(ckpt.CheckpointError, match=r"holds a 'pixel' model, variant 'knn' needs a 'knn' one; "
                                                   r"this checkpoint serves ddpm, ddim"):
        Detector(ddim_checkpoint, Settings.of(checkpoint=str(ddim_checkpoint), variant="knn"))
    assert cli(["-q", "eval", "--data", "/nonexistent", "--checkpoint", str(ddim_checkpoint), "--out", "/tmp/x",
                "--variant", "inversion"]) == 1


def test_a_checkpoint_that_records_no_variant_runs_as_its_familys_usual_one(tiny_checkpoint, family_checkpoint):
    """Checkpoints written before the variant was recorded (the conftest ones are such)."""
    assert "variant" not in ckpt.load_config(tiny_checkpoint)
    assert Detector(tiny_checkpoint, Settings.of(checkpoint=str(tiny_checkpoint))).variant.name == "ddim"
    expected = {"latent": "dcae", "feature_diffusion": "inversion", "knn": "knn"}
    for family, variant in expected.items():
        path = family_checkpoint(family)
        assert Detector(path, Settings.of(checkpoint=str(path), segments="none")).variant.name == variant, family
    assert Detector("", Settings()).variant.name == "knn"  # the shipped model records knn


def test_soak_and_camsoak_start_the_node_with_the_checkpoints_variant_file(ddim_checkpoint):
    from ros_anomaly_diffusion.ros.soak import detector_command

    command = detector_command(Namespace(checkpoint=ddim_checkpoint, variant=None, set=[]))
    assert "variant:=ddim" in command and command[command.index("--params-file") + 1].endswith("config/ddim.yaml")
    shipped = detector_command(Namespace(checkpoint=None, variant=None, set=[]))
    assert "variant:=knn" in shipped


def test_the_node_given_only_a_checkpoint_runs_its_variant_with_its_parameter_file(ddim_checkpoint, spawn, probe):
    """`detector_node -p checkpoint:=X`: variant empty, the other parameters default to the
    checkpoint variant's config/ddim.yaml (5 steps from t = 600 in 4 draws: NFE 20)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.srv import GetParameters

    node = spawn("detector_node", *detector_args(ddim_checkpoint, "-r", "__ns:=/ckvariant", "-p", "segments:=none",
                                                 "-p", "diagnostics_period:=0.5", variant=None))
    node.wait_for_output("listening on", timeout=180)
    assert "variant ddim (NFE 20)" in node.output, node.output[-3000:]
    client = probe.node.create_client(GetParameters, "/ckvariant/anomaly_detector/get_parameters")
    assert client.wait_for_service(timeout_sec=60)
    future = client.call_async(GetParameters.Request(names=["variant", "steps", "start_timestep", "backend"]))
    probe.spin_until(future.done, 30, "get_parameters")
    variant, steps, start, backend = future.result().values
    assert (variant.string_value, steps.integer_value, start.integer_value) == ("", 5, 600)
    # backend auto: what it chose is in the log and in /diagnostics
    assert backend.string_value == "auto" and "on cpu (onnxruntime)" in node.output
    diagnostics = probe.collect(DiagnosticArray, "/diagnostics")

    def reported():
        for _, msg in diagnostics:
            for status in msg.status:
                values = {v.key: v.value for v in status.values}
                if status.name.startswith("anomaly_detector") and values.get("model_loaded") == "true":
                    return values
        return None
    probe.spin_until(lambda: reported() is not None, 60, "/diagnostics of the loaded model")
    assert (reported()["variant"], reported()["backend"]) == ("ddim", "onnxruntime")
