"""Shared fixtures: tiny checkpoints, a ROS domain of our own, node subprocesses, topic helpers."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ros_anomaly_diffusion.ros.transport import large_frame_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # console scripts of the venv running the tests
# The real RUGD frames beside the checkout (CI clones next to shared/); RUGD_SAMPLE overrides.
RUGD_SAMPLE = Path(os.environ.get("RUGD_SAMPLE", ROOT.parent / "shared" / "data" / "rugd-sample"))

# One DDS domain per test run, so parallel runs (and other engineers' nodes) never meet ours.
# Set before anything initialises rclpy; subprocesses inherit it.
os.environ["ROS_DOMAIN_ID"] = str(random.Random(os.getpid() ^ time.time_ns()).randint(10, 200))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ["RCUTILS_COLORIZED_OUTPUT"] = "0"
os.environ["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
os.environ["PYTHONUNBUFFERED"] = "1"
# The DDS settings every process of the package uses (ros/transport.py), for this process too:
# the publisher's setting decides whether camera-sized frames arrive over best effort.
os.environ.update(large_frame_env(os.environ, ROOT / "config"))


@pytest.fixture(scope="session")
def rugd_sample() -> Path:
    """The RUGD sample folder; every test that needs it skips (never fails) where it is absent."""
    if not RUGD_SAMPLE.is_dir():
        pytest.skip(f"RUGD sample not found at {RUGD_SAMPLE} (set RUGD_SAMPLE to its folder)")
    return RUGD_SAMPLE


def make_checkpoint(directory: Path, num_train_timesteps: int = 1000, mask_threshold: float = 0.3,
                    frame_threshold: float = 0.5) -> Path:
    """Tiny untrained pixel-family UNet checkpoint (32x40), calibrated for ddim and ddpm."""
    import torch

    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
    from ros_anomaly_diffusion.core.samplers import ScheduleConfig

    torch.manual_seed(0)
    cfg = unet_config("pixel", "tiny", 3, (32, 40))
    net = build_denoiser("unet", cfg)
    calib = {"mask_threshold": mask_threshold, "frame_threshold": frame_threshold}
    ckpt.save(directory, {"family": "pixel", "image_size": [32, 40],
                          "denoiser": {"kind": "unet", "config": cfg},
                          "schedule": ScheduleConfig(num_train_timesteps=num_train_timesteps).to_dict(),
                          "calibration": {"ddim": dict(calib), "ddpm": dict(calib), **calib}},
              {"denoiser": net.state_dict()})
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def short_checkpoint(tmp_path_factory) -> Path:
    """50 training timesteps: the ddpm variant (all T steps) takes ~1 s a frame instead of ~17 s."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "short", num_train_timesteps=50)


def make_family_checkpoint(directory: Path, family: str, mask_threshold: float = 0.3,
                           frame_threshold: float = 0.5) -> Path:
    """Tiny checkpoint of the "feature_diffusion" (inversion), "knn" (64x96 input) or "latent" (dcae:
    untrained tiny DC-AE + DiT, 32x40 input) family, calibrated."""
    from checkpoints import init_checkpoint

    variant = {"feature_diffusion": "inversion", "knn": "knn", "latent": "dcae"}[family]
    return init_checkpoint(variant, directory, calibration={variant: {
        "mask_threshold": mask_threshold, "frame_threshold": frame_threshold}})


def make_legacy_feature_checkpoint(directory: Path, family: str, monkeypatch) -> Path:
    """A "feature_diffusion" or "knn" checkpoint as written before the config recorded its feature
    blocks: the taps of feature_space.LEGACY_BLOCKS (the "stride 2" one is block 1, at stride 4),
    200 channels, and "strides": [2, 4, 8, 16] only as their names. The inversion family then
    was called "features": the config says so."""
    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.families import feature_space

    real, legacy = feature_space.shared_features, tuple(feature_space.LEGACY_BLOCKS.values())
    with monkeypatch.context() as m:
        m.setattr(feature_space, "shared_features", lambda *a, **k: real(legacy, *a[1:], **k))
        make_family_checkpoint(directory, family)
    features = ckpt.load_config(directory)["features"]
    del features["blocks"]
    old_name = {"feature_diffusion": "features"}.get(family, family)
    ckpt.update_config(directory, features=features, family=old_name)
    return directory


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family name -> its tiny checkpoint (make_family_checkpoint), written on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_family_checkpoint(tmp_path_factory.mktemp("ckpt") / family, family)
        return made[family]

    return get


