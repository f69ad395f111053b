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
import math
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

from pipelines.console import quiet_console
from pipelines.help import register_help
from pipelines.schema import check_home, register
from spm_train import parallel
from spm_train.bulk.objective import OBJECTIVES, check_objective, objective_value
from spm_train.bulk.plan import Job, expand, pack
from spm_train.bulk.runner import ClusterOptions, check_reachable, connect, run_jobs
from spm_train.bulk.store import ConceptResult, ResultStore, write_json
from spm_train.config import ConceptSpec, TrainerConfig, number_problem
from spm_train.errors import ConfigError, SPMError
from spm_train.io import folder_problem

logger = logging.getLogger("pipelines.bulk_train")

register()
register_help()


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
    report: str | None = None  # the evaluation report (report.html, report.md beside it), when eval.enabled
    objective: str = "loss"  # the config's objective, and its value over this run (NaN: incomplete)
    objective_value: float = math.nan
    sweep_label: str | None = None  # this run's point in a multirun (its overrides)
    # mean erasure rate and non-target accuracy drop over the run (NaN: not evaluated), for the sweep's plot
    measures: dict[str, float] = field(default_factory=dict)

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


def _check_transfer_models(cfg: DictConfig, model: dict[str, Any], family: str) -> None:
    """Each of ``registry.transfer_models`` is a model of the base's family, before any job starts."""
    from spm_train.errors import ModelLoadError
    from spm_train.models import source_family

    if not _validates_behaviour(cfg):
        return
    problems = []
    for source in cfg.registry.get("transfer_models") or []:
        try:  # a local folder's configs name its family: the registry stage loads its weights, once
            other = source_family(source, dtype=model["dtype"])
        except (ModelLoadError, OSError, ValueError) as exc:
            problems.append(f"registry.transfer_models: {source!r} does not load: {exc}")
            continue
        if other != family:
            problems.append(f"registry.transfer_models: {source!r} is a {other} model, the base is {family}")
    if problems:
        raise ConfigError("bulk run", problems)


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
    if data.get("deepspeed") and not parallel.deepspeed_available():
        problems.append(f"cluster.deepspeed={data['deepspeed']}: {parallel.DEEPSPEED_MISSING}")
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
    _check_transfer_models(cfg, model, family)
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
    # (setting, folder, whether it may be a URL): the result store and the blobs may; run folders and the
    # SQLite index not. An object store's filesystem package is checked here, before the model loads.
    registry_on = cfg.registry.enabled
    for name, folder, url_ok in (("paths.root", cfg.paths.root, False), ("paths.store", cfg.paths.store, True),
                                 ("registry.uri", cfg.registry.uri if registry_on else None, False),
                                 ("registry.blobs", cfg.registry.blobs if registry_on else None, True)):
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
    problems += check_objective(cfg.objective, evaluated=_validates_behaviour(cfg), sweeping=_multirun())
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


def train(cfg: DictConfig, *, run_dir: str | None = None, sweep_label: str | None = None,
          task_options: Callable[[Job], dict] | None = None) -> RunSummary:
    """Plan, schedule, gather, summarise. ``task_options`` adds Ray options per job (tests pin nodes).

    ``sweep_label`` names this run's point of an outer sweep (a Hydra multirun job's overrides): it
    prefixes the sweep point of every result, so the summary, registry lineage and W&B tell them apart.
    """
    from spm_train.tracking import open_tracker

    start = time.perf_counter()
    plan = plan_run(cfg)
    if sweep_label:
        _label_points(plan, sweep_label)
    run_dir = run_dir or cfg.paths.run_dir
    os.makedirs(run_dir, exist_ok=True)
    section = lambda name: OmegaConf.to_container(cfg[name], resolve=True)  # noqa: E731
    # the W&B run opens once the config is valid, before training: losses stream into it as packs train
    name = f"{cfg.concepts.name}-{os.path.basename(run_dir)}"
    config = {k: section(k) for k in ("model", "concepts", "trainer", "cluster", "sweep", "eval")}
    config["objective"] = cfg.objective
    with open_tracker(section("tracking"), root=cfg.paths.root, name=name, config=config) as tracker:
        return _run(cfg, plan, run_dir, tracker, start, task_options, sweep_label)


