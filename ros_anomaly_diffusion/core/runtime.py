"""The detector at run time, without ROS: what a node (or any frame source) needs around a Detector.

- **Mailbox** (core/mailbox.py): one slot per source (camera). `submit()` drops a frame in and returns at once;
  a newer frame of the same source replaces an unprocessed one (counted as dropped), so a slow
  model never builds a backlog and results always describe the newest frame available when
  the model got free. The newest frame of every source goes through the model in one batch.
- **Model host**: `load()` builds the Detector in the caller's thread (errors propagate: a
  managed node's configure transition fails with them), `release()` drops it so its CPU/GPU
  memory goes back to the system; `step()` (called in a loop by the worker thread of
  `start()`, or by the caller itself) applies `change(**settings)` first: live settings on the
  next frame, others by rebuilding the Detector; a failed rebuild keeps the old model and
  reports the settings set back. `start()` and `stop()` may alternate (a node deactivated and
  activated again); a frame waiting when the worker stops is dropped.
- **Over the stream**: every result gets its source's temporally filtered OOD flag
  (`ood_filtered`, core/temporal.FlagFilter with the flag_* settings) and, with
  score_ema_alpha < 1, the mask of its source's score-map moving average (`mask_smoothed`);
  both restart when the worker starts again.
- **Downscaling**: frames above `max_input_pixels` are shrunk (INTER_AREA, aspect kept), which
  bounds memory and output size whatever the camera sends; the outputs keep that size.
- **Statistics and health** (core/stream_stats.py): `stats()` (totals), `window()` (what happened since the previous
  window: rates, latencies) and `Window.health()` (the verdict a diagnostics message carries).

Frames are RGB uint8 arrays, or zero-argument callables returning one (decoded in the worker,
not in the caller's thread); a decoder raises `BadInput` for a frame it cannot read. Each
result goes to `on_result(token, rgb, result, detector)` with the token given to `submit()`.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from . import checkpoint as ckpt
from .detector import Detector, validate_frame
from .mailbox import Mailbox
from .settings import Settings
from .stream_stats import STAGES, Stats, Throttle, Window
from .temporal import FlagFilter, ScoreMapEMA
from .variants import family_mismatch


class BadInput(Exception):
    """A frame that cannot be used; `kind` groups the causes for counting (encoding, size, ...)."""

    def __init__(self, kind: str, error: Exception | str):
        super().__init__(str(error))
        self.kind = kind


def downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) a frame above `max_pixels` is shrunk to (aspect ratio kept), else None."""
    if width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    # never below 8 pixels a side (the Detector's minimum) because of the downscaling itself
    return max(min(width, 8), int(width * scale)), max(min(height, 8), int(height * scale))


def checkpoint_problem(settings: Settings) -> str | None:
    """Why `settings.checkpoint` (empty: the shipped default model) cannot serve
    `settings.variant` (missing, pickled, wrong family), read from config.json alone: a cheap
    check before an expensive model build."""
    directory = ckpt.resolve(settings.checkpoint)
    try:
        config = ckpt.load_config(directory)
    except ckpt.CheckpointError as err:
        return str(err)
    return family_mismatch(settings.variant, config, f"checkpoint {directory}")


