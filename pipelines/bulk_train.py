"""The main job: a concept set -> packs on Ray -> trained membranes -> manifest and summary.

    python -m pipelines.bulk_train                                  # ToyWorld, local Ray, offline W&B
    python -m pipelines.bulk_train concepts=characters model=sd14 trainer=paper cluster=existing eval=none
    python -m pipelines.bulk_train sweep=lr_la                      # 4 sweep points, concurrently

Everything is validated before a job is scheduled; a concept whose training fails is reported in
the summary while the others finish.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipelines.schema import check_home, register
from spm_train.bulk.plan import Job, expand, pack
from spm_train.bulk.runner import ClusterOptions, check_reachable, connect, run_jobs
from spm_train.bulk.store import ConceptResult, ResultStore, write_json
from spm_train.config import ConceptSpec, TrainerConfig, number_problem
from spm_train.errors import ConfigError, SPMError
from spm_train.io import folder_problem

logger = logging.getLogger("pipelines.bulk_train")

register()


@dataclass
class RunPlan:
    concepts: list[ConceptSpec]
    trainer: TrainerConfig
    jobs: list[Job]
    cached: list[ConceptResult]
    base_fingerprint: str
    family: str
    store: ResultStore
    model: dict[str, Any]
    cluster: ClusterOptions
    sweep: dict[str, list]


@dataclass
class RunSummary:
    results: list[ConceptResult]
    run_dir: str
    manifest: str
    seconds: float
    plan: RunPlan | None = field(default=None, repr=False)
    registry: str | None = None  # the registry folder, when the registry stage ran
    wandb_run_dir: str | None = None  # the W&B run folder, when tracking is on
    versions: dict[str, str] = field(default_factory=dict)  # result key -> "concept:vN"
    report: str | None = None  # the evaluation report (report.md), when eval.enabled

    @property
    def failed(self) -> list[ConceptResult]:
        return [r for r in self.results if r.status == "failed"]


# -- setup: every check happens here, before anything is scheduled ---------------------------


def _setup_concepts(cfg: DictConfig) -> list[ConceptSpec]:
    problems, specs = [], []
    entries = cfg.concepts.concepts
    for i, entry in enumerate(entries):
        missing = [k for k in ("name", "target") if OmegaConf.is_missing(entry, k)]
        if missing:
            problems.append(f"concept #{i + 1} of set {cfg.concepts.name!r} has no {' or '.join(missing)}")
            continue
        try:
            specs.append(ConceptSpec(**OmegaConf.to_container(entry, resolve=True)))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(f"concept set {cfg.concepts.name!r}", problems)
    return specs


def _setup_trainer(cfg: DictConfig) -> TrainerConfig:
    return TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))


def _setup_model(cfg: DictConfig, concepts: list[ConceptSpec] = ()) -> tuple[dict[str, Any], str, str]:
    """Load the base once on the driver: it proves the model exists and gives its fingerprint."""
    from spm_train.models import base_fingerprint, detect_family, load_base_model

    model = OmegaConf.to_container(cfg.model, resolve=True)
    pipe = load_base_model(model["source"], dtype=model["dtype"])
    family = detect_family(pipe)
    if model.get("family") and model["family"] != family:
        raise ConfigError("model", [f"{model['source']!r} is a {family} model, config says {model['family']}"])
    fingerprint = base_fingerprint(pipe.unet)
    _warn_long_prompts(pipe, concepts)
    del pipe
    return model, family, fingerprint


def _warn_long_prompts(pipe, concepts: list[ConceptSpec]) -> None:
    """Say on the driver, before training, which prompts the text encoder will cut (workers log to
    themselves only, and a cut target trains a membrane for its first words)."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
    for spec in concepts:
        prompts = {"target": spec.target, "positive": spec.positive_prompt, "neutral": spec.neutral_prompt}
        for role, prompt in prompts.items():
            for tokenizer in tokenizers:
                n, limit = len(tokenizer(prompt).input_ids), tokenizer.model_max_length
                if n > limit:
                    logger.warning("concept %s: the %s prompt is %d tokens; the text encoder reads %d, so "
                                   "training sees only %r", spec.name, role, n, limit,
                                   tokenizer.decode(tokenizer(prompt).input_ids[1:limit - 1]))
                    break


