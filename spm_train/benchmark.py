"""Measure training throughput: the paper's loop against packed training, in one process.

Every figure is measured on the machine at hand: seconds per iteration (mean over timed iterations
after warm-up), concepts per hour at the trainer's iteration count, peak accelerator memory, and
effective TFLOP/s from ``torch.utils.flop_counter`` over the same draws as the timed iterations. Every
path trains on the same trajectory lengths (``PairedLengths``): the cost of an iteration grows with its
length, so a ratio of two paths is a ratio of equal work only on paired draws.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .config import PRECISIONS, ConceptSpec, TrainerConfig
from .errors import ConfigError, first_line
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
    iterations: int = 0  # timed iterations
    mean_t_to: float = 0.0  # mean trajectory length over the timed concept-iterations
    speedup: float | None = None  # concepts per hour over the fp32 paper loop's
    profile: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class PairedLengths:
    """The trajectory lengths every path of one benchmark trains on, one per concept-iteration, in order.

    Each path's timed iterations read the sequence from its start (``rewind``), so two paths that time the
    same number of concept-iterations train on the same lengths: the paper loop, one length per iteration;
    a pack of K, K per iteration. The sequence is made of blocks of ``block`` lengths, each a stratified
    draw from U[1, T) (one draw in each of ``block`` equal slices of the range) in shuffled order: at T = 30
    the mean of a block of 16 strays from T / 2 by 0.15 steps (one standard deviation), where 16
    independent draws stray by 2.1 (the bias this replaces: 20.3 steps for a paper loop against 15.7 for a
    pack). Blocks are drawn from ``seed``, so separate processes with the same settings train on the same
    lengths.
    """

    def __init__(self, max_steps: int, block: int, seed: int = 0):
        if max_steps < 2 or block < 1:
            raise ConfigError("paired lengths",
                              [f"need max_steps >= 2 and block >= 1, got {max_steps} and {block}"])
        self.max_steps, self.block = max_steps, block
        self._generator = torch.Generator().manual_seed(seed)
        self._lengths: list[int] = []
        self.taken: list[int] = []

    def _extend(self) -> None:
        g, n = self._generator, self.block
        slices = torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)
        lengths = 1 + (slices * (self.max_steps - 1) / n).floor().long()  # in [1, T - 1]
        self._lengths += lengths[torch.randperm(n, generator=g)].tolist()

    def lengths(self, count: int) -> list[int]:
        """The first ``count`` lengths of the sequence."""
        while len(self._lengths) < count:
            self._extend()
        return self._lengths[:count]

    def rewind(self) -> None:
        self.taken = []

    def __call__(self) -> int:
        length = self.lengths(len(self.taken) + 1)[-1]
        self.taken.append(length)
        return length


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generators(obj) -> list[torch.Generator]:
    if isinstance(obj, PaperLoop):
        return [obj.host_rng, obj.rng]
    return [g for c in obj.concepts for g in (c.host_rng, c.rng)]


@dataclass
class _Timing:
    seconds: float  # mean per timed iteration
    iterations: int
    mean_t_to: float
    peak_gb: float | None
    flops: float | None  # per iteration, over the counted ones
    tflops: float | None


def _measure(step: Callable[[], object], runner, lengths: PairedLengths, device: torch.device,
             iterations: int, warmup: int, count_flops: bool, flop_iterations: int | None = None) -> _Timing:
    """Time ``iterations`` steps of ``runner`` after ``warmup`` untimed ones, all reading ``lengths`` from its
    start (the warm-up sees the shapes the timed iterations will). With ``count_flops``, the first
    ``flop_iterations`` timed iterations (all when None) run again under the flop counter on the same draws:
    the counter's Python dispatch costs more than the arithmetic, so counting few keeps a benchmark short."""
    runner.trajectory_lengths = lengths
    lengths.rewind()
    for _ in range(warmup):
        step()
    lengths.rewind()
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
    taken = list(lengths.taken)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tflops = flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counted = min(iterations, flop_iterations or iterations)
        for g, s in zip(_generators(runner), states):  # the same draws as the timed iterations
            g.set_state(s)
        lengths.rewind()
        with FlopCounterMode(display=False) as counter:
            for _ in range(counted):
                step()
        flops = counter.get_total_flops() / counted
        tflops = counter.get_total_flops() / sum(times[:counted]) / 1e12
    return _Timing(sum(times) / iterations, iterations, sum(taken) / len(taken), peak, flops, tflops)


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


