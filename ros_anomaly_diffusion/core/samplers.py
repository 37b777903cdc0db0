"""The noise schedule, the sampler arithmetic and the one Editor that runs every sampler,
on any denoiser net(x_t, t) and any data (pixels, latents, backbone features).

As in diffusers, the update rules never call the network: `ddim_step` maps (x_t, eps) to
the next sample and `timestep_matching` turns the model's eps into the guided one. The
`Editor` owns the loops: it calls the network, batches K seeded draws and the
edit/reconstruction pair into one call per step, and counts the network evaluations.

* NoiseSchedule: the betas come from diffusers' DDPMScheduler (linear, cosine, sigmoid,
  ...), so the schedule a checkpoint was trained with is recreated exactly from its
  config; training targets and noising are diffusers' too.
* ddim_step: DDIM with eta. eta = 0 down the chain is the deterministic edit, up the
  chain (t_next > t) the inversion of the notes (section 2); eta = 1 over consecutive
  timesteps is DDPM's ancestral step. One update for all three.
* Editor.ddim: the guided DDIM edit from the input noised to start_timestep, with
  "timestep matching" guidance (method notes, section 1), and the model's own
  reconstruction of the input (the same run with strong guidance).
* Editor.ddpm: the T-step ancestral baseline, its posterior mean shifted by
  Sigma * grad log r(mu, x_input) with log r = -s * mean((mu - x_input)^2), or by the
  notes' q- and p-transforms of it (`reference`).
* Editor.denoising_error: E ||eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t)||^2
  per location, the ELBO term at one t; one network call for all K draws.
* Editor.invert: deterministic DDIM up to t = T-1, the inversion family's map to noise.

Draws are seeded per frame: draw k of seed s is the same noise for every frame of a batch
and does not depend on how many draws run, so a frame gets the same map alone or batched.

The update rules are written out rather than taken from diffusers' DDIMScheduler and
DDIMInverseScheduler: their step size is tied to T // num_inference_steps (so an edit
cannot start at an arbitrary timestep and inversion cannot space {0, 500, 999}), the
inverse scheduler evaluates eps at the destination timestep where the notes take it at
the current one, and the guidance has to act between the model call and the update.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from .settings import DDPM_REFERENCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "sigmoid"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"  # or "epsilon"

    def to_dict(self) -> dict:
        return asdict(self)


class NoiseSchedule:
    """alpha-bar lookup plus conversions between the model output and (x0, eps)."""

    def __init__(self, config: ScheduleConfig):
        self.config = config
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            prediction_type=config.prediction_type,
            clip_sample=False,
        )
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)

    @property
    def T(self) -> int:
        return self.config.num_train_timesteps

    def abar(self, t: int) -> float:
        """alpha-bar at timestep t; t < 0 means the clean end of the chain (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return output
        a = self.abar(t)
        return a**0.5 * output + (1 - a) ** 0.5 * x_t  # v-prediction

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)


