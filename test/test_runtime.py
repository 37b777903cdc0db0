"""The ROS-free runtime (core/runtime.py) through its public interface: the one-slot mailbox,
the model lifecycle (live change, rebuild, failed rebuild, release, load), downscaling,
statistics that add up and the health verdict. No ROS here: the worker is driven with
step(), except in the thread test."""
from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from conftest import random_frame
from ros_anomaly_diffusion.core.detector import Detector, FrameResult, validate_frame
from ros_anomaly_diffusion.core.runtime import BadInput, Runtime, downscaled_size
from ros_anomaly_diffusion.core.stream_stats import STAGES
from ros_anomaly_diffusion.core.settings import Settings
from ros_anomaly_diffusion.core.variants import get_variant

pytestmark = pytest.mark.timeout(300)


class StubDetector:
    """Stands in for a Detector where only the runtime's bookkeeping is under test."""

    device = torch.device("cpu")
    backend = "torch"
    nfe = 0
    mask_threshold = frame_threshold = 0.5

    def __init__(self, checkpoint, settings: Settings):
        self.settings = settings
        self.variant = get_variant(settings.variant or "knn")
        self.shapes: list[tuple] = []
        self.batches: list[int] = []  # frames per model call
        self.fail: Exception | None = None  # raised by the next process()

    def update(self, **changes) -> list[str]:
        self.settings = self.settings.updated(**changes)
        return []

    def process_batch(self, frames: list[np.ndarray]) -> list[FrameResult]:
        self.batches.append(len(frames))
        return [self.process(rgb) for rgb in frames]

    def process(self, rgb: np.ndarray) -> FrameResult:
        validate_frame(rgb)
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        self.shapes.append(rgb.shape[:2])
        score = np.zeros(rgb.shape[:2], np.float32)
        return FrameResult(score, score > 0.5, 0.0, False, timings_ms={"model": 1.0})