def _run(cfg: DictConfig, plan: RunPlan, run_dir: str, tracker, start: float,
         task_options: Callable[[Job], dict] | None, sweep_label: str | None) -> RunSummary:
    n_tasks = sum(len(j.tasks) for j in plan.jobs)
    logger.info("%d concept(s) x %d sweep point(s): %d to train in %d pack(s), %d already trained",
                len(plan.concepts), max(1, len(_points(plan.sweep))), n_tasks, len(plan.jobs), len(plan.cached))
    results = list(plan.cached)
    if plan.jobs:
        connect(plan.cluster, temp_dir=os.path.join(str(cfg.paths.root), "ray"))
        results += run_jobs(plan.jobs, plan.model, plan.store, plan.cluster, progress=cfg.progress,
                            task_options=task_options, on_rows=tracker.stream)
    results.sort(key=lambda r: (r.point_id, r.concept))
    # validate + register every membrane (same bytes -> same version), log the run to the tracker
    from spm_train.registry import code_version, publish_results

    section = lambda name: OmegaConf.to_container(cfg[name], resolve=True)  # noqa: E731
    published = publish_results(
        results, concepts=plan.concepts, trainer=plan.trainer, model=plan.model, family=plan.family,
        base_fingerprint=plan.base_fingerprint, registry=_registry_section(cfg), tracking=section("tracking"),
        root=cfg.paths.root, run_dir=run_dir, tracker=tracker)
    logger.info("registry %s: %d new version(s) of %d; W&B run %s", published.registry, len(published.new),
                len(published.versions), published.wandb_run_dir or "off")
    manifest = write_json(os.path.join(run_dir, "manifest.json"), {
        "concept_set": cfg.concepts.name,
        "model": plan.model, "family": plan.family, "base_fingerprint": plan.base_fingerprint,
        "trainer": plan.trainer.to_dict(), "sweep": plan.sweep,
        "results": [r.to_dict(with_history=False) for r in results],
        "publication": published.manifest_entry(),
        "code_version": code_version(),
    })
    report = _evaluate(cfg, plan, results, run_dir) if cfg.eval.enabled else None
    if report:
        _log_report(tracker, os.path.dirname(report) if os.path.isfile(report) else report)
    summary = RunSummary(results, run_dir, manifest, time.perf_counter() - start, plan,
                         registry=published.registry, wandb_run_dir=published.wandb_run_dir,
                         versions={k: v.ref for k, v in published.versions.items()}, report=report,
                         objective=cfg.objective, objective_value=_objective(cfg.objective, results, published),
                         sweep_label=sweep_label,
                         measures={m: _objective(m, results, published) for m in PLOTTED})
    _write_summary(summary)
    return summary


def _log_report(tracker, report_dir: str) -> None:
    """The report's before/after grids as images and its metrics as a table, in the run's W&B run."""
    import json

    for metrics_file in sorted(glob.glob(os.path.join(report_dir, "**", "metrics.json"), recursive=True)):
        point = os.path.relpath(os.path.dirname(metrics_file), report_dir)
        suffix = "" if point == "." else f"/{point}"
        grids = sorted(glob.glob(os.path.join(os.path.dirname(metrics_file), "grids", "*.png")))
        tracker.log_images(f"eval/grids{suffix}", [(os.path.basename(g)[:-4], g) for g in grids])
        with open(metrics_file) as fh:
            rows = json.load(fh)
        if rows:
            columns = sorted({k for row in rows for k in row})
            tracker.log_table(f"eval/metrics{suffix}", columns, [[row.get(c) for c in columns] for row in rows])


def _label_points(plan: RunPlan, label: str) -> None:
    """Prefix every sweep point of ``plan`` with ``label`` (labels only: result keys are unchanged)."""
    for task in [t for job in plan.jobs for t in job.tasks]:
        task.point_id = label if task.point_id == "default" else f"{label},{task.point_id}"
    for result in plan.cached:
        result.point_id = label if result.point_id == "default" else f"{label},{result.point_id}"


def _objective(name: str, results: list[ConceptResult], published) -> float:
    """The config's objective over the run, from final losses and the registry validation's metrics."""
    rows = []
    for r in results:
        if r.status == "failed":
            rows.append(None)
            continue
        version = published.versions.get(r.key)
        recorded = (version.validation or {}).get("metrics", {}) if version is not None else {}
        rows.append({"loss": r.loss, "erase": r.erase, "anchor": r.anchor, **recorded, **r.metrics})
    return objective_value(name, rows)


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _validates_behaviour(cfg: DictConfig) -> bool:
    """Whether the registry stage runs an evaluator (its own, or the eval config's)."""
    return bool(cfg.registry.enabled and _registry_section(cfg).get("evaluator"))


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
    """The evaluation report of the run's membranes, one per sweep point (report/<point>/report.html)."""
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
        cost = "-" if r.status == "failed" else f"{r.cost_seconds:.1f}"
        rows.append([r.concept, r.point_id, r.status, _fmt(r.loss), _fmt(r.erase), _fmt(r.anchor),
                     r.error if r.error else where, cost])
    return rows


