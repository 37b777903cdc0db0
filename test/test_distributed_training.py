"""Training under accelerate with two CPU processes (DDP over gloo), launched as a user does:
`accelerate launch --multi_gpu --num_processes 2 -m ros_anomaly_diffusion train ...` (on a CPU
machine `--multi_gpu` starts the processes with torchrun; `--cpu` alone starts one unless MPI
is set up). Every family on the real RUGD sample: both processes run and read different frames,
one of them writes the checkpoint, and runs resume across process counts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import BIN
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.families.fitting import STATE, TrainOptions
from ros_anomaly_diffusion.engine.training import train

# (variant, image size, extra train arguments): tiny models, a few steps; what is checked is the
# distribution of the work, not what the models learn.
FAMILIES = [("ddim", (32, 40), ["--steps", "4"]), ("dcae", (32, 40), ["--steps", "4"]),
            ("inversion", (64, 96), ["--steps", "4"]), ("knn", (64, 96), [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, data, out, variant: str, size, *extra: str) -> str:
    """Run `train` in `processes` processes (accelerate launch); its combined output."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--main_process_port", str(_free_port()), "-m", "ros_anomaly_diffusion", "-q", "train",
           "--variant", variant, "--data", str(data), "--out", str(out), "--image-size", *map(str, size),
           "--preset", "tiny", "--batch-size", "2", "--seed", "0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two cores: no oversubscription
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize("variant, size, extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_two_processes_share_the_frames_and_one_writes_the_checkpoint(variant, size, extra, rugd_sample, tmp_path):
    out = tmp_path / variant
    output = launch(2, rugd_sample, out, variant, size, *extra)
    training = ckpt.load_config(out)["training"]
    assert training["processes"] == 2
    first, second = training["frames_by_process"]
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(training["frames"])  # every training frame, once
    assert output.count("wrote the checkpoint") == 1, output[-4000:]
    assert output.count("checkpoint written to") == 1
    if variant != "knn":
        assert training["steps"] == 4


def test_two_processes_select_the_same_knn_cells_and_values_within_float_rounding(rugd_sample, tmp_path):
    """knn gathers its bank and statistics across processes. Two processes (one thread each, as
    `accelerate launch` runs them) against one (this process, with torch's own thread count):
    the same cells in the bank, exactly -- chosen by per-cell hash keys and ID weights, never by
    feature values; their vectors, the channel statistics, the leave-one-out moments and the
    calibrated thresholds equal to float rounding. Not bit for bit: how the backbone's
    convolutions add up depends on the thread count and the CPU (on an AVX2 CPU oneDNN splits a
    1x1 convolution's input channels between threads; one vs two threads differ by up to 3e-6
    on standardised vectors), and sums over two shards round in another order than over one."""
    two = tmp_path / "two"
    launch(2, rugd_sample, two, "knn", (64, 96))
    one = train(rugd_sample, tmp_path / "one", TrainOptions(variant="knn", image_size=(64, 96), preset="tiny",
                                                            batch_size=2, seed=0), progress=False)
    bank_one, bank_two = ckpt.load_tensors(one, "bank"), ckpt.load_tensors(two, "bank")
    assert torch.equal(bank_one["origin"], bank_two["origin"]), "another selection of cells, or another order"
    # standardised features (unit scale) and the raw channel statistics (magnitude up to ~10)
    torch.testing.assert_close(bank_one["vectors"], bank_two["vectors"], rtol=1e-4, atol=1e-4)
    stats_one, stats_two = ckpt.load_tensors(one, "features"), ckpt.load_tensors(two, "features")
    assert stats_one.keys() == stats_two.keys() == {"mean", "std"}
    for k in stats_one:
        torch.testing.assert_close(stats_one[k], stats_two[k], rtol=1e-4, atol=1e-4)
    ca, cb = ckpt.load_config(one), ckpt.load_config(two)
    assert ca["bank"] == cb["bank"]  # size, candidates, seed, sampling
    assert ca["scores"]["pixel"] == pytest.approx(cb["scores"]["pixel"], rel=1e-4)  # leave-one-out mean, std
    assert ca["calibration"].keys() == cb["calibration"].keys() == {"knn"}
    thresholds = ("mask_threshold", "frame_threshold")  # of scores in [0, 1]
    cal_one, cal_two = ca["calibration"]["knn"], cb["calibration"]["knn"]
    assert {k: v for k, v in cal_one.items() if k not in thresholds} == \
        {k: v for k, v in cal_two.items() if k not in thresholds}  # the same held-out frames and rates
    assert [cal_one[k] for k in thresholds] == pytest.approx([cal_two[k] for k in thresholds], abs=1e-4)


def test_a_run_resumes_with_another_number_of_processes(rugd_sample, tmp_path, caplog):
    """Two processes stop at step 4; one process resumes there and goes to 6; two processes
    resume that at 6 and go to 8. The train state does not depend on the process count."""
    out = tmp_path / "ddim"
    args = ("ddim", (32, 40), "--save-every", "2")
    launch(2, rugd_sample, out, *args, "--steps", "4")
    assert ckpt.load_config(out / STATE)["step"] == 4
    opts = TrainOptions(variant="ddim", image_size=(32, 40), preset="tiny", batch_size=2, seed=0, steps=6,
                        save_every=2)
    with caplog.at_level("INFO"):
        train(rugd_sample, out, opts, progress=False)
    assert f"resumed {out / STATE} at step 4" in caplog.text
    assert ckpt.load_config(out)["training"]["steps"] == 6 and ckpt.load_config(out)["training"]["processes"] == 1
    output = launch(2, rugd_sample, out, *args, "--steps", "8")
    assert output.count(f"resumed {out / STATE} at step 6") == 2  # both processes load the same state
    assert ckpt.load_config(out)["training"]["steps"] == 8


def test_the_cli_takes_the_accelerate_options(rugd_sample, tmp_path):
    """--grad-accum and --log-with tensorboard in one process: the run counts optimizer steps
    and writes TensorBoard event files; --mixed-precision bf16 trains with fp32 weights."""
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "ros_anomaly_diffusion", "-q", "train", "--variant", "ddim", "--data",
           str(rugd_sample), "--out", str(out), "--image-size", "32", "40", "--preset", "tiny", "--batch-size", "2",
           "--steps", "3", "--grad-accum", "2", "--log-every", "1", "--log-with", "tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load_config(out)["training"]["steps"] == 3
    assert [line for line in proc.stderr.splitlines() if "loss" in line and "step" in line][-1].startswith(
        "INFO ros_anomaly_diffusion.core.families.fitting: step 3: loss")
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    options = json.loads((out / "config.json").read_text())["training"]["options"]
    assert options["grad_accum"] == 2 and options["log_with"] == "tensorboard"
    bf16 = tmp_path / "bf16"  # autocast: computed in bf16, weights kept and stored in fp32
    proc = subprocess.run(cmd[:-8] + ["--out", str(bf16), "--steps", "2", "--mixed-precision", "bf16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load_config(bf16)["training"]["options"]["mixed_precision"] == "bf16"
    assert {t.dtype for t in ckpt.load_tensors(bf16, "denoiser").values()} == {torch.float32}
