"""The knn baseline: exact nearest-neighbour search, memory bank, scores, training via the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_legacy_feature_checkpoint

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.families import knn
from ros_anomaly_diffusion.core.datasets import cell_weights
from ros_anomaly_diffusion.core.data import OOD, open_dataset
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.synthetic import make_synthetic_dataset
from ros_anomaly_diffusion.engine.training import TrainOptions

SIZE = (128, 160)  # 8x10 cells: a quarter of the default 256x320, for speed


def test_nearest_is_exact_for_members_and_agrees_with_cdist():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=gen) * 5
    queries = torch.cat([bank[[3, 150, 299]], torch.randn(20, 16, generator=gen)])
    d, idx = knn.nearest(queries, bank)
    assert torch.equal(d[:3], torch.zeros(3)) and idx[:3].tolist() == [3, 150, 299]
    ref = torch.cdist(queries.double(), bank.double()).min(1).values
    assert torch.allclose(d.double(), ref, rtol=1e-4, atol=1e-4)
    # leave-one-group-out: a member is no longer its own neighbour
    groups = torch.arange(300)
    d_loo, idx_loo = knn.nearest(bank[:5], bank, groups[:5], groups)
    assert bool((d_loo > 0).all()) and not bool((idx_loo == torch.arange(5)).any())


@pytest.fixture(scope="module")
def rugd_knn(tmp_path_factory, monkeypatch_module, rugd_sample):
    """A knn checkpoint from three ID RUGD frames, bank subsampled to 400 of their cells."""
    frames = [f for f in open_dataset(rugd_sample) if not f.is_ood()][:3]
    monkeypatch_module.setattr(knn, "MAX_BANK", 400)
    config, tensors = knn.fit(frames, tmp_path_factory.mktemp("knn"), TrainOptions(variant="knn", image_size=SIZE),
                              progress=False)
    out = ckpt.save(tmp_path_factory.mktemp("knn") / "ck", config, tensors)
    return out, frames


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _distances(det, batch01: torch.Tensor) -> torch.Tensor:
    """(B, h/16, w/16) nearest-neighbour distances of the frame graph `export` writes (backend torch)."""
    with torch.inference_mode():
        return det.scorer.export_target(det.model_size).module.distances(batch01)


def test_a_checkpoint_from_before_the_recorded_taps_loads_with_its_own(tmp_path, monkeypatch):
    old = make_legacy_feature_checkpoint(tmp_path / "old", "knn", monkeypatch)
    assert "blocks" not in ckpt.load_config(old)["features"]
    det = Detector(old, variant_settings("knn", checkpoint=str(old), backend="torch"))
    graph = det.scorer.export_target(det.model_size).module
    assert graph.features.taps == [1, 2, 4, 10] and graph.bank.shape[1] == 200
    assert float(_distances(det, torch.rand(1, 3, 64, 96)).min()) >= 0


def test_bank_holds_seeded_subsample_of_id_cells(rugd_knn):
    out, frames = rugd_knn
    config = ckpt.load_config(out)
    bank = ckpt.load_tensors(out, "bank")
    assert config["family"] == "knn" and config["bank"]["size"] == 400 == len(bank["vectors"])
    assert config["bank"]["candidates"] == 3 * 2 * 8 * 10  # all ID cells of 3 frames and their mirror images
    assert len({tuple(r) for r in bank["origin"].tolist()}) == 400
    assert config["scores"]["pixel"]["mean"] > 0 and config["scores"]["pixel"]["std"] > 0


def test_training_frame_scores_zero_at_bank_cells_and_high_on_a_foreign_patch(rugd_knn, rugd_sample):
    out, frames = rugd_knn
    det = Detector(out, variant_settings("knn", checkpoint=str(out), backend="torch"))
    origin = ckpt.load_tensors(out, "bank")["origin"]
    rgb = frames[0].rgb()
    d = _distances(det, det.to_model([rgb]))[0]
    sampled = origin[(origin[:, 0] == 0) & (origin[:, 1] == 0)]
    assert len(sampled) > 10
    assert bool((d[sampled[:, 2], sampled[:, 3]] == 0).all())  # exactly: the same bits as in the bank
    # paste the OOD objects of an OOD frame (vehicle, building, ...) into the ID frame
    ood_frame = max((f for f in open_dataset(rugd_sample) if f.is_ood()), key=lambda f: int((f.label() == OOD).sum()))
    ood = ood_frame.label() == OOD
    pasted = rgb.copy()
    pasted[ood] = ood_frame.rgb()[ood]
    d2 = _distances(det, det.to_model([pasted]))[0]
    cells = torch.from_numpy(cell_weights(ood_frame.label(), d2.shape)[0, 0].numpy() == 0)
    full = torch.from_numpy(cell_weights((~ood).astype(np.uint8) * OOD, d2.shape)[0, 0].numpy() == 1)
    assert bool(full.any())  # cells entirely covered by the pasted objects
    assert float(d2[full].mean()) > 2 * float(d[full].mean()) and float(d2[full].mean()) > float(d2[~cells].mean())
    r0, r1 = det.process(rgb), det.process(pasted)
    assert r0.score.shape == rgb.shape[:2] and 0 <= r0.score.min() and r1.score.max() <= 1
    assert r1.frame_score > r0.frame_score and det.nfe == 0


def test_train_and_eval_cli(tmp_path):
    from ros_anomaly_diffusion.cli import main

    data = make_synthetic_dataset(tmp_path / "syn", n_id=6, n_ood=3, size=(64, 80))
    out = tmp_path / "ck"
    assert main(["-q", "train", "--variant", "knn", "--data", str(data), "--out", str(out),
                 "--image-size", "64", "96"]) == 0
    config = ckpt.load_config(out)
    calib = config["calibration"]["knn"]
    assert config["image_size"] == [64, 96] and 0 <= calib["mask_threshold"] <= 1
    assert main(["-q", "eval", "--variant", "knn", "--data", str(data), "--checkpoint", str(out),
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["variant"] == "knn" and metrics["frames"] == 9 and metrics["nfe"] == 0


def test_the_shipped_default_model_is_what_an_empty_checkpoint_means(rugd_sample):
    """No checkpoint given: the model in models/default (knn on the RUGD sample), with its
    calibration, its model card and its files installed by setup.py."""
    import re as _re

    from ros_anomaly_diffusion.core.runtime import checkpoint_problem
    from ros_anomaly_diffusion.core.settings import Settings

    det = Detector("", Settings.of(segments="none"))
    assert det.directory == ckpt.DEFAULT_MODEL and det.variant.name == "knn" and Settings().variant == ""
    assert 0 < det.mask_threshold < 1 and 0 < det.frame_threshold < 1  # calibrated, not the 0.5 fallback
    assert det.mask_threshold != 0.5 and det.frame_threshold != 0.5
    config = ckpt.load_config(ckpt.DEFAULT_MODEL)
    assert set(config["training"]["frames"]) <= {f.name for f in open_dataset(rugd_sample)}
    card = (ckpt.DEFAULT_MODEL / "MODEL_CARD.md").read_text()
    assert "make default-model" in card and "RUGD" in card and "licence" in card.lower()
    frame = max((f for f in open_dataset(rugd_sample) if f.is_ood()), key=lambda f: int((f.label() == OOD).sum()))
    r = det.process(frame.rgb())
    assert r.score.shape == frame.label().shape
    assert checkpoint_problem(Settings()) is None
    assert "variant 'ddim' needs a 'pixel' one" in checkpoint_problem(Settings.of(variant="ddim"))
    setup = (ckpt.DEFAULT_MODEL.parents[2] / "setup.py").read_text()
    for name in sorted(p.name for p in ckpt.DEFAULT_MODEL.iterdir()):
        assert any(_re.fullmatch(g.replace(".", r"\.").replace("*", ".*"), f"models/default/{name}")
                   for g in _re.findall(r'"(models/default/[^"]+)"', setup)), f"setup.py does not install {name}"


def test_the_bank_sample_is_the_same_however_the_frames_are_split_or_ordered(monkeypatch):
    """sample_bank keeps the cells with the smallest per-cell keys: one pass over all frames,
    the frames in another order, and two processes' shards merged (gather faked with the other
    shard's own result) give the same bank, a seeded subset without repeats."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(6):  # 6 frames x 2 flips of 4x5 cells, some OOD cells
        w = (torch.rand(2, 1, 4, 5, generator=gen) > 0.2).float()
        batches.append((torch.randn(2, 8, 4, 5, generator=gen), w, torch.tensor([[i, 0], [i, 1]])))
    one = knn.sample_bank(batches, 50, seed=3)
    assert len(one["vectors"]) == 50 and one["candidates"] == sum(int(w.sum()) for _, w, _ in batches)
    assert len({tuple(r) for r in one["origin"].tolist()}) == 50  # no cell twice
    again = knn.sample_bank(batches[::-1], 50, seed=3)
    assert torch.equal(again["vectors"], one["vectors"]) and torch.equal(again["origin"], one["origin"])
    assert not torch.equal(knn.sample_bank(batches, 50, seed=4)["origin"], one["origin"])  # the seed matters

    other = knn.sample_bank(batches[1::2], 50, seed=3)  # what process 1 holds before the gather
    theirs = iter([(knn.cell_keys(other["origin"], 3), other["vectors"], other["origin"]), other["candidates"]])
    monkeypatch.setattr(knn, "gather_object", lambda mine: mine + [next(theirs)])
    two = knn.sample_bank(batches[0::2], 50, seed=3, acc=type("Acc", (), {"num_processes": 2})())
    assert torch.equal(two["vectors"], one["vectors"]) and torch.equal(two["origin"], one["origin"])
    assert two["candidates"] == one["candidates"]
