"""Measure training throughput: the paper's loop against packed training, in one process.

Every figure is measured on the machine at hand: seconds per iteration (mean over timed iterations
after warm-up), concepts per hour at the trainer's iteration count, peak accelerator memory, and
effective TFLOP/s from ``torch.utils.flop_counter`` over the same draws as the timed iterations.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .config import ConceptSpec, TrainerConfig
from .errors import first_line
from .reference import PaperLoop
from .training import PackTrainer

logger = logging.getLogger(__name__)


@dataclass
class Measurement:
    name: str
    pack_size: int
    precision: str
    seconds_per_iteration: float
    seconds_per_concept_iteration: float
    concepts_per_hour: float
    peak_memory_gb: float | None
    tflops: float | None
    flops_per_iteration: float | None
    speedup: float | None = None
    profile: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generators(obj) -> list[torch.Generator]:
    if isinstance(obj, PaperLoop):
        return [obj.host_rng, obj.rng]
    return [g for c in obj.concepts for g in (c.host_rng, c.rng)]


def _measure(step: Callable[[], object], runner, device: torch.device, iterations: int, warmup: int,
             count_flops: bool, flop_iterations: int | None = None) -> tuple[float, float | None, float | None, float | None]:
    """Mean seconds per iteration, peak memory, and TFLOP/s over the first ``flop_iterations`` timed
    iterations (all by default), counted again on the same draws: the flop counter's Python dispatch costs
    more than a large model's GPU work, so counting a few iterations keeps a GPU benchmark short."""
    for _ in range(warmup):
        step()
    states = [g.get_state() for g in _generators(runner)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iterations):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = sum(times) / iterations
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tflops = flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counted = min(iterations, flop_iterations or iterations)
        for g, s in zip(_generators(runner), states):  # the same draws as the timed iterations
            g.set_state(s)
        with FlopCounterMode(display=False) as counter:
            for _ in range(counted):
                step()
        flops = counter.get_total_flops() / counted
        tflops = counter.get_total_flops() / sum(times[:counted]) / 1e12
    return seconds, peak, flops, tflops


def profile_iteration(step: Callable[[], object], device: torch.device, path: str, row_limit: int = 40) -> str:
    """Profile one iteration and write its operators, by self time on the device (CPU time on a CPU), to
    ``path``; the iteration's phases appear as ``spm.*`` ranges. Returns ``path``."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList
    from torch.profiler import ProfilerActivity, profile

    from . import io

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    averages = prof.key_averages()
    # a phase is a CPU-side range; its device time is that of the kernels launched inside it. On a GPU
    # each range also has a device-side copy (its span), left out of the operator table.
    phases = [e for e in averages if e.key.startswith("spm.") and e.device_type == DeviceType.CPU]
    operators = EventList([e for e in averages if not e.key.startswith("spm.")], use_device=averages._use_device)
    by_self = operators.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                              row_limit=row_limit)
    lines = [f"{e.key}: {(e.device_time_total if cuda else e.cpu_time_total) / 1e3:.1f} ms" for e in phases]
    with io.atomic_output(path) as tmp, open(tmp, "w") as fh:
        fh.write("phases (" + ("device" if cuda else "CPU") + " time, total):\n" + "\n".join(lines) + "\n\n")
        fh.write(by_self + "\n")
    logger.info("profile of one iteration -> %s", path)
    return path


@dataclass
class ForwardFlops:
    """FLOPs of one UNet forward per sample: the base alone, and with a pack of K membranes open."""

    pack_size: int
    base_tflop_per_sample: float
    masked_overhead: float  # every sample computes all K branches, K - 1 of them masked to zero
    gathered_overhead: float  # every sample computes its own membrane's branch only

    def to_dict(self) -> dict:
        return asdict(self)


def forward_flops(unet, packs: Sequence[int], batch: int, latent_side: int, tokens: int = 77) -> list[ForwardFlops]:
    """Count one UNet forward's FLOPs with ``torch.utils.flop_counter`` for each routing of each pack size.

    Run it on a ``meta``-device UNet (``architectures.full_unet(name, device="meta")``): shapes only, no
    memory and no arithmetic, so SD 1.5 or SDXL at full size count in seconds on any machine. The pack's
    membranes are attached to ``unet`` for the count and detached afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .membrane import MembraneBank

    device = next(unet.parameters()).device
    config = unet.config
    x = torch.zeros(batch, config.in_channels, latent_side, latent_side, device=device)
    kwargs = {"encoder_hidden_states": torch.zeros(batch, tokens, config.cross_attention_dim, device=device)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and six size/crop ids
        time_dim = 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, config.projection_class_embeddings_input_dim - time_dim, device=device),
            "time_ids": torch.zeros(batch, 6, device=device)}
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)

    def count() -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, timesteps, **kwargs)
        return counter.get_total_flops() / batch

    base = count()
    rows = []
    for k in packs:
        bank = MembraneBank.attach(unet, count=k)
        try:
            owners = torch.arange(batch) % k
            bank.set_permeability((owners.unsqueeze(1) == torch.arange(k)).float())
            masked = count()
            bank.route(owners)
            gathered = count() if k > 1 else masked  # one membrane: routing runs the dense branch
        finally:
            bank.detach()
        rows.append(ForwardFlops(k, base / 1e12, masked / base - 1, gathered / base - 1))
        logger.info("K=%d: %.4f TFLOP per sample, masked +%.3f%%, gathered +%.3f%%", k, base / 1e12,
                    100 * (masked / base - 1), 100 * (gathered / base - 1))
    return rows