def _setup_cluster(cfg: DictConfig) -> tuple[ClusterOptions, int]:
    data = OmegaConf.to_container(cfg.cluster, resolve=True)
    pack_size, max_pack_size = data.pop("pack_size"), data.pop("max_pack_size")
    problems = []
    if pack_size < 0 or max_pack_size < 1:
        problems.append(f"pack_size must be >= 0 (0: fit to GPU memory) and max_pack_size >= 1, "
                        f"got {pack_size} and {max_pack_size}")
    data["auto_pack"] = pack_size == 0
    pack_size = pack_size or max_pack_size
    for name in ("cpus_per_job", "gpus_per_job", "connect_timeout_s"):
        if name in data and (problem := number_problem(f"cluster.{name}", data[name], minimum=0)):
            problems.append(problem)
    if data["max_retries"] < 0:
        problems.append(f"max_retries must be >= 0, got {data['max_retries']}")
    if data.get("workers_per_job", 1) < 1:
        problems.append(f"workers_per_job must be >= 1, got {data['workers_per_job']}")
    if problems:
        raise ConfigError("cluster config", problems)
    if data.get("deepspeed"):
        data["deepspeed"] = _read_deepspeed(data["deepspeed"])
    options = ClusterOptions(**data)
    check_reachable(options)
    return options, pack_size