# membrane paths are in manifest.json; the table names the registry version (or the result key).
# "s / concept": the training pack's wall time over the concepts it trained together (a cached row shows
# what it cost when it was trained)
HEADER = ["concept", "sweep point", "status", "loss", "erase", "anchor", "version / error", "s / concept"]


def objective_line(summary: RunSummary) -> str:
    objective = OBJECTIVES[summary.objective]
    value = "n/a (a concept failed or was not evaluated)" if math.isnan(summary.objective_value) \
        else f"{summary.objective_value:.4g}"
    return f"objective {objective.name} = {value} ({objective.direction}: {objective.describe})"


def _write_summary(summary: RunSummary) -> None:
    from spm_train.io import atomic_output

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(summary)]
    lines += ["", objective_line(summary)]
    with atomic_output(os.path.join(summary.run_dir, "summary.md")) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    value = None if math.isnan(summary.objective_value) else summary.objective_value
    measures = {k: None if math.isnan(v) else v for k, v in summary.measures.items()}
    write_json(os.path.join(summary.run_dir, OBJECTIVE_FILE), {
        "objective": summary.objective, "direction": OBJECTIVES[summary.objective].direction, "value": value,
        "point": summary.sweep_label or "default", "results": len(summary.results), "failed": len(summary.failed),
        **measures})


def print_summary(summary: RunSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title_justify="left", title=f"bulk run: {len(summary.results)} result(s), {len(summary.failed)} failed, "
                        f"{summary.seconds:.0f}s")
    for name in HEADER:
        # only an error message may wrap: a number or a name cut in two reads as two values
        table.add_column(name, no_wrap=name != "version / error", overflow="fold")
    styles = {"failed": "red", "cached": "dim", "trained": "green"}
    for r, row in zip(summary.results, summary_rows(summary)):
        table.add_row(*row, style=styles.get(r.status))
    console = Console()
    if not console.is_terminal:
        # a log file or a pipe has no width: rich assumes 80 columns and would wrap the cells
        # (an error message longer than that still folds inside its own cell)
        wanted = console.measure(table, options=console.options.update_width(240)).maximum
        console = Console(width=max(console.width, wanted))
    console.print(table)
    # soft_wrap: a line is never broken at the console's width, so a path stays one piece in a log
    console.print(objective_line(summary), soft_wrap=True)
    console.print(f"manifest: {summary.manifest}", soft_wrap=True)
    console.print(f"summary:  {os.path.join(summary.run_dir, 'summary.md')}", soft_wrap=True)
    if summary.report:
        console.print(f"report:   {summary.report}", soft_wrap=True)


FAILED_MARK = "FAILED"  # left in a multirun job's folder when the job failed
OBJECTIVE_FILE = "objective.json"  # each run's objective, read back when its multirun ends
PLOTTED = ("erasure", "preservation_drop")  # objectives kept beside the run's own, for the sweep's plot