def run_benchmark(pipe, trainer: TrainerConfig, packs: Sequence[int] = (1, 4, 8), *,
                  concept_iterations: int = 16, warmup: int = 1,
                  baseline_precisions: Sequence[str] = ("fp32", "bf16"), fast_precision: str | None = None,
                  micro_batch: int = 0, count_flops: bool = False, flop_iterations: int | None = 1,
                  skipped: list[dict] | None = None, profile_dir: str | None = None,
                  fast_base_dtype: torch.dtype | None = None) -> list[Measurement]:
    """Time the paper's loop (K = 1) in each of ``baseline_precisions`` and the packed fast path at each K
    in ``fast_precision``, on ``pipe``'s device, every path on the same trajectory lengths
    (``PairedLengths``).

    Each path times ``concept_iterations`` concept-iterations: the paper loop and K = 1 that many
    iterations, a pack of K ``ceil(concept_iterations / K)`` (a K that divides it trains on exactly the
    paper loop's lengths; another K continues the same sequence, and its row's ``mean_t_to`` shows it).
    The paper loop in fp32 and in bf16, and packs at K = 1 and larger K in one precision, give precision's
    gain and packing's gain apart (``gains``).
    A pack size that runs out of accelerator memory is left out and reported in ``skipped``.
    ``profile_dir``: also profile one iteration of each pack (``profile_iteration``) into that folder.
    ``fast_base_dtype``: the fast path trains on a copy of the UNet in this dtype (e.g. bf16, without
    autocast when ``fast_precision`` is fp32) while the paper's loop keeps ``pipe``'s fp32 weights; the
    copy's memory counts in the fast rows' peaks.
    """
    device = pipe.unet.device
    fast_precision = fast_precision or default_fast_precision(device)
    problems = settings_problems(packs, concept_iterations, warmup, flop_iterations,
                                 list(baseline_precisions) + [fast_precision])
    if problems:
        raise ConfigError("benchmark settings", problems)
    if baseline_precisions and pipe.unet.dtype != torch.float32:
        logger.warning("the base is %s: the paper-loop rows run on %s weights, not the paper's fp32",
                       pipe.unet.dtype, pipe.unet.dtype)
    uneven = [k for k in packs if concept_iterations % k]
    if uneven:
        logger.warning("concept_iterations=%d does not divide by K = %s: those packs train on more lengths than "
                       "the other paths (their rows' mean t_to shows it)", concept_iterations, uneven)
    lengths = PairedLengths(trainer.max_denoising_steps, concept_iterations, trainer.seed)
    fast_pipe = pipe
    if fast_base_dtype is not None and fast_base_dtype != pipe.unet.dtype:
        fast_pipe = with_unet_dtype(pipe, fast_base_dtype)
    rows: list[Measurement] = []

    def record(name, k, precision, base, timing: _Timing):
        per_concept = timing.seconds / k
        base_dtype = str(base.unet.dtype).removeprefix("torch.")
        if base_dtype != "float32":  # "fp32" on a bf16/fp16 base means no autocast: the base's own dtype
            precision = (f"{base_dtype} base, no autocast" if precision == "fp32"
                         else f"{precision} autocast, {base_dtype} base")
        rows.append(Measurement(
            name=name, pack_size=k, precision=precision, seconds_per_iteration=timing.seconds,
            seconds_per_concept_iteration=per_concept,
            concepts_per_hour=3600.0 / (per_concept * trainer.iterations),
            peak_memory_gb=timing.peak_gb, tflops=timing.tflops, flops_per_iteration=timing.flops,
            iterations=timing.iterations, mean_t_to=timing.mean_t_to,
        ))
        logger.info("%s K=%d %s: %.4fs/it, %.4fs per concept-iteration, mean t_to %.2f", name, k, precision,
                    timing.seconds, per_concept, timing.mean_t_to)

    for precision in baseline_precisions:
        loop = PaperLoop(pipe, _concepts(1)[0], trainer.replace(precision=precision))
        try:
            record("paper loop", 1, precision, pipe, _measure(
                loop.step, loop, lengths, device, concept_iterations, warmup, count_flops, flop_iterations))
        finally:
            loop.close()
    for k in packs:
        fast = trainer.replace(precision=fast_precision, micro_batch=micro_batch)
        pack = PackTrainer(fast_pipe, _concepts(k), fast, progress=False)
        try:
            record("packed", k, fast_precision, fast_pipe, _measure(
                pack._train_step, pack, lengths, device, -(-concept_iterations // k), warmup, count_flops,
                flop_iterations))
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
    paper = _paper_row(rows, "fp32")
    for row in rows if paper else ():
        row.speedup = row.concepts_per_hour / paper.concepts_per_hour
    return rows


def settings_problems(packs: Sequence[int], concept_iterations: int | None, warmup: int | None,
                      flop_iterations: int | None, precisions: Sequence[str]) -> list[str]:
    """What a training benchmark cannot run with, every problem at once."""
    problems = []
    if not packs or any(k < 1 for k in packs):
        problems.append(f"packs={list(packs)}: one or more pack sizes >= 1")
    for name, value, least in (("concept_iterations", concept_iterations, 1), ("warmup", warmup, 0),
                               ("flop_iterations", flop_iterations, 1)):
        if value is not None and value < least:
            problems.append(f"{name}={value}: at least {least}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        problems.append(f"precision(s) {unknown} not among {list(PRECISIONS)}")
    return problems


def _paper_row(rows: Sequence[Measurement], precision: str) -> Measurement | None:
    return next((r for r in rows if r.name == "paper loop" and r.precision == precision), None)


@dataclass
class Gains:
    """The headline, in factors that read apart. With the packs in a precision the paper loop also ran in:
    ``vs_paper_fp32 = precision[packs' precision] * fast_path * packing`` (each a ratio of concepts/hour)."""

    packs_precision: str
    best_pack_size: int | None
    packing: float | None  # the best pack over the pack at K = 1, same precision
    fast_path: float | None  # the pack at K = 1 over the paper loop in the same precision
    precision: dict[str, float]  # the paper loop in each other precision over the paper loop in fp32
    vs_paper_fp32: float | None  # the best pack over the paper loop in fp32
    vs_paper_same_precision: float | None  # the best pack over the paper loop in the packs' precision

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """One line: the best pack against the fp32 paper loop, then the factors it is the product of."""
        def x(value):
            return "-" if value is None else f"{value:.2f}x"

        p, k = self.packs_precision, self.best_pack_size
        if k is None:
            return "no pack was timed"
        own = self.precision.get(p)  # precision's gain, when the paper loop also ran in the packs' precision
        factors = {"precision": (own, f"(the paper loop in {p} over fp32)"),
                   "fast path": (self.fast_path, f"(K = 1 over the paper loop, both {p})"),
                   "packing": (self.packing, f"(K = {k} over K = 1)")}
        if p == "fp32":
            del factors["precision"]
        known = [f"{name} {x(value)} {what}" for name, (value, what) in factors.items() if value is not None]
        whole = len(known) == len(factors)  # the factors multiply to the ratio only when all were timed
        if self.vs_paper_fp32 is None:
            text = f"K = {k} in {p}: " + ", ".join(known) + " (no fp32 paper loop in this run)"
        else:
            text = (f"K = {k} in {p}: {x(self.vs_paper_fp32)} the fp32 paper loop"
                    + (" = " + " * ".join(known) if whole else "; " + ", ".join(known)))
        if p != "fp32" and self.vs_paper_same_precision is not None:
            text += f"; {x(self.vs_paper_same_precision)} the paper loop in {p}"
        apart = [f"the paper loop in {name} runs {x(value)} its fp32 speed"
                 for name, value in self.precision.items() if name != p]
        return text + ("; precision apart: " + ", ".join(apart) if apart else "")


def gains(rows: Sequence[Measurement]) -> Gains:
    """Packing's gain and precision's gain apart, from one benchmark's rows."""
    packed = [r for r in rows if r.name == "packed"]
    precision = packed[0].precision if packed else "-"
    same = [r for r in packed if r.precision == precision]
    best = max(same, key=lambda r: r.concepts_per_hour, default=None)
    single = next((r for r in same if r.pack_size == 1), None)
    fp32, paper_same = _paper_row(rows, "fp32"), _paper_row(rows, precision)

    def ratio(a, b):
        return None if a is None or b is None else a.concepts_per_hour / b.concepts_per_hour

    others = {r.precision: ratio(r, fp32) for r in rows
              if r.name == "paper loop" and r.precision != "fp32" and fp32 is not None}
    return Gains(packs_precision=precision, best_pack_size=best.pack_size if best else None,
                 packing=ratio(best, single), fast_path=ratio(single, paper_same), precision=others,
                 vs_paper_fp32=ratio(best, fp32), vs_paper_same_precision=ratio(best, paper_same))


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
    header = ("path", "K", "precision", "iters", "mean t_to", "s/iter", "s/concept-iter", "concepts/h",
              "peak GB", "TFLOP/s", "vs fp32 paper")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join([
            r.name, str(r.pack_size), r.precision, str(r.iterations), f"{r.mean_t_to:.2f}",
            f"{r.seconds_per_iteration:.4f}", f"{r.seconds_per_concept_iteration:.4f}",
            f"{r.concepts_per_hour:.2f}", "-" if r.peak_memory_gb is None else f"{r.peak_memory_gb:.1f}",
            "-" if r.tflops is None else f"{r.tflops:.3g}",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
        ]))
    return "\n".join(lines)