def _read_deepspeed(path: str) -> dict:
    import json

    candidates = [path, os.path.join(os.path.dirname(__file__), "..", "conf", "deepspeed", path),
                  os.path.join(os.path.dirname(__file__), "..", "conf", "deepspeed", f"{path}.json")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            try:
                with open(candidate) as fh:
                    return json.load(fh)
            except ValueError as exc:
                raise ConfigError("cluster config", [f"deepspeed config {candidate} is not JSON: {exc}"]) from None
    raise ConfigError("cluster config", [f"deepspeed config {path!r} not found (a path, or a name in conf/deepspeed)"])


def plan_run(cfg: DictConfig) -> RunPlan:
    """Validate the whole config and plan the jobs; raises one ``ConfigError`` listing every problem."""
    problems: list[str] = []
    concepts, trainer = [], None
    for step in (_setup_concepts, _setup_trainer):
        try:
            value = step(cfg)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if step is _setup_concepts:
            concepts = value
        else:
            trainer = value
    cluster, pack_size = None, 1
    try:
        cluster, pack_size = _setup_cluster(cfg)
    except ConfigError as exc:
        problems += exc.problems
    sweep = {k: list(v) for k, v in OmegaConf.to_container(cfg.sweep, resolve=True).items()}
    if trainer is not None and concepts:
        try:  # every concept's overrides and every sweep point, before the base model loads
            expand(concepts, trainer, sweep, "", cluster=cluster)
        except ConfigError as exc:
            problems += exc.problems
    problems += _check_stages(cfg, concepts)
    if problems:
        raise ConfigError("bulk run", problems)

    model, family, fingerprint = _setup_model(cfg, concepts)
    tasks = expand(concepts, trainer, sweep, fingerprint, cluster=cluster)
    store = ResultStore(cfg.paths.store)
    cached, todo = [], []
    for task in tasks:
        hit = store.lookup(task.key)
        if hit is not None:
            hit.status, hit.point, hit.point_id = "cached", task.point, task.point_id
            cached.append(hit)
        else:
            todo.append(task)
    return RunPlan(concepts, trainer, pack(todo, pack_size), cached, fingerprint, family, store, model,
                   cluster, sweep)


def _check_stages(cfg: DictConfig, concepts: list) -> list[str]:
    """Problems of the stages after training (evaluation, registry, tracking), found before it starts."""
    from pipelines.evaluate import check_eval_config
    from spm_train.registry.publish import check_registry_config
    from spm_train.tracking import check_tracking

    problems = check_tracking(OmegaConf.to_container(cfg.tracking, resolve=True))
    # (setting, folder, whether it may be a URL): the result store may; run folders and the SQLite index not
    for name, folder, url_ok in (("paths.root", cfg.paths.root, False), ("paths.store", cfg.paths.store, True),
                                 ("registry.uri", cfg.registry.uri if cfg.registry.enabled else None, False)):
        if not folder:
            continue
        if "://" in str(folder) and not url_ok:
            problems.append(f"{name}={folder}: run folders and the registry index need a local or shared "
                            "filesystem folder; keep results and membranes at a URL with paths.store=<url> "
                            "registry.blobs=<url>")
        elif (problem := folder_problem(str(folder))) is not None:
            problems.append(f"{name}={folder}: {problem}")
    if cfg.registry.enabled and "://" not in str(cfg.registry.uri):
        problems += _registry_index_problems(str(cfg.registry.uri))
    if concepts:
        problems += check_eval_config(cfg, concepts)
        if cfg.registry.enabled:
            problems += check_registry_config(_registry_section(cfg), [c.name for c in concepts])
    return problems


def _registry_index_problems(root: str) -> list[str]:
    """An existing registry index that cannot be read is refused now, not after training (an absent one
    is created at registration)."""
    from spm_train.registry import Registry, RegistryError

    if not os.path.exists(os.path.join(root, Registry.INDEX_NAME)):
        return []
    try:
        Registry.open(root, create=False).close()
    except RegistryError as exc:
        return [f"registry.uri={root}: {exc}"]
    return []


# -- the job -----------------------------------------------------------------------------------


def train(cfg: DictConfig, *, run_dir: str | None = None,
          task_options: Callable[[Job], dict] | None = None) -> RunSummary:
    """Plan, schedule, gather, summarise. ``task_options`` adds Ray options per job (tests pin nodes)."""
    start = time.perf_counter()
    plan = plan_run(cfg)
    run_dir = run_dir or cfg.paths.run_dir
    os.makedirs(run_dir, exist_ok=True)
    n_tasks = sum(len(j.tasks) for j in plan.jobs)
    logger.info("%d concept(s) x %d sweep point(s): %d to train in %d pack(s), %d already trained",
                len(plan.concepts), max(1, len(_points(plan.sweep))), n_tasks, len(plan.jobs), len(plan.cached))
    results = list(plan.cached)
    if plan.jobs:
        connect(plan.cluster, temp_dir=os.path.join(str(cfg.paths.root), "ray"))
        results += run_jobs(plan.jobs, plan.model, plan.store, plan.cluster, progress=cfg.progress,
                            task_options=task_options)
    results.sort(key=lambda r: (r.point_id, r.concept))
    # validate + register every membrane (same bytes -> same version), log the run to the tracker
    from spm_train.registry import publish_results

    section = lambda name: OmegaConf.to_container(cfg[name], resolve=True)  # noqa: E731
    published = publish_results(
        results, concepts=plan.concepts, trainer=plan.trainer, model=plan.model, family=plan.family,
        base_fingerprint=plan.base_fingerprint, registry=_registry_section(cfg), tracking=section("tracking"),
        root=cfg.paths.root, run_dir=run_dir, run_name=f"{cfg.concepts.name}-{os.path.basename(run_dir)}",
        run_config={k: section(k) for k in ("model", "concepts", "trainer", "cluster", "sweep", "eval")})
    logger.info("registry %s: %d new version(s) of %d; W&B run %s", published.registry, len(published.new),
                len(published.versions), published.wandb_run_dir or "off")
    manifest = write_json(os.path.join(run_dir, "manifest.json"), {
        "concept_set": cfg.concepts.name,
        "model": plan.model, "family": plan.family, "base_fingerprint": plan.base_fingerprint,
        "trainer": plan.trainer.to_dict(), "sweep": plan.sweep,
        "results": [r.to_dict(with_history=False) for r in results],
        "publication": published.manifest_entry(),
    })
    report = _evaluate(cfg, plan, results, run_dir) if cfg.eval.enabled else None
    summary = RunSummary(results, run_dir, manifest, time.perf_counter() - start, plan,
                         registry=published.registry, wandb_run_dir=published.wandb_run_dir,
                         versions={k: v.ref for k, v in published.versions.items()}, report=report)
    _write_summary(summary)
    return summary


def _registry_section(cfg: DictConfig) -> dict:
    """The registry config; without an evaluator of its own the behavioural gate uses the eval config's."""
    from dataclasses import asdict

    from pipelines.evaluate import settings_from

    registry = OmegaConf.to_container(cfg.registry, resolve=True)
    if registry.get("evaluator") is None and cfg.eval.enabled and cfg.eval.kind in ("toyworld", "clip"):
        options = asdict(settings_from(cfg))
        if cfg.eval.kind == "clip":
            options["clip_path"] = cfg.eval.clip_path
        registry["evaluator"] = f"spm_train.registry.evaluators:{cfg.eval.kind}"
        registry["evaluator_options"] = {**options, **(registry.get("evaluator_options") or {})}
    return registry


def _evaluate(cfg: DictConfig, plan: RunPlan, results: list[ConceptResult], run_dir: str) -> str | None:
    """The evaluation report of the run's membranes, one per sweep point (report/<point>/report.md)."""
    from pipelines.evaluate import evaluation_stage
    from spm_train.membrane import load_membrane
    from spm_train.models import load_base_model

    by_point: dict[str, dict] = {}
    for r in results:
        if r.membrane:  # a membrane that failed its registry gates belongs in the report too
            by_point.setdefault(r.point_id, {})[r.concept] = load_membrane(r.membrane)
    if not by_point:
        return None
    pipe = load_base_model(plan.model["source"], dtype=plan.model["dtype"])
    paths = []
    for point, membranes in sorted(by_point.items()):
        out = os.path.join(run_dir, "report") if len(by_point) == 1 else os.path.join(run_dir, "report", point)
        concepts = [c for c in plan.concepts if c.name in membranes]
        _, path = evaluation_stage(cfg, pipe, plan.model["source"], concepts, membranes, out,
                                   title=f"{cfg.concepts.name}: {point}")
        paths.append(path)
    return paths[0] if len(paths) == 1 else os.path.join(run_dir, "report")


def _points(sweep: dict) -> list:
    from spm_train.bulk.plan import sweep_points

    return sweep_points(sweep)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def summary_rows(summary: RunSummary) -> list[list[str]]:
    rows = []
    for r in summary.results:
        where = summary.versions.get(r.key) or r.key[:12]
        rows.append([r.concept, r.point_id, r.status, _fmt(r.loss), _fmt(r.erase), _fmt(r.anchor),
                     r.error if r.error else where, f"{r.seconds:.1f}s"])
    return rows


# membrane paths are in manifest.json; the table names the registry version (or the result key)
HEADER = ["concept", "sweep point", "status", "loss", "erase", "anchor", "version / error", "wall"]


def _write_summary(summary: RunSummary) -> None:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(summary)]
    path = os.path.join(summary.run_dir, "summary.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def print_summary(summary: RunSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bulk run: {len(summary.results)} result(s), {len(summary.failed)} failed, "
                        f"{summary.seconds:.0f}s")
    for name in HEADER:
        table.add_column(name, overflow="fold")
    styles = {"failed": "red", "cached": "dim", "trained": "green"}
    for r, row in zip(summary.results, summary_rows(summary)):
        table.add_row(*row, style=styles.get(r.status))
    console = Console()
    console.print(table)
    console.print(f"manifest: {summary.manifest}")
    console.print(f"summary:  {os.path.join(summary.run_dir, 'summary.md')}")
    if summary.report:
        console.print(f"report:   {summary.report}")