def _malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Runtime:
    """Mailbox, model host, downscaling, statistics and health around one Detector.

    settings: what to load; max_input_pixels: None never downscales (may be changed at any time,
    like bad_input_log_period); source: the input's name in log lines; on_result(token, rgb,
    result, detector): called in the worker for every result; on_revert(running, names): settings
    were set back to the running ones (a change could not be applied); build(checkpoint, settings)
    -> Detector; log: any object with info/warning/error(str).
    """

    def __init__(self, settings: Settings, *, max_input_pixels: int | None = None,
                 source: str = "input", bad_input_log_period: float = 5.0,
                 on_result: Callable[[Any, np.ndarray, Any, Any], None] = lambda *a: None,
                 on_revert: Callable[[Settings, list[str]], None] = lambda running, names: None,
                 build: Callable[[str, Settings], Any] = Detector, log=None):
        self.max_input_pixels = max_input_pixels
        self.source = source
        self.bad_input_log_period = float(bad_input_log_period)
        self._on_result, self._on_revert = on_result, on_revert
        self._build = build
        self._log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()  # guards what both threads touch: requested state, counters
        self._desired = settings
        self._detector = None
        self._mailbox = Mailbox()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._throttle = Throttle()
        self._received = self._processed = self._inference_errors = 0
        self._downscaled = 0
        self._bad: Counter = Counter()
        self._latency: list[float] = []
        self._model_ms: list[float] = []
        self._stages: dict[str, list[float]] = {k: [] for k in STAGES}
        self._last_input: float | None = None
        self._window_start = (time.monotonic(), 0, 0, 0)
        self._flags: dict[Any, FlagFilter] = {}  # per source
        self._emas: dict[Any, ScoreMapEMA] = {}

    # ------------------------------------------------------------------ state (any thread)

    @property
    def detector(self):
        """The Detector serving frames now; None before load() and after release()."""
        return self._detector

    @property
    def settings(self) -> Settings:
        """The requested settings (the running Detector's once the worker has applied them)."""
        with self._lock:
            return self._desired

    def change(self, **changes: Any) -> str | None:
        """Request new settings; the reason they are refused (nothing changes then), or None.
        Validated at once (values, and config.json when checkpoint or variant change), applied
        by the worker before the next frame."""
        with self._lock:
            try:
                desired = self._desired.updated(**changes)
            except ValueError as err:
                return str(err)
            if {"checkpoint", "variant"} & set(changes):
                reason = checkpoint_problem(desired)
                if reason:
                    return reason
            self._desired = desired
        if changes:
            self._mailbox.poke()
        return None

    def load(self) -> None:
        """Load the model now, in the caller's thread; errors propagate (the previous model, if
        any, is kept then)."""
        s = self.settings
        t0 = time.monotonic()
        det = self._detector = self._build(s.checkpoint, s)
        self._log.info(f"model loaded in {time.monotonic() - t0:.1f} s: variant {det.variant.name} "
                       f"(NFE {det.nfe}) on {det.device} ({det.backend}), checkpoint {s.checkpoint}, thresholds "
                       f"mask {det.mask_threshold:.3f} frame {det.frame_threshold:.3f}")

    def release(self) -> None:
        """Stop the worker and drop the model: its CPU/GPU memory goes back to the system."""
        self.stop()
        det, self._detector = self._detector, None
        if det is None:
            return
        on_cuda = det.device.type == "cuda"
        desc = f"{det.variant.name} on {det.device}"
        del det
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        _malloc_trim()
        self._log.info(f"model released ({desc})")

    # ------------------------------------------------------------------ frames in (any thread)

    def submit(self, frame: np.ndarray | Callable[[], np.ndarray], token: Any = None, source: Any = 0) -> None:
        """Hand over the newest frame (or its decoder) of `source` (a camera); returns at once."""
        now = time.monotonic()
        with self._lock:
            self._received += 1
            self._last_input = now
        self._mailbox.put((frame, token, now), source)

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        """Run step() in a worker thread until stop(); the model must be loaded."""
        if self._detector is None:
            raise RuntimeError("Runtime.start() before load(): no model to serve frames with")
        if self.running:
            return
        # a fresh event per worker: one that outlived stop()'s join (a very slow frame) stays stopped
        self._stop = threading.Event()
        self._mailbox.reopen()
        self._flags, self._emas = {}, {}  # a stream that stopped says nothing about the one that starts
        self._worker = threading.Thread(target=self._work, args=(self._stop,), name="anomaly_inference",
                                        daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
            self._worker = None

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step(timeout=0.2, stop=stop)
            except Exception as err:  # never let the worker die
                if stop.is_set():
                    break
                if self._throttle("unexpected", 5.0):
                    self._log.error(f"unexpected error in the inference thread: {type(err).__name__}: {err}")

    def step(self, timeout: float = 0.0, stop: threading.Event | None = None) -> None:
        """Wait up to `timeout` s for a frame or a settings change, apply the settings, then
        process the frame (if any); nothing once `stop` (the worker's) is set."""
        items = self._mailbox.take(timeout)
        if stop is not None and stop.is_set() or self._detector is None:
            return
        self._apply_settings()
        if items:
            self._process(items, stop)

    def _apply_settings(self) -> None:
        det = self._detector
        desired = self.settings
        if desired == det.settings:
            return
        changes = det.settings.differences(desired)
        try:
            reload = det.update(**changes)
        except ValueError as err:
            self._log.error(f"cannot apply {changes}: {err}")
            self._revert(det.settings, changes)
            return
        if not reload:
            self._log.info("applied " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
            return
        self._log.info(f"rebuilding the model for {', '.join(reload)} ...")
        t0 = time.monotonic()
        try:
            new = self._build(desired.checkpoint, desired)
        except Exception as err:  # keep serving with the old model
            self._log.error(f"model reload failed, keeping the running model ({det.variant.name} on "
                            f"{det.device}): {type(err).__name__}: {err}")
            self._revert(det.settings, changes)
            return
        self._detector = new
        self._log.info(f"model reloaded in {time.monotonic() - t0:.1f} s: variant {new.variant.name} "
                       f"(NFE {new.nfe}) on {new.device} ({new.backend})")

    def _revert(self, running: Settings, changes: dict) -> None:
        with self._lock:
            self._desired = running
        self._on_revert(running, list(changes))

    def _downscale(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        limit = self.max_input_pixels
        size = None if limit is None else downscaled_size(w, h, limit)
        if size is None:
            return rgb
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        with self._lock:
            self._downscaled += 1
        if self._throttle("downscaled", math.inf):
            self._log.warning(
                f"frame of {w}x{h} pixels on {self.source} is above max_input_pixels={limit}: downscaled to "
                f"{size[0]}x{size[1]}; the outputs have that resolution (same aspect ratio, input header). "
                f"Logged once; the count is frames_downscaled in /diagnostics")
        return small

    def _process(self, items: dict[Any, tuple], stop: threading.Event | None = None) -> None:
        """Decode every source's frame, run the model once on all that are usable, deliver."""
        ready = []  # (source, rgb, token, received, decode ms)
        for source, (frame, token, received) in items.items():
            t0 = time.perf_counter()
            try:
                rgb = self._downscale(frame() if callable(frame) else frame)
                validate_frame(rgb)
            except BadInput as err:
                self._bad_input(err.kind, err)
                continue
            except ValueError as err:  # a frame the model cannot take (e.g. too small)
                self._bad_input("frame", err)
                continue
            ready.append((source, rgb, token, received, (time.perf_counter() - t0) * 1000))
        if not ready:
            return
        det = self._detector
        try:
            results = det.process_batch([rgb for _, rgb, _, _, _ in ready])
        except torch.cuda.OutOfMemoryError as err:
            self._inference_failed(err, det, len(ready), oom=True)
            return
        except Exception as err:
            self._inference_failed(err, det, len(ready))
            return
        for (source, rgb, token, received, decode_ms), result in zip(ready, results):
            if stop is not None and stop.is_set():  # stopped during inference: no result after stop()
                return
            self._over_stream(result, det, source)
            t0 = time.perf_counter()
            self._on_result(token, rgb, result, det)
            stages = {"decode": decode_ms, "publish": (time.perf_counter() - t0) * 1000,
                      **{k: result.timings_ms.get(k, float("nan")) for k in ("resize", "network", "post")}}
            latency = time.monotonic() - received
            with self._lock:  # counted once delivered: a processed frame's results are out
                self._processed += 1
                self._latency.append(latency)
                self._model_ms.append(result.timings_ms.get("model", float("nan")))
                for k, v in stages.items():
                    self._stages[k].append(v)

    def _over_stream(self, result, det, source: Any) -> None:
        s = det.settings
        config = s.temporal.flag_filter()
        flag = self._flags.setdefault(source, FlagFilter(config))
        if flag.config != config:
            flag.reconfigure(config)
        result.ood_filtered = flag.update(result.frame_score, det.frame_threshold)
        if s.temporal.score_ema_alpha >= 1.0:
            self._emas.pop(source, None)
            return
        ema = self._emas.get(source)
        if ema is None or ema.alpha != s.temporal.score_ema_alpha:
            ema = self._emas[source] = ScoreMapEMA(s.temporal.score_ema_alpha)
        result.mask_smoothed = ema.update(result.score) > det.mask_threshold

    def _bad_input(self, kind: str, err: Exception) -> None:
        with self._lock:
            self._bad[kind] += 1
            count = self._bad[kind]
        if self._throttle(f"bad_input_{kind}", self.bad_input_log_period):
            self._log.warning(f"bad input frame on {self.source} ({kind}): {err}; frame skipped "
                              f"({count} {kind} error(s) so far)")

    def _inference_failed(self, err: Exception, det, frames: int = 1, oom: bool = False) -> None:
        with self._lock:
            self._inference_errors += frames
            count = self._inference_errors
        if oom or det.device.type == "cuda":
            torch.cuda.empty_cache()  # give the failed attempt's blocks back before the next frame
        if self._throttle("inference", 5.0):
            what = "CUDA out of memory" if oom else "inference failed"
            self._log.error(f"{what}, frame skipped ({count} inference error(s) so far): "
                            f"{type(err).__name__}: {err}")

    # ------------------------------------------------------------------ statistics (any thread)

    def stats(self) -> Stats:
        with self._lock:
            return self._stats()

    def _stats(self) -> Stats:
        return Stats(received=self._received, processed=self._processed, dropped=self._mailbox.replaced,
                     inference_errors=self._inference_errors, downscaled=self._downscaled,
                     bad_input=dict(self._bad), model_loaded=self._detector is not None, last_input=self._last_input)

    def model_values(self) -> dict[str, str]:
        """What runs (or would run: the desired settings while no model is loaded), as text."""
        det, desired = self._detector, self.settings
        return {
            "variant": det.variant.name if det else desired.variant,
            "backend": det.backend if det else desired.compute.backend,
            "device": str(det.device) if det else "n/a",
            "nfe": str(det.nfe) if det else "n/a",
            "weights": det.weights if det else "n/a",
            "mask_threshold": f"{det.mask_threshold:.4f}" if det else "n/a",
            "frame_threshold": f"{det.frame_threshold:.4f}" if det else "n/a",
            "checkpoint": det.settings.checkpoint if det else desired.checkpoint,
            "input_topic": self.source,
        }

    def window(self) -> Window:
        """Close the current statistics window (and start the next): what happened since the
        previous call (or the start)."""
        now = time.monotonic()
        with self._lock:
            stats = self._stats()
            t0, received, processed, errors = self._window_start
            latency, model = tuple(self._latency), tuple(self._model_ms)
            stages = {k: tuple(v) for k, v in self._stages.items()}
            self._latency, self._model_ms = [], []
            self._stages = {k: [] for k in STAGES}
            self._window_start = (now, stats.received, stats.processed, stats.inference_errors)
        return Window(stats=stats, seconds=max(now - t0, 1e-6), received=stats.received - received,
                      processed=stats.processed - processed, inference_errors=stats.inference_errors - errors,
                      latency_s=latency, model_ms=model, stages_ms=stages, end=now)
