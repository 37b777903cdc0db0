"""The guided editors' defining properties, on a real (tiny, untrained) UNet."""
import pytest
import torch

from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.samplers import (EditSampler, Editor, NoiseSchedule, ScheduleConfig, ddim_sigma,
                                                 ddim_step, ddim_timesteps)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_denoiser("unet", unet_config("pixel", "tiny", 3, (16, 20))).eval()
    return net, NoiseSchedule(ScheduleConfig())


def frames(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 20, generator=g) * 2 - 1


def test_timesteps_even_from_start_to_zero():
    assert ddim_timesteps(999, 4) == [999, 666, 333, 0]
    assert ddim_timesteps(3, 10) == [3, 2, 1, 0]  # never more steps than timesteps
    with pytest.raises(ValueError):
        ddim_timesteps(999, 0)


def test_a_start_beyond_a_short_chain_starts_at_its_end(model):
    net, _ = model
    editor = Editor(net, NoiseSchedule(ScheduleConfig(num_train_timesteps=50)))
    assert editor.timesteps(999, 5) == [49, 37, 24, 12, 0] and editor.ddim_nfe(999, 5) == 5
    out, ref = editor.ddim(frames(1), start_timestep=999, steps=5, guidance=0.6)
    assert out.shape == (1, 2, 3, 16, 20) and ref is None and bool(torch.isfinite(out).all())


def test_very_strong_guidance_returns_the_input(model):
    net, schedule = model
    x = frames(1)
    out, _ = Editor(net, schedule).ddim(x, start_timestep=999, steps=5, guidance=1e6, seed=3, draws=2)
    assert torch.allclose(out, x.expand_as(out), atol=1e-4)


def test_zero_guidance_ignores_the_input(model):
    net, schedule = model
    editor = Editor(net, schedule)
    run = dict(start_timestep=999, steps=5, guidance=0.0, seed=7)
    a, b = editor.ddim(frames(1), **run)[0], editor.ddim(frames(2), **run)[0]
    # The inputs differ by ~0.67 on average; only sqrt(abar_999) ~ 0.006 of them survives.
    assert (frames(1) - frames(2)).abs().mean() > 0.5
    assert (a - b).abs().mean() < 0.02


def test_guidance_moves_the_output_towards_the_input(model):
    net, schedule = model
    x = frames(4)
    errors = [(Editor(net, schedule).ddim(x, start_timestep=999, steps=8, guidance=w)[0] - x).abs().mean()
              for w in (0.0, 0.6, 3.0)]
    assert errors[0] > errors[1] > errors[2]


def test_seeded_runs_repeat_draws_included_and_a_frame_gets_its_map_alone_or_batched(model):
    net, schedule = model
    editor = Editor(net, schedule)
    run = dict(start_timestep=600, steps=4, guidance=0.6, reconstruction_guidance=2.0)
    x = frames(5, n=3)
    edits, refs = editor.ddim(x, seed=11, draws=3, **run)
    again, again_refs = editor.ddim(x, seed=11, draws=3, **run)
    assert torch.equal(edits, again) and torch.equal(refs, again_refs)
    assert not torch.allclose(edits[0], edits[1])  # the draws differ
    assert not torch.allclose(editor.ddim(x, seed=12, draws=3, **run)[0], edits)
    # draw k does not depend on how many draws run, nor a frame's map on its batch
    one, _ = editor.ddim(x[1:2], seed=11, draws=2, **run)
    assert torch.allclose(one, edits[:2, 1:2], atol=1e-5)
    err = editor.denoising_error(x, timestep=300, seed=4, draws=5)
    assert torch.equal(err, editor.denoising_error(x, timestep=300, seed=4, draws=5))
    assert torch.allclose(editor.denoising_error(x[2:], timestep=300, seed=4, draws=5), err[2:], atol=1e-5)


def test_draws_and_the_reconstruction_share_one_network_call_per_step(model):
    net, schedule = model
    calls = []
    hook = net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        editor = Editor(net, schedule)
        out, ref = editor.ddim(frames(6, n=3), start_timestep=500, steps=6, guidance=0.6, draws=4,
                               reconstruction_guidance=1.0)
        assert out.shape == ref.shape == (4, 3, 3, 16, 20) and out.min() >= -1 and out.max() <= 1
        assert calls == [2 * 4 * 3] * 6 and editor.ddim_nfe(500, 6, draws=4, reconstruction=True) == 48
        calls.clear()
        err = editor.denoising_error(frames(6, n=3), timestep=400, draws=4)
        assert err.shape == (3, 16, 20) and calls == [4 * 3]
        assert editor.score_nfe(EditSampler(score="error", draws=4)) == 4
    finally:
        hook.remove()


