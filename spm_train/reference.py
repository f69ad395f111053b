"""The paper's training loop as published, kept as the baseline the fast path is measured against.

One concept per process, batch 1, fp32 (or under the trainer's autocast precision, to time precision's
gain apart from packing's), and the reference code's habits: every guidance-1 prediction
(positive, neutral, target, anchors) runs a full classifier-free-guidance batch whose unconditional half
does not change the result; anchors are drawn one at a time with a host sync each; predictions are moved
to the host for the loss; the loss is read back every step. The losses and the membrane are the same as
``PackTrainer``'s, so the two can be timed against each other in one process.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ConceptSpec, TrainerConfig
from .membrane import MembraneBank
from .models import ModelAdapter, PromptEmbeds
from .training import concept_seed


class PaperLoop:
    # Where each iteration's trajectory length comes from: None, the loop's own generator; a callable
    # returning the next length lets a benchmark train every path on the same lengths.
    trajectory_lengths: Callable[[], int] | None = None

    def __init__(self, pipe, concept: ConceptSpec, trainer: TrainerConfig):
        from diffusers import DDIMScheduler
        from diffusers.optimization import get_scheduler

        self.cfg = trainer
        self.concept = concept
        self.model = ModelAdapter(pipe)
        self.unet = pipe.unet.requires_grad_(False).eval()
        self.device = self.model.device
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        seed = concept_seed(trainer.seed, concept.name)
        self.host_rng = torch.Generator().manual_seed(seed)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.bank = MembraneBank.attach(self.unet, rank=trainer.rank, alpha=trainer.alpha, scope=trainer.scope,
                                        generators=[torch.Generator().manual_seed(seed ^ 0x5EED)])
        embeds = self.model.encode(["", concept.target, concept.positive_prompt, concept.neutral_prompt])
        self.uncond, self.target, self.positive, self.neutral = (embeds.index(slice(i, i + 1)) for i in range(4))
        self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=trainer.lr, weight_decay=trainer.weight_decay)
        self.lr_scheduler = get_scheduler(trainer.lr_scheduler, self.optimizer,
                                          num_warmup_steps=trainer.lr_warmup_steps,
                                          num_training_steps=trainer.iterations, num_cycles=trainer.lr_cycles)
        self.latent_shape = self.model.latent_shape(trainer.resolution)
        self.resolution = trainer.resolution or self.model.default_resolution()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision)
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                         else contextlib.nullcontext())

    def _predict(self, latents, t, cond: PromptEmbeds, guidance: float) -> torch.Tensor:
        n = cond.hidden.shape[0]
        x = torch.cat([latents.expand(n, -1, -1, -1)] * 2)
        embeds = PromptEmbeds.cat([self.uncond.repeat(n), cond])
        timesteps = torch.full((2 * n,), int(t), device=self.device)
        with self.autocast:
            out = self.model.predict(x, timesteps, embeds, self.resolution)
        uncond, cond_out = out.float().chunk(2)  # guidance, DDIM and the loss in fp32, as the fast path does
        return uncond + guidance * (cond_out - uncond)

    def _anchor(self) -> torch.Tensor:
        target = self.target.hidden[0]
        while True:  # rejection sampling with a host round-trip per candidate, as in the reference
            noise = torch.randn(target.shape, generator=self.rng, device=self.device)
            noise = noise / noise.norm()
            cos = F.cosine_similarity(noise.flatten(), target.flatten(), dim=0)
            if torch.rand(1, generator=self.rng, device=self.device).item() < 1 - cos.item():
                break
        lo, hi = self.cfg.anchor_scale_min, self.cfg.anchor_scale_max
        scale = target.norm() * (lo + (hi - lo) * torch.rand(1, generator=self.rng, device=self.device))
        return noise * scale

    def step(self) -> float:
        cfg = self.cfg
        t_to = (int(torch.randint(1, cfg.max_denoising_steps, (1,), generator=self.host_rng))
                if self.trajectory_lengths is None else self.trajectory_lengths())
        with torch.no_grad():
            self.scheduler.set_timesteps(cfg.max_denoising_steps, device=self.device)
            latents = torch.randn((1, *self.latent_shape), generator=self.rng, device=self.device)
            latents = latents * self.scheduler.init_noise_sigma
            self.bank.set_permeability(torch.ones(1, 1))
            for t in self.scheduler.timesteps[:t_to]:
                noise = self._predict(latents, t, self.target, cfg.trajectory_guidance)
                latents = self.scheduler.step(noise, t, latents).prev_sample
            self.scheduler.set_timesteps(1000, device=self.device)
            t = self.scheduler.timesteps[int(t_to * 1000 / cfg.max_denoising_steps)]
            self.bank.set_permeability(None)
            positive = self._predict(latents, t, self.positive, 1.0).to("cpu", torch.float32)
            neutral = self._predict(latents, t, self.neutral, 1.0).to("cpu", torch.float32)
            anchors = None
            if self.concept.uses_anchoring and cfg.la_strength > 0 and cfg.anchors_per_step:
                anchors = PromptEmbeds(torch.stack([self._anchor() for _ in range(cfg.anchors_per_step)]))
                anchor_off = self._predict(latents, t, anchors, 1.0).to("cpu", torch.float32)
        self.bank.set_permeability(torch.ones(1, 1))
        target = self._predict(latents, t, self.target, 1.0)
        g = self.concept.guidance_scale
        goal = (neutral - g * (positive - neutral)).to(self.device)
        loss = F.mse_loss(target.float(), goal)
        if anchors is not None:
            anchor_on = self._predict(latents, t, anchors, 1.0)
            loss = loss + cfg.la_strength * F.mse_loss(anchor_on.float(), anchor_off.to(self.device))
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.bank.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bank.set_permeability(None)
        return loss.item()

    def close(self) -> None:
        self.bank.detach()
