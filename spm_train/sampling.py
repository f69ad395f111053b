"""DDIM arithmetic vectorised over samples that sit at different timesteps.

Training packs run several partial trajectories at once, each concept stopping at its own step,
so the sampler works on per-sample timestep tensors instead of a scheduler's scalar state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DDIMSchedule:
    alphas_cumprod: torch.Tensor  # [num_train_timesteps]
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str
    scheduler: object  # a DDIMScheduler, asked for the timestep spacing only
    _alphas_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_scheduler_config(cls, config) -> "DDIMSchedule":
        """Use the base model's noise schedule (betas, offset, prediction type) with DDIM stepping."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(config)
        return cls(
            alphas_cumprod=sched.alphas_cumprod.clone().float(),
            final_alpha_cumprod=float(sched.final_alpha_cumprod),
            num_train_timesteps=int(sched.config.num_train_timesteps),
            prediction_type=sched.config.prediction_type,
            scheduler=sched,
        )

    def _alphas_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``: copied once, so that stepping never waits on a host copy."""
        key = (device, dtype)
        if key not in self._alphas_cache:
            self._alphas_cache[key] = self.alphas_cumprod.to(device, dtype)
        return self._alphas_cache[key]

    def timesteps(self, num_steps: int) -> list[int]:
        """The ``num_steps`` DDIM timesteps, spaced as the base model's scheduler config says."""
        self.scheduler.set_timesteps(num_steps)
        return [int(t) for t in self.scheduler.timesteps]

    def train_timestep(self, step: int, num_steps: int) -> int:
        """The 1000-step timestep matching ``step`` of a ``num_steps`` trajectory (the paper's mapping)."""
        index = int(step * self.num_train_timesteps / num_steps)
        return self.num_train_timesteps - 1 - index

    def step(self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, num_steps: int) -> torch.Tensor:
        """One deterministic DDIM step (eta 0) from timesteps ``t`` (one per sample) to ``t - ratio``."""
        ratio = self.num_train_timesteps // num_steps
        ac = self._alphas_on(sample.device, sample.dtype)
        prev = t - ratio
        a_t = ac[t].view(-1, *[1] * (sample.dim() - 1))
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)],
                             torch.full_like(prev, self.final_alpha_cumprod, dtype=ac.dtype))
        a_prev = a_prev.view_as(a_t)
        out = model_output.to(sample.dtype)
        if self.prediction_type == "epsilon":
            x0 = (sample - (1 - a_t).sqrt() * out) / a_t.sqrt()
            eps = out
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * sample
        elif self.prediction_type == "sample":
            x0 = out
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