def random_frame(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- processes


class NodeProcess:
    """A console-script node in its own process; output (stdout+stderr) collected by a thread."""

    def __init__(self, script: str, args: list[str], env: dict | None = None):
        cmd = [str(BIN / script), *args]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self._lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def output(self) -> str:
        with self._cv:
            return "".join(self._lines)

    def wait_for_output(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """First match of the regex in the output; fails with the output if it does not come."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                m = rx.search("".join(self._lines))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cv.wait(min(left, 0.2))
        raise AssertionError(f"{pattern!r} not in the output of {' '.join(self.cmd)} "
                             f"(exit code {self.proc.poll()}):\n{self.output}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigint(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(2.0)

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(2.0)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(2.0)


def _spawner():
    """spawn(script, *args) -> NodeProcess; every process is killed when the fixture ends."""
    procs: list[NodeProcess] = []

    def _spawn(script: str, *args: str, env: dict | None = None) -> NodeProcess:
        p = NodeProcess(script, list(args), env)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.kill()


@pytest.fixture
def spawn():
    yield from _spawner()


@pytest.fixture(scope="module")
def spawn_module():
    yield from _spawner()


def detector_args(checkpoint: Path, *extra: str, variant: str | None = "ddim") -> list[str]:
    """Node arguments for `checkpoint` (the tests' tiny checkpoints are pixel models, hence ddim;
    variant=None leaves the variant to a parameter file)."""
    return ["--ros-args", "-p", f"checkpoint:={checkpoint}", *(["-p", f"variant:={variant}"] if variant else []),
            *extra]


# --------------------------------------------------------------------------- the test's own ROS node


class Probe:
    """The test process's rclpy node: publishers, collecting subscriptions, spinning helpers."""

    count = 0

    def __init__(self):
        import rclpy

        self.rclpy = rclpy
        Probe.count += 1
        self.node = rclpy.create_node(f"test_probe_{os.getpid()}_{Probe.count}")
        self.received: dict[str, list[tuple[float, object]]] = {}

    def publisher(self, msg_type, topic: str, depth: int = 10):
        return self.node.create_publisher(msg_type, topic, depth)

    def collect(self, msg_type, topic: str, depth: int = 50) -> list[tuple[float, object]]:
        """Subscribe; the returned list fills with (arrival wall time, message)."""
        box = self.received.setdefault(topic, [])
        self.node.create_subscription(msg_type, topic, lambda m: box.append((time.time(), m)), depth)
        return box

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.rclpy.spin_once(self.node, timeout_sec=min(0.02, max(0.0, end - time.monotonic())))

    def spin_until_or_timeout(self, condition, timeout: float) -> bool:
        """Spin until condition() is true (True) or the timeout passes (False)."""
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                return False
            self.rclpy.spin_once(self.node, timeout_sec=0.02)
        return True

    def spin_until(self, condition, timeout: float, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.rclpy.spin_once(self.node, timeout_sec=0.02)

    def wait_for_subscriber(self, pub, timeout: float = 30.0) -> None:
        self.spin_until(lambda: pub.get_subscription_count() > 0, timeout, f"a subscriber on {pub.topic_name}")

    def wait_for_publisher(self, topic: str, timeout: float = 30.0) -> None:
        self.spin_until(lambda: self.node.count_publishers(topic) > 0, timeout, f"a publisher on {topic}")

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        client = self.node.create_client(srv_type, name)
        try:
            self.spin_until(lambda: client.service_is_ready(), timeout, f"service {name}")
            future = client.call_async(request)
            self.spin_until(future.done, timeout, f"the reply of {name}")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def destroy(self) -> None:
        self.node.destroy_node()


@pytest.fixture(scope="session")
def ros():
    import rclpy

    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


@pytest.fixture
def probe(ros):
    p = Probe()
    yield p
    p.destroy()


@pytest.fixture(scope="module")
def probe_module(ros):
    p = Probe()
    yield p
    p.destroy()


def stamped_image(rgb: np.ndarray, sec: int, nanosec: int = 0, frame_id: str = "test_cam"):
    from std_msgs.msg import Header

    from ros_anomaly_diffusion.ros import image_codec

    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = int(sec), int(nanosec)
    return image_codec.rgb_to_image(rgb, header)


def stamp_of(msg) -> tuple[int, int]:
    return int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)


def as_array(msg) -> np.ndarray:
    """A detector output Image (mono8, 32FC1 or rgb8) as an (H, W) or (H, W, 3) array."""
    dtype = {"mono8": np.uint8, "32FC1": np.float32, "rgb8": np.uint8}[msg.encoding]
    a = np.frombuffer(bytes(msg.data), dtype=np.dtype(dtype).newbyteorder("<"))
    return a.reshape(msg.height, msg.width, 3) if msg.encoding == "rgb8" else a.reshape(msg.height, msg.width)


def by_stamp(box, stamp):
    return [m for _, m in box if stamp_of(m) == stamp]


def send_until(probe, pub, box, msg, timeout=90.0, resend=3.0):
    """Publish `msg` (again every `resend` s: the first may go out before discovery has
    finished, best-effort may lose it) until an output in `box` carries its stamp; returns it."""
    stamp = stamp_of(msg)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pub.publish(msg)
        t = min(end, time.monotonic() + resend)
        while time.monotonic() < t:
            probe.spin_for(0.05)
            got = by_stamp(box, stamp)
            if got:
                return got[0]
    raise AssertionError(f"no output with stamp {stamp} within {timeout} s")
