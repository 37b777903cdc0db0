"""Samplers: the noise schedule and every sampler the families run, on any denoiser
net(x_t, t) and any data (pixels, latents, backbone features).

* NoiseSchedule: the betas come from diffusers' DDPMScheduler (linear, cosine,
  sigmoid, ...), so the schedule a checkpoint was trained with is recreated exactly
  from its config; training targets and noising are diffusers' too.
* GuidedDDIM: deterministic DDIM (eta = 0) from the input noised to start_timestep,
  with "timestep matching" guidance (method notes, section 1): the editing sampler of
  the pixel and latent families.
* GuidedDDPM: the T-step ancestral baseline, its posterior mean shifted by
  Sigma * grad log r(mu, x_input) with log r = -s * mean((mu - x_input)^2).
* ddim_invert: deterministic DDIM up to t = T-1 (notes, section 2): the inversion
  family's map to the noise space.

The update rules are written out rather than taken from diffusers' DDIMScheduler and
DDIMInverseScheduler: their step size is tied to T // num_inference_steps (so an edit
cannot start at an arbitrary timestep and inversion cannot space {0, 500, 999}), the
inverse scheduler evaluates eps at the destination timestep where the notes take it at
the current one, and the guidance has to act between the model call and the update.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn


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


class GuidedDDIM:
    """Guided DDIM editor (eta = 0), seeded and batched.

    `clip`: the edit is clamped to [-clip, clip] (1.0: pixels in [-1, 1]); None leaves it
    unclamped (unit-variance latents exceed [-1, 1])."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, steps: int = 25,
                 start_timestep: int = 999, guidance_scale: float = 0.6, clip: float | None = 1.0):
        self.net, self.schedule, self.clip = net, schedule, clip
        self.steps, self.start_timestep, self.guidance_scale = steps, start_timestep, guidance_scale

    @property
    def timesteps(self) -> list[int]:
        # A start beyond the model's chain (start_timestep 999 on a T = 50 model) starts at its end.
        return ddim_timesteps(min(self.start_timestep, self.schedule.T - 1), self.steps)

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    def step(self, x_t: torch.Tensor, x_input: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """One guided DDIM update t -> t_next (t_next < 0: to the clean sample)."""
        a, a_next = self.schedule.abar(t), self.schedule.abar(t_next)
        eps = self.schedule.eps_from_output(self.net(x_t, t), x_t, t)
        # Timestep matching: the input brought to level t with the model's own noise.
        y_t = a**0.5 * x_input + (1 - a) ** 0.5 * eps
        # eps~ = eps - w sqrt(1-a) (y_t - x_t) makes x0^ the blend (1-lam) x0_model + lam x_input
        # with lam = w (1-a). Capping lam at 1 keeps very strong guidance at "return the
        # input" instead of overshooting past it.
        lam = min(1.0, self.guidance_scale * (1 - a))
        eps_g = eps - lam / (1 - a) ** 0.5 * (y_t - x_t)
        x0 = (x_t - (1 - a) ** 0.5 * eps_g) / a**0.5
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps_g

    @torch.no_grad()
    def edit(self, x_input: torch.Tensor, seed: int = 0) -> torch.Tensor:
        ts = self.timesteps
        noise = seeded_noise(x_input, seed)
        a0 = self.schedule.abar(ts[0])
        x = a0**0.5 * x_input + (1 - a0) ** 0.5 * noise
        for t, t_next in zip(ts, ts[1:] + [-1]):
            x = self.step(x, x_input, t, t_next)
        return x if self.clip is None else x.clamp(-self.clip, self.clip)


def edit_and_reconstruction(net: nn.Module, schedule: NoiseSchedule, steps: int, start_timestep: int,
                            guidance_scale: float, reconstruction_guidance: float, clip: float | None = 1.0
                            ) -> tuple[GuidedDDIM, GuidedDDIM | None]:
    """The editing variants' pair: the guided DDIM edit and the model's own reconstruction of
    the same input, i.e. the same seeded run with the strong guidance reconstruction_guidance;
    None for 0 (the edit is then compared with the input itself)."""
    def run(w: float) -> GuidedDDIM:
        return GuidedDDIM(net, schedule, steps, start_timestep, w, clip=clip)

    return run(guidance_scale), (run(reconstruction_guidance) if reconstruction_guidance > 0 else None)


class GuidedDDPM:
    """Guided ancestral DDPM over all T steps: the slow baseline."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, guidance_scale: float = 3e3):
        self.net, self.schedule, self.guidance_scale = net, schedule, guidance_scale
        self.betas = schedule.scheduler.betas.to(torch.float64)

    @property
    def nfe(self) -> int:
        return self.schedule.T

    @torch.no_grad()
    def edit(self, x_input: torch.Tensor, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator(device=x_input.device).manual_seed(seed)
        x = seeded_noise(x_input, seed)
        n = x_input[0].numel()
        for t in range(self.schedule.T - 1, -1, -1):
            a, a_prev, beta = self.schedule.abar(t), self.schedule.abar(t - 1), float(self.betas[t])
            eps = self.schedule.eps_from_output(self.net(x, t), x, t)
            x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
            mean = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
            var = beta * (1 - a_prev) / (1 - a)
            # grad of log r = -s * mean((mu - x_input)^2) with respect to mu
            grad = -2.0 * self.guidance_scale / n * (mean - x_input)
            x = mean + var * grad
            if t > 0:
                x = x + var**0.5 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return x.clamp(-1, 1)


def seeded_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=like.device).manual_seed(int(seed) + 1)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def inversion_timesteps(steps: int, T: int = 1000) -> list[int]:
    """`steps` evenly spaced timesteps from 0 to T-1 (3 -> [0, 500, 999]): steps - 1 network
    calls. One step would be no inversion at all, so 1 is treated as 2 ([0, 999])."""
    return [int(t) for t in np.linspace(0, T - 1, max(int(steps), 2)).round()]


def ddim_invert(net, schedule: NoiseSchedule, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x at timesteps[0] up to timesteps[-1], eps taken at
    the current (x_t, t)."""
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        a, a_next = schedule.abar(t), schedule.abar(t_next)
        eps = schedule.eps_from_output(net(x, t), x, t)
        x0 = x / math.sqrt(a) - math.sqrt(1.0 / a - 1.0) * eps
        x = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
    return x
