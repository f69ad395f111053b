"""Throughput benchmark: the paper's loop and the packed fast path, measured in one process.

    python -m pipelines.benchmark                                         # ToyWorld: ~1 min on 2 cores
    python -m pipelines.benchmark preset=gpu                              # SD 1.5 at 512 px, on a GPU
    python -m pipelines.benchmark model.source=arch:sd15 packs=[1,8,16,32] # SD 1.5 architecture, random weights
    python -m pipelines.benchmark mode=orchestration jobs=1000            # Ray scheduling overhead
    python -m pipelines.benchmark mode=flops model.source=arch:sd15 packs=[8,32] trainer.resolution=512
                                                                          # FLOPs per UNet forward (meta device)

Prints a table and the headline (packing's and precision's gains apart) and writes the same figures as
JSON (``out``), with the trajectory lengths every path trained on.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipelines.console import quiet_console
from pipelines.schema import ModelConfig, check_home
from spm_train.config import TrainerConfig

logger = logging.getLogger("pipelines.benchmark")


@dataclass
class BenchmarkConfig:
    mode: str = "training"
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    packs: List[int] = field(default_factory=lambda: [1, 4, 8])
    concept_iterations: int = 16
    warmup: int = 1
    baseline_precisions: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    fast_precision: Optional[str] = None
    micro_batch: int = 0
    fit_pack: bool = False
    fit_pack_limit: int = 64
    flops: bool = False
    flop_iterations: Optional[int] = 1
    profile: bool = False
    fast_base_dtype: Optional[str] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    jobs: int = 1000
    out: str = "benchmark.json"


ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def training_benchmark(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from spm_train.benchmark import PairedLengths, format_table, gains, run_benchmark
    from spm_train.models import load_base_model

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    trainer = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    fast_base_dtype = _dtype(cfg.fast_base_dtype)
    pipe = load_base_model(cfg.model.source, dtype=cfg.model.dtype, device=device)
    packs, fitted, skipped = list(cfg.packs), None, []
    if cfg.fit_pack:
        from spm_train.benchmark import default_fast_precision
        from spm_train.packing import fit_pack_size

        fast = trainer.replace(precision=cfg.fast_precision or default_fast_precision(device),
                               micro_batch=cfg.micro_batch)
        fitted = fit_pack_size(pipe, fast, limit=cfg.fit_pack_limit)
        if fitted is None:
            logger.info("fit_pack: no accelerator memory to fit on %s", device)
        elif fitted not in packs:
            packs.append(fitted)
    rows = run_benchmark(pipe, trainer, packs, concept_iterations=cfg.concept_iterations, warmup=cfg.warmup,
                         baseline_precisions=list(cfg.baseline_precisions), fast_precision=cfg.fast_precision,
                         micro_batch=cfg.micro_batch, count_flops=cfg.flops,
                         flop_iterations=cfg.flop_iterations, skipped=skipped,
                         profile_dir=os.path.dirname(os.path.abspath(cfg.out)) if cfg.profile else None,
                         fast_base_dtype=fast_base_dtype)
    headline = gains(rows)
    print(format_table(rows))
    print(headline.text())
    lengths = PairedLengths(trainer.max_denoising_steps, cfg.concept_iterations, trainer.seed)
    return {"mode": "training", "model": cfg.model.source, "device": device, "machine": machine(),
            "trainer": trainer.to_dict(), "fitted_pack_size": fitted, "skipped": skipped,
            "concept_iterations": cfg.concept_iterations,
            "lengths": lengths.lengths(max(r.iterations * r.pack_size for r in rows) if rows else 0),
            "rows": [r.to_dict() for r in rows], "gains": headline.to_dict()}


def _dtype(name: str | None):
    from spm_train.errors import ConfigError
    from spm_train.models import TORCH_DTYPES

    if name is None:
        return None
    if name not in TORCH_DTYPES:
        raise ConfigError("benchmark config", [f"fast_base_dtype {name!r} is not one of {sorted(TORCH_DTYPES)}"])
    return TORCH_DTYPES[name]


def flops_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """FLOPs of one UNet forward per sample, and what a pack's membranes add with masked or gathered
    routing, counted on the meta device (no weights, no arithmetic: any architecture, any machine)."""
    from spm_train.architectures import full_unet
    from spm_train.benchmark import forward_flops
    from spm_train.models import load_base_model

    source = cfg.model.source
    if source.startswith("arch:"):
        unet, scale, tokens = full_unet(source.split(":", 1)[1], device="meta"), 8, 77
    else:
        pipe = load_base_model(source)
        unet, scale, tokens = pipe.unet.to("meta"), pipe.vae_scale_factor, pipe.tokenizer.model_max_length
    resolution = cfg.trainer.resolution or int(unet.config.sample_size) * scale
    rows = forward_flops(unet, list(cfg.packs), batch=max(cfg.packs), latent_side=resolution // scale, tokens=tokens)
    print(" | ".join(("K", "TFLOP per sample", "masked branches", "gathered branches")))
    for r in rows:
        print(f"{r.pack_size} | {r.base_tflop_per_sample:.4f} | +{100 * r.masked_overhead:.3f}% | "
              f"+{100 * r.gathered_overhead:.3f}%")
    return {"mode": "flops", "model": source, "resolution": resolution, "machine": machine(),
            "rows": [r.to_dict() for r in rows]}


def orchestration_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Plan ``jobs`` single-concept packs and run them with a no-op trainer on a local Ray instance."""
    import ray

    from spm_train.bulk.plan import expand, pack
    from spm_train.bulk.runner import ClusterOptions, connect, run_jobs
    from spm_train.bulk.store import ResultStore
    from spm_train.config import ConceptSpec

    start = time.perf_counter()
    concepts = [ConceptSpec(f"concept-{i}", f"concept {i}") for i in range(cfg.jobs)]
    jobs = pack(expand(concepts, TrainerConfig.preset("smoke"), {}, "benchmark"), pack_size=1)
    planned = time.perf_counter()
    connect(ClusterOptions())
    connected = time.perf_counter()
    results = run_jobs(jobs, {}, ResultStore("memory://unused"), ClusterOptions(cpus_per_job=1, max_retries=0),
                       progress=False, train_fn=noop_pack)
    done = time.perf_counter()
    ray.shutdown()
    figures = {"jobs": cfg.jobs, "plan_s": planned - start, "ray_start_s": connected - planned,
               "schedule_and_collect_s": done - connected, "total_s": done - start,
               "succeeded": sum(r.status == "trained" for r in results)}
    print(" | ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in figures.items()))
    return {"mode": "orchestration", "machine": machine(), **figures}


def noop_pack(job, model, store_root, board=None) -> list[dict]:
    """A trainer that does nothing: what is left is planning, scheduling and collecting."""
    from spm_train.bulk.store import ConceptResult

    return [ConceptResult(concept=t.concept.name, key=t.key, point=t.point, point_id=t.point_id,
                          status="trained", job_id=job.job_id).to_dict(with_history=False) for t in job.tasks]


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from spm_train.errors import ConfigError, SPMError

    quiet_console()

    modes = {"training": training_benchmark, "orchestration": orchestration_benchmark, "flops": flops_benchmark}
    try:
        problems = [] if cfg.mode in modes else [f"mode {cfg.mode!r} is not one of {sorted(modes)}"]
        if cfg.mode in ("training", "flops"):
            problems += setting_problems(cfg)
        if problems:
            raise ConfigError("benchmark config", problems)
        report = modes[cfg.mode](cfg)
    except SPMError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    from spm_train.bulk.store import write_json

    write_json(cfg.out, report)
    print(f"written: {cfg.out}")


def setting_problems(cfg: DictConfig) -> list[str]:
    """Pack sizes, iteration counts and precisions a training or FLOP benchmark cannot run with."""
    from spm_train.benchmark import settings_problems

    if cfg.mode != "training":
        return settings_problems(list(cfg.packs), None, None, None, [])
    precisions = list(cfg.baseline_precisions) + ([cfg.fast_precision] if cfg.fast_precision else [])
    problems = settings_problems(list(cfg.packs), cfg.concept_iterations, cfg.warmup, cfg.flop_iterations,
                                 precisions)
    if cfg.fit_pack_limit < 1:
        problems.append(f"fit_pack_limit={cfg.fit_pack_limit}: at least 1")
    return problems


if __name__ == "__main__":
    check_home()
    main()
