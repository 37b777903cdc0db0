"""The temporal filters of core.temporal on scripted score sequences (threshold 0.5 unless said otherwise)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ros_anomaly_diffusion.core.temporal import FlagFilter, FlagFilterConfig, ScoreMapEMA

T = 0.5


def run(flt, scores, threshold=T):
    return [flt.update(s, threshold) for s in scores]


# ---- FlagFilter -------------------------------------------------------------------------------------------------

def test_single_spike_does_not_raise_with_defaults():
    flags = run(FlagFilter(), [0.1] * 5 + [0.9] + [0.1] * 10)
    assert not any(flags)


def test_sustained_anomaly_raises_at_kth_frame_and_clears_after_clear_count():
    f = FlagFilter()  # k=3 of n=5, m=3, hysteresis 0.05 -> clear threshold 0.45
    assert run(f, [0.1, 0.1, 0.9, 0.9]) == [False] * 4
    assert f.update(0.9, T) is True  # the 3rd frame above
    assert run(f, [0.9] * 5) == [True] * 5
    assert run(f, [0.4, 0.4]) == [True, True]
    assert f.update(0.4, T) is False  # the 3rd consecutive frame <= 0.45
    assert not f.raised


def test_clear_needs_consecutive_frames_and_hysteresis_keeps_flag_raised():
    f = FlagFilter()
    run(f, [0.9] * 3)
    assert f.raised
    # between the clear threshold (0.45) and the raise threshold (0.5): still raised, however long
    assert run(f, [0.48] * 20 + [0.5]) == [True] * 21
    # a frame above the clear threshold restarts the clear streak
    assert run(f, [0.1, 0.1, 0.47, 0.1, 0.1]) == [True] * 5
    assert f.update(0.45, T) is False  # "at or below" the clear threshold clears


def test_k_of_n_with_gaps_raises():
    f = FlagFilter(FlagFilterConfig(window=5, raise_count=3))
    assert run(f, [0.9, 0.1, 0.9, 0.1, 0.9]) == [False, False, False, False, True]


def test_k_of_n_spread_wider_than_the_window_does_not_raise():
    f = FlagFilter(FlagFilterConfig(window=5, raise_count=3))
    assert not any(run(f, [0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.9]))  # at most 2 above in any 5
    f = FlagFilter(FlagFilterConfig(window=2, raise_count=2, clear_count=5))  # keeps 5 scores, counts the last 2
    assert not any(run(f, [0.9, 0.1, 0.9, 0.1, 0.9]))


def test_clear_needs_clear_count_frames_of_history():
    f = FlagFilter(FlagFilterConfig(window=1, raise_count=1, clear_count=3, hysteresis=0.0))
    assert f.update(0.6, 0.5) is True
    assert f.update(0.1, 0.9) is True  # only 2 frames so far, though both are below 0.9 now
    assert f.update(0.1, 0.9) is False


def test_threshold_change_between_calls_is_honoured():
    f = FlagFilter()
    run(f, [0.6, 0.6])
    assert f.update(0.6, 0.7) is False  # under a raised threshold the past 0.6s do not count either
    assert f.update(0.6, 0.55) is True  # lowered again: 4 of the last 4 are above
    # raised; 0.52 is above the clear threshold 0.45 at threshold 0.5 ...
    assert run(f, [0.52] * 5, threshold=0.5) == [True] * 5
    # ... but at or below 0.65 - 0.05 once the threshold moves to 0.65: the last 3 frames are judged against it
    assert f.update(0.52, 0.65) is False


def test_threshold_drop_raises_only_on_a_frame_above_it():
    f = FlagFilter()
    run(f, [0.6] * 3, threshold=0.7)
    assert f.update(0.1, 0.5) is False  # 3 of the last 4 are above 0.5 now, but this frame is not
    assert f.update(0.6, 0.5) is True


def test_no_quick_reraise_after_clear():
    f = FlagFilter(FlagFilterConfig(clear_count=2))  # the window still holds three 0.9s when the flag clears
    run(f, [0.9] * 5 + [0.1] * 2)
    assert not f.raised
    assert run(f, [0.9, 0.9]) == [False, False]
    assert f.update(0.9, T) is True


def test_nan_scores_neither_raise_nor_clear():
    f = FlagFilter(FlagFilterConfig(window=3, raise_count=2, clear_count=2))
    assert run(f, [math.nan, 0.9, math.nan, math.nan, 0.9]) == [False] * 5  # NaN is not above
    assert run(f, [0.9, 0.1, math.nan, 0.1]) == [True] * 4  # NaN breaks the clear streak
    assert f.update(0.1, T) is False
    assert f.update(0.9, math.nan) is False  # an unknown threshold changes nothing either


def test_reset_forgets_history_and_lowers_flag():
    f = FlagFilter()
    run(f, [0.9] * 3)
    f.reset()
    assert not f.raised
    assert run(f, [0.9, 0.9]) == [False, False]  # two more are not enough: the earlier three are gone


def test_reconfigure_keeps_history_and_flag():
    f = FlagFilter()
    run(f, [0.9, 0.9])
    f.reconfigure(FlagFilterConfig(raise_count=2))
    assert not f.raised  # nothing changes until the next frame
    assert f.update(0.9, T) is True  # 3 >= 2: the two earlier frames were kept
    f.reconfigure(FlagFilterConfig(clear_count=1))
    assert f.raised
    assert f.update(0.1, T) is False


def test_reconfigure_to_a_shorter_window_drops_the_oldest_scores():
    f = FlagFilter()
    run(f, [0.9, 0.9, 0.1, 0.1])
    f.reconfigure(FlagFilterConfig(window=3, raise_count=2))
    assert f.update(0.9, T) is False  # last 3: 0.1, 0.1, 0.9


def test_reconfigure_rejects_invalid_config_and_keeps_the_old_one():
    f = FlagFilter()
    with pytest.raises(ValueError, match="raise_count"):
        f.reconfigure(FlagFilterConfig(window=2, raise_count=3))
    assert f.config == FlagFilterConfig()


@pytest.mark.parametrize("kwargs, name", [
    (dict(window=0, raise_count=1), "window"),
    (dict(window=101), "window"),
    (dict(window=5.0), "window"),
    (dict(raise_count=0), "raise_count"),
    (dict(window=2, raise_count=3), "raise_count"),
    (dict(raise_count=True), "raise_count"),
    (dict(clear_count=0), "clear_count"),
    (dict(clear_count=101), "clear_count"),
    (dict(hysteresis=-0.01), "hysteresis"),
    (dict(hysteresis=1.5), "hysteresis"),
    (dict(hysteresis=math.nan), "hysteresis"),
    (dict(hysteresis="0.1"), "hysteresis"),
])
def test_invalid_configs_raise_value_error_naming_the_parameter(kwargs, name):
    cfg = FlagFilterConfig(**kwargs)
    with pytest.raises(ValueError, match=name):
        cfg.validate()
    with pytest.raises(ValueError, match=name):
        FlagFilter(cfg)


def test_boundary_configs_are_valid():
    for cfg in (FlagFilterConfig(), FlagFilterConfig(1, 1, 1, 0.0), FlagFilterConfig(100, 100, 100, 1),
                FlagFilterConfig(window=np.int64(4), raise_count=4)):
        cfg.validate()


scores = st.floats(min_value=0.0, max_value=1.0)


@settings(deadline=None)
@given(st.lists(scores, max_size=60), st.floats(min_value=0.0, max_value=1.0))
def test_per_frame_config_reproduces_the_plain_threshold(seq, threshold):
    f = FlagFilter(FlagFilterConfig(window=1, raise_count=1, clear_count=1, hysteresis=0.0))
    assert [f.update(s, threshold) for s in seq] == [s > threshold for s in seq]


@st.composite
def configs(draw):
    window = draw(st.integers(1, 8))
    return FlagFilterConfig(window=window, raise_count=draw(st.integers(1, window)),
                            clear_count=draw(st.integers(1, 8)), hysteresis=draw(st.floats(0.0, 0.3)))


@settings(deadline=None)
@given(configs(), st.lists(st.tuples(st.one_of(scores, st.just(math.nan)), st.sampled_from([0.3, 0.5, 0.7])),
                           max_size=80))
def test_flag_only_changes_on_a_frame_that_argues_for_the_change(cfg, frames):
    f = FlagFilter(cfg)
    before = False
    for score, threshold in frames:
        after = f.update(score, threshold)
        if after and not before:
            assert score > threshold
        if before and not after:
            assert score <= threshold - cfg.hysteresis
        before = after


# ---- ScoreMapEMA ------------------------------------------------------------------------------------------------

def test_ema_constant_input_converges():
    ema, target = ScoreMapEMA(0.3), np.full((4, 5), 0.8, np.float32)
    ema.update(np.zeros((4, 5), np.float32))
    errors = [float(np.abs(ema.update(target) - target).max()) for _ in range(60)]
    assert errors[0] == pytest.approx(0.8 * 0.7, rel=1e-5)  # alpha weights the new map
    assert all(b < a for a, b in zip(errors, errors[1:]) if a > 1e-6)
    assert errors[-1] < 1e-6


def test_ema_alpha_one_returns_the_latest_map():
    ema, rng = ScoreMapEMA(1.0), np.random.default_rng(0)
    for _ in range(3):
        m = rng.random((3, 7)).astype(np.float32)
        np.testing.assert_array_equal(ema.update(m), m)


def test_ema_shape_change_resets():
    ema = ScoreMapEMA(0.1)
    ema.update(np.zeros((4, 4), np.float32))
    big = np.ones((8, 8), np.float32)
    np.testing.assert_array_equal(ema.update(big), big)  # restarted, not raised and not averaged
    np.testing.assert_allclose(ema.update(np.zeros((8, 8))), 0.9 * big, rtol=1e-6)


def test_ema_is_float32_in_and_out():
    ema = ScoreMapEMA(0.5)
    out = ema.update(np.ones((2, 3), np.float64))
    assert out.dtype == np.float32
    assert ema.update(np.zeros((2, 3), np.float32)).dtype == np.float32


def test_ema_reset_and_returned_map_is_a_copy():
    ema = ScoreMapEMA(0.5)
    out = ema.update(np.ones((2, 2), np.float32))
    out[:] = 100.0  # the caller may write into it without touching the average
    np.testing.assert_allclose(ema.update(np.zeros((2, 2), np.float32)), 0.5)
    ema.reset()
    np.testing.assert_array_equal(ema.update(np.full((2, 2), 3.0, np.float32)), 3.0)


def test_ema_non_finite_pixel_recovers():
    ema = ScoreMapEMA(0.5)
    ema.update(np.array([[1.0, np.nan]], np.float32))
    out = ema.update(np.array([[0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(out, np.array([[0.5, 2.0]], np.float32))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.01, math.nan, True])
def test_ema_invalid_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ScoreMapEMA(alpha)