def test_the_denoising_error_measures_the_eps_error_per_location(model):
    net, schedule = model
    identity = lambda x, t: torch.zeros_like(x)  # noqa: E731  predicts eps = 0 (epsilon model)
    eps_schedule = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    x = frames(3, n=2)
    err = Editor(identity, eps_schedule).denoising_error(x, timestep=500, seed=0, draws=64)
    # E ||eps||^2 over 3 channels = 3
    assert err.shape == (2, 16, 20) and abs(float(err.mean()) - 3.0) < 0.1


def test_ddpm_baseline_guidance_pulls_towards_input(model):
    net, _ = model
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=200))  # all T steps, kept short
    x = frames(8, n=1)
    editor = Editor(net, schedule)
    weak = editor.ddpm(x, guidance=0.0, seed=0)
    strong = editor.ddpm(x, guidance=2e4, seed=0)
    assert weak.shape == (1, 1, 3, 16, 20)
    assert (strong - x).abs().mean() < 0.5 * (weak - x).abs().mean()


@pytest.mark.parametrize("reference", ["frame", "noised", "prediction"])
def test_very_strong_ddpm_guidance_returns_the_input(model, reference):
    """Guidance far beyond any useful scale stops at its reference at every step (the pull is
    capped there, not overshot), so the chain ends on the frame: the sampler's last steps are
    the frame plus noise of sqrt(beta) ~ 0.01."""
    net, _ = model
    editor = Editor(net, NoiseSchedule(ScheduleConfig(num_train_timesteps=200)))
    x = frames(8, n=2)
    out = editor.ddpm(x, guidance=1e9, seed=1, draws=2, reference=reference)
    assert out.shape == (2, 2, 3, 16, 20) and float((out - x).abs().mean()) < 0.03


@pytest.mark.parametrize("reference", ["noised", "prediction"])
def test_the_ddpm_reference_only_matters_with_guidance(model, reference):
    net, _ = model
    editor = Editor(net, NoiseSchedule(ScheduleConfig(num_train_timesteps=200)))
    x = frames(9, n=1)
    run = dict(seed=2, draws=1)
    assert torch.equal(editor.ddpm(x, guidance=0.0, reference="frame", **run),
                       editor.ddpm(x, guidance=0.0, reference=reference, **run))
    frame, other = (editor.ddpm(x, guidance=3e4, reference=r, **run) for r in ("frame", reference))
    assert float((frame - other).abs().mean()) > 0.01
    assert torch.equal(other, editor.ddpm(x, guidance=3e4, reference=reference, **run))  # seeded
    with pytest.raises(ValueError, match="reference must be one of"):
        editor.ddpm(x, guidance=1.0, reference="clean")


def test_ddim_inversion_and_ddpm_share_the_update_rule(model):
    """One update: eta = 0 up the chain is the inversion, eta = 1 down by one step is DDPM's
    posterior mean (the DDPM paper's coefficients on x0 and x_t)."""
    _, schedule = model
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = 500
    a, a_prev = schedule.abar(t), schedule.abar(t - 1)
    beta = 1 - a / a_prev
    x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
    posterior = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x_t
    assert torch.allclose(ddim_step(schedule, eps, t, t - 1, x_t, eta=1.0), posterior.float(), atol=1e-5)
    assert abs(ddim_sigma(schedule, t, t - 1, 1.0) ** 2 - beta * (1 - a_prev) / (1 - a)) < 1e-9
    up = ddim_step(schedule, eps, t, 800, x_t)
    assert torch.allclose(up, schedule.abar(800) ** 0.5 * x0 + (1 - schedule.abar(800)) ** 0.5 * eps, atol=1e-5)


