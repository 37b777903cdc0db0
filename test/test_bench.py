"""The benchmark runs its rows on two real RUGD frames and writes the table with all columns."""
import csv
import math
import os

import numpy as np
import pytest

from conftest import make_checkpoint
from ros_anomaly_diffusion.cli import main as cli
from ros_anomaly_diffusion.core import procmem
from ros_anomaly_diffusion.engine.bench import COLUMNS, checkpoint_for, parse_row


def test_row_specs_parse():
    assert parse_row("ddim") == ("ddim", {})
    assert parse_row("ddim:steps=10,quantization=int8") == ("ddim", {"steps": 10, "quantization": "int8"})
    with pytest.raises(ValueError):
        parse_row("ddim:steps")


def test_a_benchmark_root_finds_each_family_under_its_current_or_old_name(tmp_path):
    (tmp_path / "pixel").mkdir()
    (tmp_path / "features").mkdir()  # the inversion family's folder before it was renamed
    assert checkpoint_for(tmp_path, "ddim", {}) == tmp_path / "pixel"
    assert checkpoint_for(tmp_path, "inversion", {}) == tmp_path / "features"
    (tmp_path / "feature_diffusion").mkdir()
    assert checkpoint_for(tmp_path, "inversion", {}) == tmp_path / "feature_diffusion"
    assert checkpoint_for(tmp_path, "knn", {}) == tmp_path / "knn"  # not there: where `bench --train` writes it


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
    assert [int(r["nfe"]) for r in table] == [2, 4]
    assert (out / "results.md").read_text().count("\n") == 2 + len(rows)
    assert (out / "ap_vs_latency.png").stat().st_size > 1000
