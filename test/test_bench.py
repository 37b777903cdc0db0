"""The benchmark runs its rows on two real RUGD frames and writes the table with all columns; with
--folds it never scores a frame with a model trained or calibrated on it."""
import csv
import json
import math
import os

import numpy as np
import pytest

from conftest import make_checkpoint
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core import procmem
from ros_anomaly_diffusion.core.splits import assign_folds
from ros_anomaly_diffusion.engine.bench import claim_fold_root
from ros_anomaly_diffusion.engine.bench_report import FOLD_COLUMNS, plot_groups
from ros_anomaly_diffusion.engine.bench_rows import COLUMNS, checkpoint_for, model_description, parse_row


def test_row_specs_parse():
    assert parse_row("ddim") == ("ddim", {})
    assert parse_row("ddim:steps=10,quantization=int8") == ("ddim", {"steps": 10, "quantization": "int8"})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_row("ddim:steps")


def test_the_plot_gives_a_variant_and_its_quantized_copies_one_label():
    rows = [{"variant": v} for v in ("knn", "dcae", "dcae:draws=1", "dcae:quantization=int8",
                                     "dcae:quantization=fp16", "dcae:draws=1,quantization=int8")]
    groups = {label: [m["variant"] for m in members] for label, members in plot_groups(rows)}
    assert groups == {"knn": ["knn"],
                      "dcae (+int8, fp16)": ["dcae", "dcae:quantization=int8", "dcae:quantization=fp16"],
                      "dcae:draws=1 (+int8)": ["dcae:draws=1", "dcae:draws=1,quantization=int8"]}


def test_a_benchmark_root_finds_each_family_under_its_current_or_old_name(tmp_path):
    (tmp_path / "pixel").mkdir()
    (tmp_path / "features").mkdir()  # the inversion family's folder before it was renamed
    assert checkpoint_for(tmp_path, "ddim", {"steps": 5}) == (tmp_path / "pixel", {"steps": 5})
    assert checkpoint_for(tmp_path, "inversion", {})[0] == tmp_path / "features"
    (tmp_path / "feature_diffusion").mkdir()
    assert checkpoint_for(tmp_path, "inversion", {})[0] == tmp_path / "feature_diffusion"
    assert checkpoint_for(tmp_path, "knn", {})[0] == tmp_path / "knn"  # not there: where `bench --train` writes it


def test_the_table_says_which_model_network_and_autoencoder_a_row_ran():
    latent = {"family": "latent", "image_size": [64, 80]}
    assert model_description({**latent, "autoencoder": {"kind": "taef2"}}) == "latent 64x80 ae=taef2"
    assert model_description({**latent, "autoencoder": {"source": "trained"}}) == "latent 64x80 ae=dcae(trained)"
    assert (model_description({**latent, "autoencoder": {"kind": "dcae", "source": "/models/dc-ae-f32c32"}})
            == "latent 64x80 ae=dcae(pretrained)")
    assert model_description({"family": "knn", "image_size": [256, 320]}) == "knn 256x320"
    # and which network: its kind, and the receptive field of a bounded one
    local = {"kind": "local", "config": {"in_channels": 3, "width": 8, "blocks": 4, "kernel_size": 3, "stem": 2}}
    assert model_description({"family": "pixel", "image_size": [128, 160], "denoiser": local}) == \
        "pixel 128x160 local(R=35)"
    assert model_description({**latent, "denoiser": {"kind": "dit", "config": {}}, "autoencoder": {"kind": "taef2"}}) \
        == "latent 64x80 dit ae=taef2"


def test_process_memory_from_proc():
    rss = procmem.rss_mb()
    assert rss > 10 and procmem.rss_mb(os.getpid()) == pytest.approx(rss, rel=0.5)
    assert math.isnan(procmem.status_mb("NoSuchField"))
    ballast = np.ones(50 * 2**20, np.uint8)  # 50 MB, resident once written
    assert procmem.status_mb("VmHWM") >= procmem.rss_mb() > rss + 40
    del ballast
    # the high-water mark falls back to the RSS now (the bench's baseline of a row)
    assert procmem.reset_peak_rss() == pytest.approx(procmem.status_mb("VmHWM"), abs=5)