@pytest.mark.parametrize("variant", ["ddim", "dcae"])
def test_the_edit_is_compared_with_the_models_own_reconstruction(variant, tiny_checkpoint, family_checkpoint):
    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector

    ckpt = tiny_checkpoint if variant == "ddim" else family_checkpoint("latent")
    det = Detector(ckpt, variant_settings(variant, checkpoint=str(ckpt), segments="none", steps=3, draws=1,
                                          reconstruction_guidance=1.0))
    scorer = det.scorer
    x = torch.rand(2, 3, *det.model_size, generator=torch.Generator().manual_seed(0))
    assert det.nfe == 6  # two runs of 3 steps
    with_reconstruction = scorer(x).maps
    # a reconstruction with the edit's own guidance is the edit itself: nothing changed anywhere
    det.update(reconstruction_guidance=0.5, guidance_scale=0.5)
    assert float(scorer(x).maps.max()) < 1e-5
    # reconstruction_guidance 0: compared with the frame itself, one run of the sampler
    det.update(reconstruction_guidance=0.0, guidance_scale=0.0)
    assert det.nfe == 3
    out = scorer(x)
    assert torch.allclose(out.maps, scorer.distance(x, out.edited01).clamp(0, 1))  # not calibrated: clamped
    assert not torch.allclose(out.maps, with_reconstruction)


def test_calibration_scales_the_pixel_map_with_its_id_moments(tmp_path, rugd_sample, monkeypatch):
    """The pixel family's feature distance has no fixed ID scale: calibration measures its
    moments on the ID pixels of real frames, stores them, and from then on the map is their
    z-score through to_unit (ID mean -> 0.08, never saturating at 1) and the thresholds are
    set on that map. Calibration edits each frame once (ddpm's 1000 steps a frame)."""
    import cv2
    import numpy as np

    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core import checkpoint as ckpt
    from ros_anomaly_diffusion.core.data import open_dataset
    from ros_anomaly_diffusion.core.detector import Detector
    from ros_anomaly_diffusion.core.families.feature_space import to_unit
    from ros_anomaly_diffusion.core.families.pixel import EditingScorer
    from ros_anomaly_diffusion.engine.training import calibrate
    from conftest import make_checkpoint

    model = make_checkpoint(tmp_path / "pixel")
    frames = [f for f in open_dataset(rugd_sample) if f.is_ood() is False][:2]
    quick = dict(segments="none", steps=2, draws=1)
    edited, raw_maps = [], EditingScorer.raw_maps
    monkeypatch.setattr(EditingScorer, "raw_maps", lambda self, b: edited.append(len(b)) or raw_maps(self, b))
    result = calibrate(model, frames, "ddim", progress=False, **quick)
    assert edited == [1] * len(frames)
    monkeypatch.undo()
    stored = ckpt.load_config(model)["calibration"]["ddim"]["score_moments"]
    det = Detector(model, variant_settings("ddim", checkpoint=str(model), **quick))
    assert det.scorer.moments == stored == result["score_moments"]
    raws, mapped = [], []
    for f in frames:
        batch = det.to_model([f.rgb()])
        raw = det.scorer.raw_maps(batch)[0][0].numpy()
        keep = cv2.resize(f.label(), raw.shape[::-1], interpolation=cv2.INTER_NEAREST) == 0
        raws.append(raw[keep])
        mapped.append(det.scorer(batch).maps[0].numpy()[keep])
    raw, mapped = np.concatenate(raws), np.concatenate(mapped)
    assert stored["mean"] == pytest.approx(raw.mean(), rel=1e-3) and stored["std"] == pytest.approx(raw.std(), rel=1e-3)
    assert np.allclose(mapped, to_unit(torch.from_numpy((raw - raw.mean()) / raw.std())).numpy(), atol=1e-4)
    assert float(to_unit(torch.tensor(0.0))) == pytest.approx(0.08, abs=0.01)
    assert np.median(mapped) < 0.2 and mapped.max() < 1.0
    # the mask threshold is the ID pixels' 99th percentile of the scaled map (mask_fpr 0.01)
    assert result["mask_threshold"] == pytest.approx(np.quantile(mapped, 0.99), abs=0.05)


def test_a_sampler_other_than_the_measured_one_is_logged(caplog):
    """feature_edit and dcae map scores into [0, 1] with ID statistics of one sampler: running
    another one is said (the thresholds then only roughly fit), running that one is not."""
    measured = EditSampler(score="error", start_timestep=250, draws=4)
    with caplog.at_level("WARNING", logger="ros_anomaly_diffusion.core.samplers"):
        measured.warn_unless_measured("feature_edit", measured.to_dict())
        assert not caplog.records
        EditSampler(score="error", start_timestep=400, draws=4).warn_unless_measured("dcae", measured.to_dict())
    assert len(caplog.records) == 1 and "dcae runs" in caplog.text and "recalibrate" in caplog.text