def default_fast_precision(device) -> str:
    """The fast path's autocast precision when none is given: bf16 on CUDA, none (fp32) elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def _concepts(k: int) -> list[ConceptSpec]:
    return [ConceptSpec(f"concept-{i}", f"a photo of concept {i}") for i in range(k)]


def run_benchmark(pipe, trainer: TrainerConfig, packs: Sequence[int] = (1, 4, 8), *, iterations: int = 5,
                  warmup: int = 1, baseline: bool = True, fast_precision: str | None = None,
                  micro_batch: int = 0, count_flops: bool = True, baseline_iterations: int | None = None,
                  flop_iterations: int | None = None, skipped: list[dict] | None = None,
                  profile_dir: str | None = None, fast_base_dtype: torch.dtype | None = None) -> list[Measurement]:
    """Time the paper's loop (K = 1, fp32) and the packed fast path at each K, on ``pipe``'s device.

    ``baseline_iterations`` (default ``iterations``): the paper's loop draws one trajectory length per
    iteration, so it needs more iterations than a pack (which averages K draws) for the same noise.
    A pack size that runs out of accelerator memory is left out and reported in ``skipped``.
    ``profile_dir``: also profile one iteration of each pack (``profile_iteration``) into that folder.
    ``fast_base_dtype``: the fast path trains on a copy of the UNet in this dtype (e.g. bf16, without
    autocast when ``fast_precision`` is fp32) while the paper's loop keeps ``pipe``'s fp32 weights; the
    copy's memory counts in the fast rows' peaks.
    """
    device = pipe.unet.device
    fast_precision = fast_precision or default_fast_precision(device)
    if baseline and pipe.unet.dtype != torch.float32:
        logger.warning("the base is %s: the paper-loop row runs on %s weights, not the paper's fp32",
                       pipe.unet.dtype, pipe.unet.dtype)
    fast_pipe = pipe
    if fast_base_dtype is not None and fast_base_dtype != pipe.unet.dtype:
        fast_pipe = with_unet_dtype(pipe, fast_base_dtype)
    rows: list[Measurement] = []

    def record(name, k, precision, base, seconds, peak, flops, tflops):
        per_concept = seconds / k
        base_dtype = str(base.unet.dtype).removeprefix("torch.")
        if base_dtype != "float32":  # "fp32" on a bf16/fp16 base means no autocast: the base's own dtype
            precision = (f"{base_dtype} base, no autocast" if precision == "fp32"
                         else f"{precision} autocast, {base_dtype} base")
        rows.append(Measurement(
            name=name, pack_size=k, precision=precision, seconds_per_iteration=seconds,
            seconds_per_concept_iteration=per_concept,
            concepts_per_hour=3600.0 / (per_concept * trainer.iterations),
            peak_memory_gb=peak, tflops=tflops, flops_per_iteration=flops,
        ))
        logger.info("%s K=%d %s: %.4fs/it, %.4fs per concept-iteration", name, k, precision, seconds, per_concept)

    if baseline:
        loop = PaperLoop(pipe, _concepts(1)[0], trainer.replace(precision="fp32"))
        try:
            record("paper loop", 1, "fp32", pipe, *_measure(loop.step, loop, device,
                                                            baseline_iterations or iterations, warmup,
                                                            count_flops, flop_iterations))
        finally:
            loop.close()
    for k in packs:
        fast = trainer.replace(precision=fast_precision, micro_batch=micro_batch)
        pack = PackTrainer(fast_pipe, _concepts(k), fast, progress=False)
        try:
            record("packed", k, fast_precision, fast_pipe, *_measure(pack._train_step, pack, device, iterations,
                                                                     warmup, count_flops, flop_iterations))
            if profile_dir:
                _profile_row(rows[-1], pack, device, os.path.join(profile_dir, f"profile_packed_K{k}.txt"))
        except torch.cuda.OutOfMemoryError as exc:
            logger.warning("pack of %d left out: out of accelerator memory (%s)", k, first_line(exc))
            if skipped is not None:
                skipped.append({"pack_size": k, "reason": "out of memory"})
        finally:
            pack.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if baseline:
        base = rows[0].concepts_per_hour
        for row in rows:
            row.speedup = row.concepts_per_hour / base
    return rows


def with_unet_dtype(pipe, dtype: torch.dtype):
    """The same pipeline with a copy of its UNet in ``dtype`` (the other components are shared)."""
    import copy

    from .architectures import cast

    unet = cast(copy.deepcopy(pipe.unet), dtype)
    return type(pipe)(**{**pipe.components, "unet": unet})


def _profile_row(row: Measurement, pack: PackTrainer, device: torch.device, path: str) -> None:
    """Profile one more iteration of a timed pack; a profile that runs out of memory leaves the row as is."""
    try:
        row.profile = profile_iteration(pack._train_step, device, path)
    except torch.cuda.OutOfMemoryError as exc:
        logger.warning("pack of %d not profiled: out of accelerator memory (%s)", row.pack_size, first_line(exc))


def format_table(rows: Sequence[Measurement]) -> str:
    header = ("path", "K", "precision", "s/iter", "s/concept-iter", "concepts/h", "peak GB", "TFLOP/s", "vs paper")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join([
            r.name, str(r.pack_size), r.precision, f"{r.seconds_per_iteration:.4f}",
            f"{r.seconds_per_concept_iteration:.4f}", f"{r.concepts_per_hour:.2f}",
            "-" if r.peak_memory_gb is None else f"{r.peak_memory_gb:.1f}",
            "-" if r.tflops is None else f"{r.tflops:.2f}",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
        ]))
    return "\n".join(lines)