def test_bench_writes_every_column_for_every_row(tmp_path, rugd_sample):
    make_checkpoint(tmp_path / "ckpt" / "pixel")
    rows = ["ddim:steps=2,segments=none", "ddim:steps=4,segments=none"]
    out = tmp_path / "bench"
    assert cli(["-q", "bench", "--data", str(rugd_sample), "--checkpoints", str(tmp_path / "ckpt"),
                "--variants", *rows, "--out", str(out), "--max-frames", "2"]) == 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in table] == rows
    assert set(table[0]) == set(COLUMNS)
    for r in table:
        assert 0 <= float(r["pixel_ap"]) <= 1 and float(r["latency_ms"]) > 0
        assert float(r["peak_mem_mb"]) > 100 and 0 < float(r["model_mb"]) < 5
        # the detector's own share: the EfficientNet backbone at least, far below the libraries
        assert 5 < float(r["infer_mem_mb"]) < float(r["peak_mem_mb"]) - 100
    assert [int(r["nfe"]) for r in table] == [8, 16]  # ddim.yaml: 4 draws a step
    assert (out / "results.md").read_text().count("\n") == 2 + len(rows)
    assert (out / "ap_vs_latency.png").stat().st_size > 1000


# --------------------------------------------------------------------------- bench --folds


def test_fold_assignment_on_the_rugd_sample_is_seeded_scene_grouped_and_spreads_the_ood_frames(rugd_sample):
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.splits import scene_of

    ds = open_dataset(rugd_sample)
    names, ood = sorted(f.name for f in ds), {f.name for f in ds if f.is_ood()}
    scene = {f.name: scene_of(f) for f in ds}
    assert len(ood) == 10 and len(set(scene.values())) == 12
    for k in (2, 3, 5):
        folds = assign_folds(ds, k, seed=0)
        assert len(folds) == k and assign_folds(ds, k, seed=0) == folds  # deterministic
        assert sorted(n for f in folds for n in f) == names  # every frame in exactly one fold
        for f in folds:  # a scene never straddles two folds
            assert not {scene[n] for n in f} & {scene[n] for g in folds if g is not f for n in g}
        per_fold_ood = [len(ood.intersection(f)) for f in folds]
        assert min(per_fold_ood) >= 1 and max(per_fold_ood) - min(per_fold_ood) <= 1, per_fold_ood
        assert max(map(len, folds)) - min(map(len, folds)) <= 2
    # the seed matters (order among equal scenes), and no seed breaks the rules above
    assert len({tuple(map(tuple, assign_folds(ds, 3, seed=s))) for s in range(4)}) > 1
    # fewer scenes than folds: a scene is cut into runs of consecutive frames, each with an OOD frame
    few = [f for f in ds if scene[f.name] in ("park-1", "trail-4")]
    folds = assign_folds(few, 3, seed=0)
    assert sorted(n for f in folds for n in f) == sorted(f.name for f in few)
    assert all(f and ood.intersection(f) for f in folds) and ["trail-4_00001", "trail-4_02001"] in folds
    with pytest.raises(ValueError):
        assign_folds(ds, 1)
    with pytest.raises(ValueError):
        assign_folds(few, 5)


def test_a_fold_checkpoint_folder_of_another_split_is_refused(tmp_path):
    claim_fold_root(tmp_path / "fold0", ["a_1"], ["b_1", "c_1"])
    claim_fold_root(tmp_path / "fold0", ["a_1"], ["b_1", "c_1"])  # the same split: resumes
    with pytest.raises(ValueError, match="another fold assignment"):
        claim_fold_root(tmp_path / "fold0", ["b_1"], ["a_1", "c_1"])
    (tmp_path / "fold1" / "pixel").mkdir(parents=True)
    with pytest.raises(ValueError, match="no frames.json"):
        claim_fold_root(tmp_path / "fold1", ["a_1"], ["b_1"])


