"""The bounded-receptive-field denoisers (networks/denoisers.py, kinds "cell" and "local"): what
makes them patch priors, and that a local prior trained on ID texture flags what it never saw."""
import pytest
import torch

from ros_anomaly_diffusion.core.networks.denoisers import LocalDenoiser, build_denoiser, local_config
from ros_anomaly_diffusion.core.samplers import EditSampler, Editor, NoiseSchedule, ScheduleConfig


def _changed_cells(net, x, at):
    """Cells of the output that change when the input cell `at` changes."""
    y = net(x, 300)
    x2 = x.clone()
    x2[0, :, at[0], at[1]] += 3.0
    return ((net(x2, 300) - y).abs().amax(1)[0] > 0).nonzero()


@pytest.mark.parametrize("kind, stem, receptive_field", [("cell", 1, None), ("local", 1, 9), ("local", 2, 20)])
def test_an_output_cell_never_sees_input_further_than_its_receptive_field(kind, stem, receptive_field):
    torch.manual_seed(0)
    net = build_denoiser(kind, local_config(kind, "tiny", 4, stem=stem, receptive_field=receptive_field)).eval()
    assert net.kind == kind
    reach = net.receptive_field // 2  # cells either side of the output cell
    if receptive_field:
        assert net.receptive_field >= receptive_field
    x = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        changed = _changed_cells(net, x, (20, 24))
    offsets = (changed - torch.tensor([20, 24])).abs()
    assert len(changed) and int(offsets.max()) <= reach
    if kind == "cell":
        assert changed.tolist() == [[20, 24]]
    else:  # the bound is reached, not just respected: the window is as wide as it says
        assert int(offsets.max()) >= reach - stem


def test_crop_trained_and_full_frame_inference_agree_on_shapes():
    net = LocalDenoiser(local_config("local", "tiny", 3, stem=2)).eval()
    with torch.no_grad():
        for h, w in ((16, 16), (128, 160), (37, 51)):  # a crop, a frame, an odd frame (padded and cropped)
            x = torch.randn(2, 3, h, w)
            assert net(x, torch.tensor([5, 900])).shape == x.shape
        # the same window of a frame gives the same output away from the crop's edge
        frame = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        r = net.receptive_field
        crop = frame[..., 16:48, 16:48]
        inner = slice(r // 2 + 1, 32 - r // 2 - 1)
        full = net(frame, 400)[..., 16:48, 16:48]
        assert torch.allclose(net(crop, 400)[..., inner, inner], full[..., inner, inner], atol=1e-5)


def _texture(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """ID terrain: grey noise texture (the three channels equal) in [-0.5, 0.5]."""
    grey = torch.rand(n, 1, size, size, generator=gen) - 0.5
    return grey.expand(n, 3, size, size).contiguous()


def test_a_local_prior_trained_on_id_texture_flags_a_pasted_foreign_patch():
    """The synthetic case: trained on crops of grey texture only, the local prior's denoising
    error is far higher on a pasted saturated patch than on the texture around it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = build_denoiser("local", local_config("local", "tiny", 3, receptive_field=9))
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    optim = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(150):
        x0 = _texture(16, 16, gen)
        t = torch.randint(0, schedule.T, (16,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = (net(schedule.add_noise(x0, noise, t), t) - noise).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    frame = _texture(1, 48, gen)
    frame[..., 18:30, 18:30] = torch.tensor([0.9, -0.9, 0.9]).reshape(1, 3, 1, 1)  # a magenta object
    with torch.no_grad():
        score = Editor(net.eval(), schedule, clip=None).score(frame, EditSampler(score="error", start_timestep=200,
                                                                                 draws=8))[0]
    inside = score[20:28, 20:28].mean()
    around = torch.cat([score[:10].flatten(), score[38:].flatten()]).mean()  # texture beyond the reach
    assert inside > 3 * around


def test_a_local_denoiser_runs_on_onnxruntime_like_on_torch():
    pytest.importorskip("onnxruntime")
    from ros_anomaly_diffusion.core.networks.backends import with_backend

    net = LocalDenoiser(local_config("local", "tiny", 3, stem=2)).eval()
    ort, how = with_backend(net, "onnxruntime", "cpu")
    assert "onnxruntime" in how
    x = torch.randn(4, 3, 32, 40, generator=torch.Generator().manual_seed(0))  # draws batched: any batch
    with torch.no_grad():
        assert torch.allclose(ort(x, 250), net(x, 250), atol=1e-4)
