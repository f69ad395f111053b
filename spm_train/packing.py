"""How many concepts fit in one pack: measured, not guessed.

Memory of a pack iteration grows linearly in K: the base model and the trajectory batch are shared,
the membrane-on activations kept for the backward pass are per concept. Two probe iterations (K = 1
and K = 2) give both terms on the device at hand; the largest K that fits the free memory follows.
"""

from __future__ import annotations

import logging

import torch

from .config import ConceptSpec, TrainerConfig

logger = logging.getLogger(__name__)


def largest_fitting(peak_one: int, peak_two: int, budget: int, limit: int) -> int:
    """Largest K with ``fixed + K * per_concept <= budget`` for peaks measured at K = 1 and K = 2."""
    per_concept = max(peak_two - peak_one, 1)
    fixed = peak_one - per_concept
    return max(1, min(limit, (budget - fixed) // per_concept))


def _peak(pipe, trainer: TrainerConfig, k: int) -> int:
    from .training import PackTrainer

    device = pipe.unet.device
    concepts = [ConceptSpec(f"probe-{i}", f"a photo of probe {i}") for i in range(k)]
    pack = PackTrainer(pipe, concepts, trainer.replace(checkpoint_every=0), progress=False)
    try:
        for c in pack.concepts:  # a fixed draw; the peak is in the membrane-on backward, which no draw changes
            c.host_rng.manual_seed(0)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        pack._train_step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    finally:
        pack.close()


def fit_pack_size(pipe, trainer: TrainerConfig, *, limit: int = 64, headroom: float = 0.9) -> int | None:
    """The pack size that fits ``headroom`` of the accelerator's free memory; None off CUDA."""
    device = pipe.unet.device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    budget = torch.cuda.memory_allocated(device) + int(free * headroom)
    k = largest_fitting(_peak(pipe, trainer, 1), _peak(pipe, trainer, 2), budget, limit)
    logger.info("pack size %d fits %.1f GB on %s", k, budget / 2**30, torch.cuda.get_device_name(device))
    return k
