"""Settings: sections a reader takes whole, flat names the ROS parameters and files keep."""
import pytest

from ros_anomaly_diffusion.core.samplers import EditSampler
from ros_anomaly_diffusion.core.settings import NAMES, SECTION_OF, Settings, is_live, spec


def test_flat_names_reach_their_sections_and_round_trip():
    s = Settings.of(steps=7, backend="torch", analysis_height=96, segments="none", flag_window=4, variant="ddim")
    assert (s.sampler.steps, s.compute.backend, s.geometry.size, s.post.segments, s.temporal.flag_window,
            s.variant) == (7, "torch", (96, spec("analysis_width")["default"]), "none", 4, "ddim")
    flat = s.flat()
    assert tuple(flat) == NAMES and Settings.from_dict(flat) == s  # the parameter files' layout, both ways
    assert {SECTION_OF[n] for n in NAMES} == {None, "sampler", "compute", "geometry", "post", "temporal"}


def test_updated_changes_only_what_it_names_and_validates():
    s = Settings.of(steps=7)
    t = s.updated(seed=3, overlay_alpha=0.25)
    assert s.sampler.seed == 0 and s.post.overlay_alpha == 0.5  # the original is a value: untouched
    assert s.differences(t) == {"seed": 3, "overlay_alpha": 0.25} and t.sampler.steps == 7
    with pytest.raises(ValueError, match="steps must be in"):
        s.updated(steps=0)
    with pytest.raises(ValueError, match=r"unknown settings \['stepz'\]"):
        s.updated(stepz=3)
    with pytest.raises(ValueError, match="flag_raise_count .* must not exceed flag_window"):
        s.updated(flag_window=2, flag_raise_count=3)  # a rule across fields of one section


def test_the_sampler_section_is_what_the_editor_runs_and_live_is_metadata():
    s = Settings.of(edit_score="error", start_timestep=300, steps=4, guidance_scale=0.5, draws=3, seed=9)
    assert EditSampler.from_settings(s.sampler) == EditSampler("error", 300, 4, 0.5, 0.0, 9, 3)
    assert is_live("guidance_scale") and is_live("flag_window") and is_live("mask_threshold")
    assert not is_live("backend") and not is_live("analysis_height") and not is_live("checkpoint")