FAILED_MARK = "FAILED"  # left in a multirun job's folder when the job failed


class FailedJobs(Callback):
    """Ends a multirun with exit status 1 when any of its jobs failed, after every job has run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sorted(glob.glob(os.path.join(str(config.hydra.sweep.dir), "*", FAILED_MARK)))
        if failed:
            logger.error("%d job(s) of this multirun failed: %s", len(failed),
                         ", ".join(os.path.dirname(f) for f in failed))
            sys.exit(1)


def _mark_failed(reason: str) -> None:
    with open(os.path.join(HydraConfig.get().runtime.output_dir, FAILED_MARK), "w") as fh:
        fh.write(reason + "\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # in a multirun (-m) a failed job is logged and marked, and the sweep goes on to the next one
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg)
    except SPMError as exc:
        logger.error("%s", exc)
        if not multirun:
            sys.exit(2)
        _mark_failed(str(exc))
        return
    except KeyboardInterrupt:
        logger.error("interrupted; the same command resumes: finished concepts are cached, packs restart "
                     "from their last checkpoint")
        sys.exit(130)
    print_summary(summary)
    if summary.failed:
        logger.error("%d concept(s) failed: %s", len(summary.failed), ", ".join(r.concept for r in summary.failed))
        if not multirun:
            sys.exit(1)
        _mark_failed(f"{len(summary.failed)} concept(s) failed")


if __name__ == "__main__":
    check_home()
    main()