class SweepEnd(Callback):
    """At the end of a multirun: one table and one plot comparing its jobs (``comparison.md`` and
    ``comparison.png`` in the sweep folder), then exit status 1 when any job failed, after every job has run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            import optuna

            # imported before the sweeper loads it, so Optuna keeps this level: its study notices repeat
            # what Hydra's sweeper logs
            optuna.logging.set_verbosity(optuna.logging.WARNING)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        if os.path.isdir(sweep_dir):
            path = write_comparison(sweep_dir)
            logger.info("the sweep's jobs compared: %s", path)
        failed = sorted(glob.glob(os.path.join(sweep_dir, "*", FAILED_MARK)))
        if failed:
            logger.error("%d job(s) of this multirun failed: %s", len(failed),
                         ", ".join(os.path.dirname(f) for f in failed))
            sys.exit(1)


def write_comparison(sweep_dir: str) -> str:
    """``<sweep_dir>/comparison.md``: every job of a multirun, best objective first, failed jobs last; and
    ``comparison.png`` beside it (see ``plot_comparison``), linked from the table."""
    import json

    from spm_train.io import atomic_output

    rows, direction, name, measured = [], "maximize", "objective", {}
    for job_dir in sorted(glob.glob(os.path.join(sweep_dir, "*")), key=lambda d: (len(d), d)):
        if os.path.isfile(os.path.join(job_dir, OBJECTIVE_FILE)):
            with open(os.path.join(job_dir, OBJECTIVE_FILE)) as fh:
                data = json.load(fh)
            direction, name = data["direction"], data["objective"]
            note = f"{data['failed']} of {data['results']} failed" if data["failed"] else ""
            rows.append((os.path.basename(job_dir), data["point"], data["value"], note))
            measured[data["point"]] = (data.get("preservation_drop"), data.get("erasure"), data["value"])
        elif os.path.isfile(os.path.join(job_dir, FAILED_MARK)):  # failed before it had a summary
            with open(os.path.join(job_dir, FAILED_MARK)) as fh:
                point, _, reason = fh.read().strip().partition("\n")
            rows.append((os.path.basename(job_dir), point or "-", None,
                         "failed: " + " ".join(reason.split())[:200]))  # one table row, even for a long error
    sign = -1 if direction == "maximize" else 1
    rows.sort(key=lambda r: (r[2] is None, sign * r[2] if r[2] is not None else 0))
    lines = [f"# Sweep: jobs by {name} ({direction})", "", f"| job | sweep point | {name} | note |", "|---|---|---|---|"]
    lines += [f"| {job} | {point} | {'n/a' if value is None else f'{value:.4g}'} | {note} |"
              for job, point, value, note in rows]
    plot = plot_comparison(measured, os.path.join(sweep_dir, "comparison.png"), objective=name, direction=direction)
    if plot:
        lines += ["", f"![the jobs compared]({os.path.basename(plot)})"]
    path = os.path.join(sweep_dir, "comparison.md")
    with atomic_output(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return path


def plot_comparison(measured: dict[str, tuple], url: str, *, objective: str, direction: str) -> str | None:
    """The sweep points as a picture, each labelled by its point: the share of probe images still showing the
    concept (1 - erasure) against the non-target accuracy drop, Pareto front in red, when every finished job
    was evaluated; otherwise the objective per point, the best in red. None when no job has a number."""
    from spm_train.report import pareto_plot, scatter_plot

    if measured and all(d is not None and e is not None for d, e, _ in measured.values()):
        points = {point: (d, 1 - e) for point, (d, e, _) in measured.items()}
        return pareto_plot(points, url, x_label="mean non-target accuracy drop",
                           y_label="mean share of probe images still showing the concept (1 - erasure)")
    valued = {point: v for point, (_, _, v) in measured.items() if v is not None}
    if not valued:
        return None
    best = (max if direction == "maximize" else min)(valued, key=valued.get)
    points = {point: (i + 1, v) for i, (point, v) in enumerate(valued.items())}
    return scatter_plot(points, url, x_label="job (in run order)", y_label=f"{objective} ({direction})", highlight=[best])


def _mark_failed(reason: str) -> None:
    """The FAILED mark: the job's sweep point on its first line, then why it failed."""
    with open(os.path.join(HydraConfig.get().runtime.output_dir, FAILED_MARK), "w") as fh:
        fh.write(f"{_job_label()}\n{reason}\n")


def _job_label() -> str:
    """A multirun job's name: its overrides as Hydra writes them (hydra.job.override_dirname)."""
    job = HydraConfig.get().job
    return (job.override_dirname or f"job{job.num}").replace("/", "_")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's objective (``objective=...``), which sweepers such as Optuna compare.

    None for a failed or incomplete run: Optuna's sweeper records that trial as failed and goes on (a NaN
    would stop the whole study: its sweeper reports the rejected value back in a way Optuna refuses).
    """
    quiet_console()
    # in a multirun (-m) a failed job is logged and marked, and the sweep goes on to the next one
    multirun = _multirun()
    try:
        summary = train(cfg, sweep_label=_job_label() if multirun else None)
    except SPMError as exc:
        logger.error("%s", exc)
        if not multirun:
            sys.exit(2)
        _mark_failed(str(exc))
        return None
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
    return None if math.isnan(summary.objective_value) else summary.objective_value


if __name__ == "__main__":
    check_home()
    main()