class Log:
    """A logger that keeps its lines: (level, text)."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, text):
        self.lines.append(("info", text))

    def warning(self, text):
        self.lines.append(("warning", text))

    def error(self, text):
        self.lines.append(("error", text))

    def count(self, needle: str) -> int:
        return sum(needle in text for _, text in self.lines)


class Harness:
    """A Runtime whose results and reverts are recorded; build() makes `kind`
    detectors (StubDetector or the real Detector) and fails while `failing` is set."""

    def __init__(self, settings: Settings, kind=StubDetector, on_result=None, **kwargs):
        self.kind, self.failing, self.builds = kind, False, 0
        self.results: list = []
        self.also = on_result  # a test's own look at each (token, rgb, result, det)
        self.reverts: list = []
        self.served = threading.Event()
        self.log = Log()
        self.rt = Runtime(settings, build=self.build, log=self.log, on_result=self.on_result,
                          on_revert=lambda running, names: self.reverts.append((running, names)), **kwargs)

    def build(self, checkpoint, settings):
        if self.failing:
            raise RuntimeError("no memory for the model")
        self.builds += 1
        return self.kind(checkpoint, settings)

    def on_result(self, token, rgb, result, det):
        self.results.append((token, rgb.shape[:2]))
        if self.also is not None:
            self.also(token, rgb, result, det)
        self.served.set()


def tiny_settings(checkpoint, **changes) -> Settings:
    return Settings.of(checkpoint=str(checkpoint), variant="ddim", steps=2, segments="none", **changes)


def test_the_mailbox_keeps_only_the_newest_frame():
    h = Harness(Settings.of(variant="ddim"))
    h.rt.load()
    for i in range(5):
        h.rt.submit(random_frame(seed=i), i)
    h.rt.step()
    h.rt.step()  # nothing left
    assert h.results == [(4, (48, 64))]
    s = h.rt.stats()
    assert (s.received, s.processed, s.dropped) == (5, 1, 4)


def test_live_change_rebuild_and_a_failed_rebuild_keeps_the_old_model(tiny_checkpoint):
    h = Harness(tiny_settings(tiny_checkpoint), kind=Detector)
    h.rt.load()
    first = h.rt.detector
    assert h.builds == 1 and first.mask_threshold == pytest.approx(0.3)  # calibrated

    assert h.rt.change(mask_threshold=0.7) is None  # live: same model, new threshold
    h.rt.step()
    assert h.rt.detector is first and first.mask_threshold == 0.7 and h.builds == 1
    assert h.log.count("applied mask_threshold=0.7") == 1

    assert h.rt.change(segments="superpixel") is None  # needs a new model
    h.rt.step()
    second = h.rt.detector
    assert second is not first and second.settings.post.segments == "superpixel" and h.builds == 2
    assert h.log.count("model reloaded in") == 1

    h.failing = True
    assert h.rt.change(segments="none") is None
    h.rt.step()
    assert h.rt.detector is second and h.rt.settings.post.segments == "superpixel"  # set back
    assert h.reverts == [(second.settings, ["segments"])]
    assert h.log.count("model reload failed, keeping the running model (ddim on cpu)") == 1
    h.rt.submit(random_frame(seed=1), "after")  # the old model still serves
    h.rt.step()
    assert h.results == [("after", (48, 64))]

    # refused at once, nothing changes: a value out of range, a checkpoint of another family
    assert "steps" in h.rt.change(steps=0)
    assert "variant 'knn' needs a 'knn' one" in h.rt.change(variant="knn")
    assert "config.json: missing" in h.rt.change(checkpoint="/nonexistent/ckpt")
    assert h.rt.settings == second.settings


def test_release_frees_the_detector_and_load_brings_it_back():
    h = Harness(Settings.of(variant="ddim"))
    h.rt.load()
    h.rt.start()
    released = weakref.ref(h.rt.detector)
    h.rt.release()  # stops the worker first
    gc.collect()
    assert h.rt.detector is None and released() is None and not h.rt.running  # nothing holds the model
    assert h.log.count("model released (ddim on cpu)") == 1
    with pytest.raises(RuntimeError, match="before load"):
        h.rt.start()

    h.rt.load()
    assert h.rt.detector is not None and h.builds == 2
    h.failing = True
    second = h.rt.detector
    with pytest.raises(RuntimeError, match="no memory for the model"):  # the caller (configure) hears why
        h.rt.load()
    assert h.rt.detector is second


def test_the_worker_restarts_after_stop_and_a_frame_left_waiting_is_dropped():
    h = Harness(Settings.of(variant="ddim"))
    h.rt.load()
    h.rt.start()
    h.rt.stop()  # a deactivated node
    h.rt.submit(random_frame(seed=1), "while stopped")
    h.rt.start()  # activated again: the stale frame is not served
    try:
        h.rt.submit(random_frame(seed=2), "fresh")
        assert h.served.wait(30)
        assert h.results == [("fresh", (48, 64))] and h.rt.stats().dropped == 1
    finally:
        h.rt.stop()


def test_frames_above_max_input_pixels_are_downscaled_and_logged_once():
    h = Harness(Settings.of(variant="ddim"), max_input_pixels=10_000, source="/cam/image")
    h.rt.load()
    big = np.zeros((200, 300, 3), np.uint8)
    for i in range(2):
        h.rt.submit(big, i)
        h.rt.step()
    h.rt.submit(random_frame(), "small")
    h.rt.step()
    scale = (10_000 / 60_000) ** 0.5
    expected = (int(200 * scale), int(300 * scale))
    assert h.results == [(0, expected), (1, expected), ("small", (48, 64))]
    assert expected[0] * expected[1] <= 10_000
    assert h.rt.stats().downscaled == 2
    assert h.log.count(f"frame of 300x200 pixels on /cam/image is above max_input_pixels=10000: downscaled to "
                       f"{expected[1]}x{expected[0]}") == 1
    assert downscaled_size(4000, 10, 4096)[1] == 8  # never below 8 pixels a side
    assert downscaled_size(64, 64, 4096) is None


def test_statistics_add_up_and_the_window_rates_them():
    h = Harness(Settings.of(variant="ddim"), source="cam", bad_input_log_period=0.0)
    h.rt.load()

    def unreadable():
        raise BadInput("encoding", "unsupported image encoding 'yuv422_weird'")

    h.rt.submit(random_frame(seed=1), "dropped")
    h.rt.submit(random_frame(seed=2), "processed")  # replaces the first
    h.rt.step()
    h.rt.submit(unreadable, "bad")
    h.rt.step()
    h.rt.submit(random_frame(4, 4), "small")  # the model's minimum is 8x8
    h.rt.step()
    h.rt.detector.fail = RuntimeError("cuDNN error")
    h.rt.submit(random_frame(seed=3), "failing")
    h.rt.step()

    s = h.rt.stats()
    assert (s.received, s.processed, s.dropped, s.inference_errors) == (5, 1, 1, 1)
    assert s.bad_input == {"encoding": 1, "frame": 1}
    assert s.received == s.processed + s.dropped + sum(s.bad_input.values()) + s.inference_errors
    assert [t for t, _ in h.results] == ["processed"]
    assert h.log.count("bad input frame on cam (encoding): unsupported image encoding 'yuv422_weird'; "
                       "frame skipped (1 encoding error(s) so far)") == 1
    assert h.log.count("bad input frame on cam (frame): frame of 4x4 pixels is too small") == 1
    assert h.log.count("inference failed, frame skipped (1 inference error(s) so far): RuntimeError: cuDNN") == 1

    w = h.rt.window()
    assert (w.received, w.processed, w.inference_errors, len(w.latency_s)) == (5, 1, 1, 1)
    # where the processed frame's time went: every stage once, decode and publish measured here
    assert {k: len(v) for k, v in w.stages_ms.items()} == {k: 1 for k in STAGES}
    assert w.stage_p50_ms("decode") >= 0 and w.stage_p50_ms("publish") >= 0
    assert w.input_rate_hz == pytest.approx(5 / w.seconds) and w.model_p50_ms == 1.0
    assert w.latency_p50_ms == w.latency_max_ms >= 0
    w2 = h.rt.window()  # a new window: nothing happened in it
    assert (w2.received, w2.processed, w2.latency_s, w2.latency_p50_ms) == (0, 0, (), None)
    assert w2.stats.received == 5


def test_health_rules():
    h = Harness(Settings.of(variant="ddim"))
    assert (h.rt.window().health().level, h.rt.window().health().message) == ("warn", "no model loaded")
    h.rt.load()
    verdict = h.rt.window().health()
    assert (verdict.level, verdict.message) == ("warn", "no input frames")

    h.rt.submit(random_frame(4, 4), "too small")
    h.rt.step()
    verdict = h.rt.window().health()
    assert (verdict.level, verdict.message) == ("warn", "only bad input frames")

    h.rt.detector.fail = torch.cuda.OutOfMemoryError("CUDA out of memory")
    h.rt.submit(random_frame(), "failing")
    h.rt.step()
    verdict = h.rt.window().health()
    assert (verdict.level, verdict.message) == ("error", "inference failing")

    h.rt.submit(random_frame(), "served")
    h.rt.step()
    verdict = h.rt.window().health()
    assert (verdict.level, verdict.message) == ("ok", "running")


def test_the_worker_thread_serves_frames_until_stopped():
    h = Harness(Settings.of(variant="ddim"))
    h.rt.load()
    h.rt.start()
    try:
        assert h.rt.running
        h.rt.submit(random_frame(), "threaded")
        assert h.served.wait(30) and h.results == [("threaded", (48, 64))]
    finally:
        h.rt.stop()
    assert not h.rt.running


class ScriptedDetector(StubDetector):
    """Frame scores from a script (the frame's first pixel indexes it), per-pixel scores 0.2 or 0.8."""

    script = [0.1, 0.9, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]

    def process(self, rgb):
        fs = self.script[int(rgb[0, 0, 0])]
        score = np.full(rgb.shape[:2], 0.8 if fs > 0.5 else 0.2, np.float32)
        return FrameResult(score, score > self.mask_threshold, fs, fs > self.frame_threshold)


def frame_number(i: int) -> np.ndarray:
    rgb = random_frame(seed=i)
    rgb[0, 0, 0] = i
    return rgb


def test_the_stream_gets_the_filtered_flag_and_the_smoothed_mask():
    flags, smoothed = [], []
    h = Harness(Settings.of(variant="ddim", flag_window=3, flag_raise_count=2, flag_clear_count=2, score_ema_alpha=0.5),
                kind=ScriptedDetector,
                on_result=lambda token, rgb, r, det: (flags.append(r.ood_filtered), smoothed.append(r.mask_smoothed)))
    h.rt.load()
    for i in range(len(ScriptedDetector.script)):
        h.rt.submit(frame_number(i), i)
        h.rt.step()
    # the spike at frame 1 alone raises nothing; frames 4-5 raise it (2 of 3); 7-8 clear it (2 below)
    assert flags == [False, False, False, False, False, True, True, True, False, False]
    # EMA alpha 0.5 of the 0.2/0.8 maps (0.2, 0.5, 0.35, 0.275, 0.54, 0.67, 0.73, 0.47, ...) against the 0.5
    # mask threshold: the lone 0.8 at frame 1 stays out, the run from frame 4 comes in at once
    assert [bool(m.all()) for m in smoothed] == [False, False, False, False, True, True, True, False, False, False]

    # live: per-frame flag (1 of 1) from the next frame on, smoothing off
    assert h.rt.change(flag_window=1, flag_raise_count=1, flag_clear_count=1, flag_hysteresis=0.0,
                       score_ema_alpha=1.0) is None
    flags.clear(), smoothed.clear()
    for i in (1, 2):
        h.rt.submit(frame_number(i), i)
        h.rt.step()
    assert flags == [True, False] and smoothed == [None, None]
    assert "flag_raise_count (4) must not exceed flag_window (1)" in h.rt.change(flag_raise_count=4)


def test_one_family_rule_for_the_detector_and_the_runtime(tiny_checkpoint):
    """A pixel checkpoint cannot serve knn: the Detector refuses it naming its config.json, and
    the runtime's cheap pre-build check gives the same reason before building anything."""
    from ros_anomaly_diffusion.core.checkpoint import CheckpointError
    from ros_anomaly_diffusion.core.runtime import checkpoint_problem

    knn = Settings.of(checkpoint=str(tiny_checkpoint), variant="knn")
    with pytest.raises(CheckpointError, match=r"config\.json holds a 'pixel' model, variant 'knn' needs a 'knn' one"):
        Detector(tiny_checkpoint, knn)
    assert checkpoint_problem(knn) == (f"checkpoint {tiny_checkpoint} holds a 'pixel' model, "
                                       f"variant 'knn' needs a 'knn' one; this checkpoint serves ddpm, ddim "
                                       f"(or leave the variant empty: the checkpoint's 'ddim')")
    assert checkpoint_problem(Settings.of(checkpoint=str(tiny_checkpoint), variant="ddim")) is None


def test_the_newest_frame_of_each_source_goes_through_the_model_in_one_batch():
    seen = []
    h = Harness(Settings.of(variant="ddim", flag_window=2, flag_raise_count=2, flag_clear_count=1, flag_hysteresis=0.0),
                kind=ScriptedDetector, on_result=lambda token, rgb, r, det: seen.append((token, r.frame_score,
                                                                                          r.ood_filtered)))
    h.rt.load()
    h.rt.submit(frame_number(0), "front old", source="front")
    h.rt.submit(frame_number(1), "front", source="front")  # replaces front's older frame only
    h.rt.submit(frame_number(0), "rear", source="rear")
    h.rt.step()
    assert h.rt.detector.batches == [2]  # one model call for both cameras
    assert seen == [("front", 0.9, False), ("rear", 0.1, False)]  # each with its own frame
    s = h.rt.stats()
    assert (s.received, s.processed, s.dropped) == (3, 2, 1)
    # flags are per source: front's second high score raises its flag (2 of 2), which one
    # filter shared with rear's low score in between would not
    h.rt.submit(frame_number(4), "front again", source="front")
    h.rt.step()
    assert seen[-1] == ("front again", 0.9, True) and h.rt.detector.batches == [2, 1]
