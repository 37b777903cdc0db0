"""Temporal filtering of the detector's output, so that downstream consumers (the navigation stack) do not react
to a frame-level OOD flag that flickers from frame to frame.

- FlagFilter: k-of-n raise, m-consecutive clear, with hysteresis on the clear threshold.
- ScoreMapEMA: exponential moving average of per-pixel score maps.

Pure Python/numpy: the node owns the parameters and the wiring.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from numbers import Real

import numpy as np


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class FlagFilterConfig:
    """How the frame-level flag is debounced.

    The flag is RAISED on a frame whose score is above the raise threshold when at least `raise_count` of the last
    `window` frame scores (that frame included) are above it. A raised flag is CLEARED when the last `clear_count`
    consecutive frame scores are at or below the clear threshold = raise threshold - `hysteresis`.

    window=1, raise_count=1, clear_count=1, hysteresis=0 is the plain per-frame threshold (flag == score > threshold).

    Construction does not validate, so a caller can assemble one from parameters and report `validate()`'s message;
    FlagFilter validates every config it is given.
    """

    window: int = 5
    raise_count: int = 3
    clear_count: int = 3
    hysteresis: float = 0.05

    def validate(self) -> None:
        """Raise ValueError naming the first offending parameter."""
        if not _is_int(self.window) or not 1 <= self.window <= 100:
            raise ValueError(f"window must be an int in [1, 100], got {self.window!r}")
        if not _is_int(self.raise_count) or not 1 <= self.raise_count <= self.window:
            raise ValueError(f"raise_count must be an int in [1, window={self.window}], got {self.raise_count!r}")
        if not _is_int(self.clear_count) or not 1 <= self.clear_count <= 100:
            raise ValueError(f"clear_count must be an int in [1, 100], got {self.clear_count!r}")
        h = self.hysteresis
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, Real) or not 0.0 <= h <= 1.0:  # NaN fails too
            raise ValueError(f"hysteresis must be a float in [0, 1], got {h!r}")


class FlagFilter:
    """Debounced OOD flag. Feed it every frame's score with the detector's current frame threshold.

    The last scores are kept raw (not as decisions), so a threshold that changes between calls applies at once to
    the whole window and to the clear streak: the state is always judged against the threshold in force now.

    Transitions only happen on a frame that argues for them: the flag rises only on a frame above the raise
    threshold and clears only on a frame at or below the clear threshold (both conditions include the current frame).
    On clearing, the history is dropped so that a new raise needs `raise_count` fresh frames above, instead of old
    pre-clear frames re-raising it on the next spike.

    NaN scores (or a NaN threshold) are "unknown": not above, so they never count toward a raise, and not at or below,
    so they break a clear streak. An unknown frame therefore never changes the flag.
    """

    def __init__(self, config: FlagFilterConfig | None = None):
        self._config = config if config is not None else FlagFilterConfig()
        self._config.validate()
        self._scores: deque[float] = deque(maxlen=self._maxlen(self._config))
        self._raised = False

    @staticmethod
    def _maxlen(c: FlagFilterConfig) -> int:
        return max(c.window, c.clear_count)

    @property
    def config(self) -> FlagFilterConfig:
        return self._config

    @property
    def raised(self) -> bool:
        return self._raised

    def update(self, score: float, threshold: float) -> bool:
        """Add one frame's score; `threshold` is the raise threshold for this call. Returns the filtered flag."""
        c = self._config
        score, threshold = float(score), float(threshold)
        self._scores.append(score)
        if not self._raised:
            if score > threshold:
                recent = list(self._scores)[-c.window:]
                self._raised = sum(s > threshold for s in recent) >= c.raise_count
        else:
            clear = threshold - c.hysteresis
            recent = list(self._scores)[-c.clear_count:]
            if len(recent) == c.clear_count and all(s <= clear for s in recent):
                self._raised = False
                self._scores.clear()
        return self._raised

    def reset(self) -> None:
        """Forget the history and lower the flag (e.g. on a new sequence, a camera restart)."""
        self._scores.clear()
        self._raised = False

    def reconfigure(self, config: FlagFilterConfig) -> None:
        """Switch to a new config without losing the state.

        The flag keeps its state and the most recent scores are kept (the oldest dropped when the new window or
        clear_count is shorter), so the new parameters judge the recent past on the next update(). Nothing changes
        until then: a transition still needs a frame that argues for it. An invalid config raises ValueError and
        leaves the filter unchanged.
        """
        config.validate()
        self._config = config
        self._scores = deque(self._scores, maxlen=self._maxlen(config))


class ScoreMapEMA:
    """Exponential moving average of per-pixel score maps: s <- (1 - alpha) s + alpha * map.

    alpha in (0, 1]; alpha=1 is no smoothing (returns the latest map). A map of another shape (a camera resolution
    change, a downscale) restarts the average from that map instead of raising: the old maps no longer line up.
    Pixels whose average is not finite restart from the new map, so one bad frame does not poison them for good.
    """

    def __init__(self, alpha: float):
        if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, Real) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self._state: np.ndarray | None = None

    def update(self, score_map) -> np.ndarray:
        """Add a map; returns the smoothed map (float32, a fresh array the caller may keep or modify)."""
        m = np.asarray(score_map, dtype=np.float32)
        if self._state is None or self._state.shape != m.shape:
            self._state = m.copy()
        else:
            a = np.float32(self.alpha)  # alpha=1: 0 * state + m is exactly m
            ema = (np.float32(1.0) - a) * self._state + a * m
            self._state = np.where(np.isfinite(self._state), ema, m).astype(np.float32, copy=False)
        return self._state.copy()

    def reset(self) -> None:
        self._state = None


__all__ = ["FlagFilterConfig", "FlagFilter", "ScoreMapEMA"]