def ddim_timesteps(start_timestep: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from start_timestep down to 0 (both included)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if start_timestep < 0:
        raise ValueError(f"start_timestep must be >= 0, got {start_timestep}")
    steps = min(steps, start_timestep + 1)
    return [int(t) for t in np.round(np.linspace(start_timestep, 0, steps)).astype(int)]


def ddim_step(schedule: NoiseSchedule, eps: torch.Tensor, t: int, t_next: int, sample: torch.Tensor,
              eta: float = 0.0, clip: float | None = None) -> torch.Tensor:
    """The deterministic part of one DDIM update x_t -> x_{t_next} given eps (t_next < 0: the
    clean sample). With `clip`, x0 is clamped and eps made consistent with it (as diffusers
    does). Add ddim_sigma(...) * noise for eta > 0."""
    a, a_next = schedule.abar(t), schedule.abar(t_next)
    x0 = (sample - (1 - a) ** 0.5 * eps) / a**0.5
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (sample - a**0.5 * x0) / (1 - a) ** 0.5
    sigma = ddim_sigma(schedule, t, t_next, eta)
    return a_next**0.5 * x0 + max(0.0, 1 - a_next - sigma**2) ** 0.5 * eps


def ddim_sigma(schedule: NoiseSchedule, t: int, t_next: int, eta: float) -> float:
    """Standard deviation of the noise DDIM adds at t -> t_next (eta = 1, t_next = t - 1: DDPM's
    posterior variance); 0 for eta = 0 or an inversion step."""
    if eta == 0 or t_next >= t:
        return 0.0
    a, a_next = schedule.abar(t), schedule.abar(t_next)
    return eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5


def timestep_matching(eps: torch.Tensor, x_t: torch.Tensor, x_input: torch.Tensor, abar: float,
                      guidance: torch.Tensor | float) -> torch.Tensor:
    """Guided eps of "timestep matching": with y_t = sqrt(a) x_input + sqrt(1-a) eps (the input
    brought to level t with the model's own noise), eps~ = eps - lam / sqrt(1-a) (y_t - x_t)
    makes x0^ the blend (1 - lam) x0_model + lam x_input with lam = w (1 - a). Capping lam at
    1 keeps very strong guidance at "return the input" instead of overshooting past it."""
    y_t = abar**0.5 * x_input + (1 - abar) ** 0.5 * eps
    lam = torch.as_tensor(guidance, dtype=x_t.dtype, device=x_t.device).mul(1 - abar).clamp(max=1.0)
    return eps - lam / (1 - abar) ** 0.5 * (y_t - x_t)


def draw_noise(like: torch.Tensor, seed: int, draws: int) -> torch.Tensor:
    """(draws, 1, *frame shape) standard normal noise: draw k of `seed` is the same for every
    frame of `like` (B, ...) and for any number of draws."""
    gen = torch.Generator(device=like.device).manual_seed(int(seed) + 1)
    return torch.randn((draws, 1, *like.shape[1:]), generator=gen, device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class EditSampler:
    """What an editing variant runs on a frame (Settings fields of the same names). score
    "edit": the distance between the guided DDIM edit and the reconstruction (or the input,
    reconstruction_guidance 0); "error": the denoising error at start_timestep (steps and
    guidances unused). Either averaged over `draws` seeded draws."""
    score: str = "edit"
    start_timestep: int = 250
    steps: int = 5
    guidance_scale: float = 0.0
    reconstruction_guidance: float = 1.0
    seed: int = 0
    draws: int = 1

    @classmethod
    def from_settings(cls, s) -> "EditSampler":
        """From the sampler section of the settings (settings.SamplerSettings)."""
        return cls(s.edit_score, s.start_timestep, s.steps, float(s.guidance_scale), float(s.reconstruction_guidance),
                   s.seed, s.draws)

    @classmethod
    def from_dict(cls, d: dict) -> "EditSampler":
        return cls(**{**asdict(cls()), "score": "edit", "draws": 1, **d})  # stored before score/draws: edits

    def to_dict(self) -> dict:
        return asdict(self)

    def warn_unless_measured(self, variant: str, measured: dict) -> None:
        """Log when this is not the sampler a checkpoint's ID score statistics were measured with
        (`measured`, as to_dict wrote it): the scores in [0, 1] then only roughly match the
        calibrated thresholds."""
        measured_with = EditSampler.from_dict(measured)
        if self != measured_with:
            log.warning("%s runs %s but the checkpoint's ID statistics were measured with %s: scores in [0, 1] "
                        "are then only roughly comparable to the thresholds (recalibrate)", variant, self,
                        measured_with)


class Editor:
    """Runs the samplers on a denoiser: the only place that calls the network while sampling.

    `clip`: edits and x0 predictions are clamped to [-clip, clip] (1.0: pixels in [-1, 1]);
    None leaves them unclamped (unit-variance latents and features exceed [-1, 1])."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, clip: float | None = 1.0):
        self.net, self.schedule, self.clip = net, schedule, clip

    def _eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.schedule.eps_from_output(self.net(x, t), x, t)

    def timesteps(self, start_timestep: int, steps: int) -> list[int]:
        # A start beyond the model's chain (start_timestep 999 on a T = 50 model) starts at its end.
        return ddim_timesteps(min(start_timestep, self.schedule.T - 1), steps)

    @torch.no_grad()
    def ddim(self, x: torch.Tensor, *, start_timestep: int, steps: int, guidance: float, seed: int = 0,
             draws: int = 1, reconstruction_guidance: float = 0.0, noise: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edits, reconstructions or None), each (draws, B, ...): x (B, ...) noised to
        start_timestep with draw k's noise and brought back by guided DDIM with `guidance`; the
        reconstruction is the same run with reconstruction_guidance (None for 0). Edit and
        reconstruction of every draw go through the network as one batch per step. `noise`:
        draw_noise(x, seed, draws) computed beforehand (a frame graph holds it as a constant)."""
        ws = [guidance] + ([reconstruction_guidance] if reconstruction_guidance > 0 else [])
        paths, b = len(ws), x.shape[0]
        inputs = x.repeat(paths * draws, *[1] * (x.ndim - 1))  # order: path, draw, frame
        w = torch.tensor(ws, dtype=x.dtype, device=x.device).repeat_interleave(draws * b)
        w = w.reshape(-1, *[1] * (x.ndim - 1))
        ts = self.timesteps(start_timestep, steps)
        a0 = self.schedule.abar(ts[0])
        noise = draw_noise(x, seed, draws) if noise is None else noise
        noise = noise.expand(draws, *x.shape).repeat(paths, *[1] * x.ndim).flatten(0, 1)
        sample = a0**0.5 * inputs + (1 - a0) ** 0.5 * noise
        for t, t_next in zip(ts, ts[1:] + [-1]):
            eps = timestep_matching(self._eps(sample, t), sample, inputs, self.schedule.abar(t), w)
            sample = ddim_step(self.schedule, eps, t, t_next, sample)
        if self.clip is not None:
            sample = sample.clamp(-self.clip, self.clip)
        out = sample.reshape(paths, draws, *x.shape)
        return out[0], (out[1] if paths > 1 else None)

    def ddim_nfe(self, start_timestep: int, steps: int, draws: int = 1, reconstruction: bool = False) -> int:
        """Network evaluations per frame of `ddim` (each draw and path counted)."""
        return len(self.timesteps(start_timestep, steps)) * draws * (2 if reconstruction else 1)

    @torch.no_grad()
    def ddpm(self, x: torch.Tensor, *, guidance: float, seed: int = 0, draws: int = 1,
             reference: str = "frame") -> torch.Tensor:
        """(draws, B, ...): guided ancestral DDPM from pure noise over all T steps (eta = 1
        DDIM steps between consecutive timesteps), pulled by `guidance` s along the gradient of
        log r = -s mean((v - y)^2), scaled by the step's variance. `reference` (the method
        notes' three forms; docs/results.md measures them):
        "frame": v the step's mean mu, y the frame x (the paper's baseline);
        "noised": v = mu, y the frame brought to mu's noise level with the chain's starting
        noise (the q-transform);
        "prediction": v the network's clean estimate x0^, y = x (the p-transform; its gradient
        with respect to x_t is 1/sqrt(abar_t) of x0^'s, so it is far stronger at high noise).
        Each pull is capped where it reaches y, so very strong guidance returns x."""
        if reference not in DDPM_REFERENCES:
            raise ValueError(f"reference must be one of {list(DDPM_REFERENCES)}, got {reference!r}")
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        inputs = x.repeat(draws, *[1] * (x.ndim - 1))
        start = draw_noise(x, seed, draws).expand(draws, *x.shape).flatten(0, 1)
        sample = start.clone()
        n = x[0].numel()
        for t in range(self.schedule.T - 1, -1, -1):
            eps = self._eps(sample, t)
            mean = ddim_step(self.schedule, eps, t, t - 1, sample, eta=1.0, clip=1.0)
            sigma = ddim_sigma(self.schedule, t, t - 1, 1.0)
            pull = sigma**2 * 2.0 * guidance / n  # the gradient's factor, scaled by the step's variance
            a, a_next = self.schedule.abar(t), self.schedule.abar(t - 1)
            if reference == "prediction":  # mu holds x0^ with weight sqrt(abar_{t-1}): that much puts x0^ on x
                x0 = ((sample - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
                sample = mean - min(a_next**0.5, pull / a**0.5) * (x0 - inputs)
            else:
                y = inputs if reference == "frame" else a_next**0.5 * inputs + (1 - a_next) ** 0.5 * start
                sample = mean - min(1.0, pull) * (mean - y)
            if t > 0:
                sample = sample + sigma * torch.randn(sample.shape, generator=gen, device=x.device, dtype=x.dtype)
        return sample.clamp(-1, 1).reshape(draws, *x.shape)

    @torch.no_grad()
    def denoising_error(self, x: torch.Tensor, *, timestep: int, seed: int = 0, draws: int = 1,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *spatial): the squared eps error summed over channels, averaged over `draws` noise
        draws at `timestep`, all draws in one network call (`noise`: as in `ddim`)."""
        t = min(timestep, self.schedule.T - 1)
        a = self.schedule.abar(t)
        noise = (draw_noise(x, seed, draws) if noise is None else noise).expand(draws, *x.shape).flatten(0, 1)
        x_t = a**0.5 * x.repeat(draws, *[1] * (x.ndim - 1)) + (1 - a) ** 0.5 * noise
        err = (self._eps(x_t, t) - noise).square().sum(1)
        return err.reshape(draws, x.shape[0], *err.shape[1:]).mean(0)

    def score(self, x: torch.Tensor, sampler: EditSampler, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *spatial) anomaly score per location of x (B, C, ...): the L2 norm over channels
        of edit - reference, or the denoising error (sampler.score), averaged over the draws
        (`noise`: as in `ddim`)."""
        if sampler.score == "error":
            return self.denoising_error(x, timestep=sampler.start_timestep, seed=sampler.seed, draws=sampler.draws,
                                        noise=noise)
        edits, refs = self.ddim(x, start_timestep=sampler.start_timestep, steps=sampler.steps,
                                guidance=sampler.guidance_scale, seed=sampler.seed, draws=sampler.draws,
                                reconstruction_guidance=sampler.reconstruction_guidance, noise=noise)
        return torch.linalg.vector_norm((x if refs is None else refs) - edits, dim=2).mean(0)

    def score_nfe(self, sampler: EditSampler) -> int:
        if sampler.score == "error":
            return sampler.draws
        return self.ddim_nfe(sampler.start_timestep, sampler.steps, sampler.draws, sampler.reconstruction_guidance > 0)

    def invert(self, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from x at timesteps[0] up to timesteps[-1], eps taken at
        the current (x_t, t)."""
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
            x = ddim_step(self.schedule, self._eps(x, t), t, t_next, x)
        return x


def inversion_timesteps(steps: int, T: int = 1000) -> list[int]:
    """`steps` evenly spaced timesteps from 0 to T-1 (3 -> [0, 500, 999]): steps - 1 network
    calls. One step would be no inversion at all, so 1 is treated as 2 ([0, 999])."""
    return [int(t) for t in np.linspace(0, T - 1, max(int(steps), 2)).round()]