def test_bench_folds_trains_each_fold_without_its_test_frames_and_pools_them(tmp_path, monkeypatch):
    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
    from ros_anomaly_diffusion.engine import training
    from ros_anomaly_diffusion.engine.evaluation import label_metrics

    # Calibration (in this process) edits with 2 DDIM steps instead of the config's 25: time only.
    real_settings = training.variant_settings
    monkeypatch.setattr(training, "variant_settings", lambda *a, **k: real_settings(*a, **k, steps=2))
    data = make_synthetic_dataset(tmp_path / "syn", n_id=4, n_ood=4, size=(64, 80))
    row, out, root = "ddim:steps=2,segments=none", tmp_path / "bench", tmp_path / "ckpt"
    assert cli(["-q", "bench", "--train", "--folds", "2", "--data", str(data), "--checkpoints", str(root),
                "--out", str(out), "--variants", row, "--train-steps", "2", "--train-preset", "tiny",
                "--train-size", "32", "40"]) == 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in table] == [row] and list(table[0]) == list(FOLD_COLUMNS)
    r = table[0]
    assert int(r["folds"]) == 2 and int(r["nfe"]) == 8 and float(r["train_s"]) > 0  # 2 steps, 4 draws
    assert 0 <= float(r["pixel_ap"]) <= 1 and 0 <= float(r["ap_fold_mean"]) <= 1 and float(r["ap_fold_std"]) >= 0

    folds = json.loads((out / "folds.json").read_text())["folds"]
    frames = {f.name: f for f in open_dataset(data)}
    assert sorted(n for f in folds for n in f["frames"]) == sorted(frames)
    assert all(f["ood_frames"] for f in folds)
    scores, frame_scores, labels, flags = [], [], [], []
    for i, fold in enumerate(folds):
        test = set(fold["frames"])
        config = ckpt.load_config(root / f"fold{i}" / "pixel")
        trained, calibrated = set(config["training"]["frames"]), set(config["calibration"]["ddim"]["frames"])
        assert trained and calibrated, "training and calibration both used frames of the other fold"
        assert not test & (trained | calibrated), f"fold {i}: test frames used for training or calibration"
        assert trained | calibrated == set(frames) - test  # all the other folds' frames, OOD ones too
        assert any(frames[n].is_ood() for n in trained)  # OOD frames trained on (OOD pixels masked)
        with np.load(out / f"fold{i}" / "00_ddim_steps=2_segments=none.npz") as z:
            assert set(z["names"]) == test
            scores += [z[f"score_{j}"] for j in range(len(z["names"]))]
            frame_scores += list(z["frame_scores"])
            labels += [frames[n].label() for n in z["names"]]
            # the flag of each frame at its fold's calibrated threshold
            assert float(z["frame_threshold"]) == config["calibration"]["ddim"]["frame_threshold"]
            flagged = z["frame_scores"] > z["frame_threshold"]
            flags += [(bool(f), frames[n].is_ood()) for f, n in zip(flagged, z["names"])]
    pooled = label_metrics(scores, frame_scores, labels)  # exact pooling over both folds' frames
    for c in ("pixel_ap", "pixel_auroc", "fpr95", "frame_auroc"):
        assert float(r[c]) == pytest.approx(pooled[c], abs=1e-12)
    assert float(r["false_alarm_rate"]) == pytest.approx(np.mean([f for f, ood in flags if not ood]))
    assert float(r["detection_rate"]) == pytest.approx(np.mean([f for f, ood in flags if ood]))
    per_fold = list(csv.DictReader((out / "per_fold.csv").open()))
    aps = [float(p["pixel_ap"]) for p in per_fold]
    assert len(aps) == 2 and float(r["ap_fold_mean"]) == pytest.approx(np.mean(aps))
    times = json.loads((out / "train_times.json").read_text())["seconds"]
    assert len(times["pixel"]) == 2 and float(r["train_s"]) == pytest.approx(np.mean(times["pixel"]))
    md = (out / "results.md").read_text()
    assert "ap_fold_std" in md and "fold 1 (4 frames" in md and "Machine:" in md


def test_bench_folds_calibrates_on_the_share_of_id_frames_it_is_given(tmp_path):
    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "syn", n_id=8, n_ood=2, size=(64, 80))
    frames = {f.name: f for f in open_dataset(data)}
    root = tmp_path / "ckpt"
    run = ["-q", "bench", "--train", "--folds", "2", "--data", str(data), "--checkpoints", str(root),
           "--out", str(tmp_path / "bench"), "--variants", "knn", "--calib-fraction"]
    assert cli(run + ["0.95"]) != 0 and not root.exists()  # train's range, refused before any training
    assert cli(run + ["0.6"]) == 0
    held = {}  # ID frames on the fold's training side -> how many calibrated the thresholds
    for fold in ("fold0", "fold1"):
        config = ckpt.load_config(root / fold / "knn")
        calibrated = config["calibration"]["knn"]["frames"]
        assert not set(calibrated) & set(config["training"]["frames"])
        held[len(calibrated) + sum(not frames[n].is_ood() for n in config["training"]["frames"])] = len(calibrated)
    assert held == {2: 1, 6: 4}  # at least one frame of each kind; the default 0.2 holds out 1 of 6
