"""The guided editors' defining properties, on a real (tiny, untrained) UNet."""
import pytest
import torch

from ros_anomaly_diffusion.core.networks.denoisers import build_denoiser, unet_config
from ros_anomaly_diffusion.core.samplers import GuidedDDIM, GuidedDDPM, NoiseSchedule, ScheduleConfig, ddim_timesteps


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
    short = NoiseSchedule(ScheduleConfig(num_train_timesteps=50))
    editor = GuidedDDIM(net, short, steps=5, start_timestep=999)  # the config files' default start
    assert editor.timesteps == [49, 37, 24, 12, 0] and editor.nfe == 5
    out = editor.edit(frames(1), seed=0)
    assert out.shape == (2, 3, 16, 20) and bool(torch.isfinite(out).all())


def test_very_strong_guidance_returns_the_input(model):
    net, schedule = model
    x = frames(1)
    out = GuidedDDIM(net, schedule, steps=5, start_timestep=999, guidance_scale=1e6).edit(x, seed=3)
    assert torch.allclose(out, x, atol=1e-4)


def test_zero_guidance_ignores_the_input(model):
    net, schedule = model
    editor = GuidedDDIM(net, schedule, steps=5, start_timestep=999, guidance_scale=0.0)
    a, b = editor.edit(frames(1), seed=7), editor.edit(frames(2), seed=7)
    # The inputs differ by ~0.67 on average; only sqrt(abar_999) ~ 0.006 of them survives.
    assert (frames(1) - frames(2)).abs().mean() > 0.5
    assert (a - b).abs().mean() < 0.02


def test_guidance_moves_the_output_towards_the_input(model):
    net, schedule = model
    x = frames(4)
    errors = [(GuidedDDIM(net, schedule, steps=8, guidance_scale=w).edit(x, seed=0) - x).abs().mean()
              for w in (0.0, 0.6, 3.0)]
    assert errors[0] > errors[1] > errors[2]


def test_seeded_runs_repeat_and_seeds_differ(model):
    net, schedule = model
    editor = GuidedDDIM(net, schedule, steps=4, guidance_scale=0.6)
    x = frames(5)
    assert torch.equal(editor.edit(x, seed=11), editor.edit(x, seed=11))
    assert not torch.equal(editor.edit(x, seed=11), editor.edit(x, seed=12))


def test_batched_edit_shape_range_and_nfe(model):
    net, schedule = model
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    editor = GuidedDDIM(net, schedule, steps=6, start_timestep=500, guidance_scale=0.6)
    out = editor.edit(frames(6, n=3), seed=0)
    assert out.shape == (3, 3, 16, 20) and out.min() >= -1 and out.max() <= 1
    assert len(calls) == editor.nfe == 6


def test_ddpm_baseline_guidance_pulls_towards_input(model):
    net, _ = model
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=200))  # all T steps, kept short
    x = frames(8, n=1)
    weak = GuidedDDPM(net, schedule, guidance_scale=0.0).edit(x, seed=0)
    strong = GuidedDDPM(net, schedule, guidance_scale=2e4).edit(x, seed=0)
    assert GuidedDDPM(net, schedule).nfe == 200
    assert (strong - x).abs().mean() < 0.5 * (weak - x).abs().mean()


@pytest.mark.parametrize("variant", ["ddim", "dcae"])
def test_the_edit_is_compared_with_the_models_own_reconstruction(variant, tiny_checkpoint, family_checkpoint):
    from ros_anomaly_diffusion.config import variant_settings
    from ros_anomaly_diffusion.core.detector import Detector

    ckpt = tiny_checkpoint if variant == "ddim" else family_checkpoint("latent")
    det = Detector(ckpt, variant_settings(variant, checkpoint=str(ckpt), segments="none", steps=3))
    scorer = det.scorer
    x = torch.rand(2, 3, *det.model_size, generator=torch.Generator().manual_seed(0))
    assert det.settings.reconstruction_guidance == 1.0 and det.nfe == 6  # config file: two runs of 3 steps
    with_reconstruction = scorer(x).maps
    # a reconstruction with the edit's own guidance is the edit itself: nothing changed anywhere
    det.update(reconstruction_guidance=0.5, guidance_scale=0.5)
    assert float(scorer(x).maps.max()) < 1e-5
    # reconstruction_guidance 0: compared with the frame itself, one run of the sampler
    det.update(reconstruction_guidance=0.0, guidance_scale=0.0)
    assert det.nfe == 3
    out = scorer(x)
    assert torch.allclose(out.maps, scorer.distance(x, out.edited01))
    assert not torch.allclose(out.maps, with_reconstruction)
