"""Statistics and health of a frame stream through the runtime: totals (Stats), what happened
since the previous look (Window, its /diagnostics values) and the verdict (Health); Throttle
keeps repeated log lines of a stream down."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# Where a processed frame's time goes: decoding (and downscaling) the message, resizing to the
# model, the networks, post-processing (segments, upsampling, frame score), the caller's
# on_result (publishing the outputs).
STAGES = ("decode", "resize", "network", "post", "publish")
# BadInput kinds: the message's encoding, its size, its data, a compressed payload, the frame itself
BAD_INPUT_KINDS = ("encoding", "size", "data", "compressed", "frame")


@dataclass(frozen=True)
class Stats:
    """Totals since start. received = processed + dropped + bad input + inference errors
    (+ the frame in the worker)."""
    received: int
    processed: int
    dropped: int  # replaced in the mailbox by a newer frame
    inference_errors: int
    downscaled: int
    bad_input: dict[str, int]
    model_loaded: bool
    last_input: float | None  # time.monotonic() of the last submit()


@dataclass(frozen=True)
class Health:
    level: str  # "ok", "warn" or "error"
    message: str


@dataclass(frozen=True)
class Window:
    """What happened between two calls of Runtime.window()."""
    stats: Stats  # totals at the end of the window
    seconds: float
    received: int
    processed: int
    inference_errors: int
    latency_s: tuple[float, ...]  # submit() to result delivered, per processed frame
    model_ms: tuple[float, ...]  # the Detector's own model time, per processed frame
    stages_ms: dict[str, tuple[float, ...]]  # STAGES, per processed frame
    end: float  # time.monotonic() at the end

    @property
    def input_rate_hz(self) -> float:
        return self.received / self.seconds

    @property
    def processed_rate_hz(self) -> float:
        return self.processed / self.seconds

    @property
    def latency_p50_ms(self) -> float | None:
        return float(np.median(self.latency_s)) * 1000 if self.latency_s else None

    @property
    def latency_max_ms(self) -> float | None:
        return max(self.latency_s) * 1000 if self.latency_s else None

    @property
    def model_p50_ms(self) -> float | None:
        return float(np.nanmedian(self.model_ms)) if self.model_ms else None

    def stage_p50_ms(self, stage: str) -> float | None:
        values = self.stages_ms.get(stage, ())
        return float(np.nanmedian(values)) if values else None

    def values(self) -> dict[str, str]:
        """The window's figures as text (the /diagnostics key-value pairs)."""
        s = self.stats
        return {
            "input_rate_hz": f"{self.input_rate_hz:.2f}",
            "processed_rate_hz": f"{self.processed_rate_hz:.2f}",
            "latency_p50_ms": milliseconds(self.latency_p50_ms),
            "latency_max_ms": milliseconds(self.latency_max_ms),
            "model_p50_ms": milliseconds(self.model_p50_ms),
            **{f"stage_{k}_p50_ms": milliseconds(self.stage_p50_ms(k)) for k in STAGES},
            "frames_received": str(s.received),
            "frames_processed": str(s.processed),
            "frames_dropped": str(s.dropped),
            "inference_errors": str(s.inference_errors),
            **{f"bad_input_{k}": str(s.bad_input.get(k, 0)) for k in BAD_INPUT_KINDS},
            "model_loaded": str(s.model_loaded).lower(),
            "frames_downscaled": str(s.downscaled),
        }

    def health(self) -> Health:
        s = self.stats
        if not s.model_loaded:
            return Health("warn", "no model loaded")
        if self.inference_errors and not self.latency_s:
            return Health("error", "inference failing")
        if s.last_input is None or self.end - s.last_input > max(5.0, 3 * self.seconds):
            return Health("warn", "no input frames")
        if sum(s.bad_input.values()) and not self.latency_s:
            return Health("warn", "only bad input frames")
        return Health("ok", "running")


def milliseconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


class Throttle:
    """At most one log line per key and period (the first one passes)."""

    def __init__(self):
        self._last: dict[str, float] = {}

    def __call__(self, key: str, period: float) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < period:
            return False
        self._last[key] = now
        return True
