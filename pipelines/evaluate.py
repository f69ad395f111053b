"""Evaluate the membranes of a bulk run and write the report: a self-contained ``report.html`` (its
labelled grids inline), ``report.md`` with the grids under ``grids/``, and ``metrics.json``.

    python -m pipelines.evaluate                                   # the latest bulk run under $SPM_HOME
    python -m pipelines.evaluate manifest=runs/bulk/<time>/manifest.json eval.ablation=true

The report compares, per concept: facilitated transport on and off, latent anchoring on and off (with
``eval.ablation=true`` the concepts are also trained without anchoring), and all membranes together.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pipelines.console import quiet_console
from pipelines.schema import BulkTrainConfig, check_home, register
from spm_train.config import ConceptSpec, TrainerConfig
from spm_train.errors import ConfigError, SPMError

logger = logging.getLogger("pipelines.evaluate")

register()


@dataclass
class EvaluateConfig(BulkTrainConfig):
    # a bulk run's manifest.json; null: the newest one under ${paths.root}/bulk
    manifest: Optional[str] = None


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def settings_from(cfg: DictConfig):
    from spm_train.evaluate import EvalSettings

    e = cfg.eval
    return EvalSettings(samples_per_prompt=e.samples_per_prompt, steps=e.steps, guidance_scale=e.guidance_scale,
                        seed=e.seed, batch_size=e.batch_size, similarity=e.similarity, threshold=e.threshold,
                        draw_threshold=e.draw_threshold, grid_samples=e.grid_samples)


def scorer_from(cfg: DictConfig, source: str):
    from spm_train.evaluate import ClipScorer, ToyWorldScorer

    problems = _scorer_problems(cfg.eval)
    if problems:
        raise ConfigError("eval config", problems)
    return ToyWorldScorer() if cfg.eval.kind == "toyworld" else ClipScorer(path=cfg.eval.clip_path)


def _scorer_problems(e: DictConfig) -> list[str]:
    """Whether ``eval.kind`` names a scorer this project has, with what that scorer needs."""
    if e.kind == "toyworld":
        return []
    if e.kind != "clip":
        return [f"eval.kind={e.kind}: toyworld or clip (or eval=none to skip evaluation)"]
    if not e.clip_path:
        return ["eval.kind=clip needs eval.clip_path (a local CLIP model folder)"]
    return [] if os.path.isdir(str(e.clip_path)) else [f"eval.clip_path={e.clip_path}: no such folder"]


def _eval_number_problems(e: DictConfig) -> list[str]:
    """Finite numbers in range: NaN passes every comparison, so it would reach the sampler unnoticed."""
    from spm_train.config import number_problem

    limits = {"guidance_scale": 0, "threshold": 0, "samples_per_prompt": 1, "steps": 1, "batch_size": 1,
              "grid_samples": 0}
    problems = [number_problem(f"eval.{name}", e[name], minimum=least) for name, least in limits.items()]
    if not problems[1] and e.threshold >= 1:
        problems.append(f"eval.threshold must be < 1 (the calibrated cosine's zero point), got {e.threshold}")
    return [p for p in problems if p]


def check_eval_config(cfg: DictConfig, concepts: list[ConceptSpec], source: str | None = None) -> list[str]:
    """Every problem of the eval section that would otherwise surface after training (or after
    generating), for the base model ``source`` (default: the config's)."""
    from spm_train.transport import SIMILARITIES

    e = cfg.eval
    if not e.enabled:
        return []
    problems = []
    if e.similarity not in SIMILARITIES:
        problems.append(f"eval.similarity={e.similarity}: one of {', '.join(SIMILARITIES)}")
    problems += _eval_number_problems(e)
    problems += _scorer_problems(e)
    if e.kind == "toyworld":
        source = str(source or cfg.model.source)
        if not source.startswith("toyworld"):
            problems.append(f"eval=toyworld scores with the ToyWorld classifier, which only reads the ToyWorld "
                            f"model's images, but model.source is {source}; use eval=none, or eval.kind=clip "
                            "with eval.clip_path")
        else:
            from spm_train.evaluate import ToyWorldScorer

            scorer = ToyWorldScorer()
            for c in concepts:
                try:
                    scorer.concept_attribute(c)
                except ValueError as exc:
                    problems.append(str(exc))
    return problems


def train_ablations(pipe, concepts: list[ConceptSpec], trainer: TrainerConfig, store_root: str, fingerprint: str):
    """Each concept trained without latent anchoring (same trainer), cached in the result store."""
    from spm_train.bulk.plan import result_key
    from spm_train.bulk.store import ResultStore
    from spm_train.membrane import load_membrane
    from spm_train.training import train_membranes

    store = ResultStore(store_root)
    plain = [ConceptSpec(**{**c.to_dict(), "action": "erase"}) for c in concepts]
    keys = {c.name: result_key(c, trainer, fingerprint) for c in plain}
    missing = [c for c in plain if not store.has(keys[c.name])]
    if missing:
        from spm_train.bulk.store import ConceptResult

        result = train_membranes(pipe, missing, trainer, progress=True)
        for spec, membrane in zip(missing, result.membranes):
            store.put(ConceptResult(concept=spec.name, key=keys[spec.name], point={}, point_id="ablation",
                                    status="trained"), membrane)
    return {c.name: load_membrane(store.membrane_url(keys[c.name])) for c in plain}


def evaluation_stage(cfg: DictConfig, pipe, source: str, concepts: list[ConceptSpec], membranes: dict, out_dir: str,
                     ablations: dict | None = None, title: str | None = None) -> tuple[list, str]:
    """Score every membrane and write the report into ``out_dir``; returns (evaluations, report.html's path)."""
    from spm_train.evaluate import evaluate_set
    from spm_train.report import evaluation_report

    scorer = scorer_from(cfg, source)
    evaluations = evaluate_set(pipe, concepts, membranes, scorer, settings_from(cfg), ablations=ablations)
    notes = [("Setup", f"base model `{source}`; {cfg.eval.samples_per_prompt} samples per prompt, "
                       f"{cfg.eval.steps} DDIM steps, guidance {cfg.eval.guidance_scale}, seed {cfg.eval.seed}; "
                       f"transport similarity `{cfg.eval.similarity}`; scorer `{cfg.eval.kind}`.")]
    path = evaluation_report(out_dir, title or f"Membrane evaluation: {cfg.concepts.name}", evaluations, notes)
    from spm_train.bulk.store import write_json

    write_json(os.path.join(out_dir, "metrics.json"),
               [{**e.metrics(), "concept": e.concept, "equipped": e.equipped, "transport": e.transport,
                 "anchoring": e.anchoring} for e in evaluations])
    return evaluations, path


def _latest_manifest(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "bulk", "*", "manifest.json")))
    if not found:
        raise ConfigError("evaluate", [f"no bulk run under {root}/bulk; run python -m pipelines.bulk_train first"])
    return found[-1]


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise ConfigError("evaluate", [f"manifest {path} does not exist"]) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError("evaluate", [f"manifest {path} is not readable JSON ({exc})"]) from None
    required = ("model", "results", "trainer", "base_fingerprint", "concept_set")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ConfigError("evaluate", [f"{path} is not a bulk run's manifest (no {', '.join(missing)})"])
    return manifest


def run(cfg: DictConfig, out_dir: str) -> str:
    """Evaluate a bulk run's membranes: one report, or one per sweep point (``<out_dir>/<point>/``)."""
    from spm_train.membrane import load_membrane
    from spm_train.models import load_base_model

    manifest_path = cfg.manifest or _latest_manifest(cfg.paths.root)
    manifest = _read_manifest(manifest_path)
    source = manifest["model"]["source"]
    points: dict[str, dict] = {}  # point id -> {"point": ..., "membranes": {name: m}, "concepts": [...]}
    for row in manifest["results"]:
        if not row.get("membrane"):  # failed in training (a failed validation keeps its membrane)
            continue
        membrane = load_membrane(row["membrane"])
        spec = ConceptSpec(**json.loads(membrane.extra["concept"]))
        group = points.setdefault(row.get("point_id") or "default",
                                  {"point": row.get("point") or {}, "membranes": {}, "concepts": []})
        group["membranes"][spec.name] = membrane
        group["concepts"].append(spec)
    if not points:
        raise ConfigError("evaluate", [f"{manifest_path} lists no trained membrane"])
    concepts = [c for g in points.values() for c in g["concepts"]]
    problems = check_eval_config(cfg, concepts, source)
    if problems:
        raise ConfigError("eval config", problems)
    pipe = load_base_model(source, dtype=manifest["model"].get("dtype", "float32"))
    paths = []
    for point_id, group in sorted(points.items()):
        ablations = None
        if cfg.eval.ablation:  # each sweep point's own trainer, without anchoring
            trainer = TrainerConfig(**manifest["trainer"]).replace(**group["point"])
            ablations = train_ablations(pipe, group["concepts"], trainer, cfg.paths.store,
                                        manifest["base_fingerprint"])
        where = out_dir if len(points) == 1 else os.path.join(out_dir, point_id)
        os.makedirs(where, exist_ok=True)
        title = f"Membrane evaluation: {manifest['concept_set']}" + ("" if len(points) == 1 else f" ({point_id})")
        _, path = evaluation_stage(cfg, pipe, source, group["concepts"], group["membranes"], where, ablations,
                                   title=title)
        paths.append(path)
    return paths[0] if len(paths) == 1 else out_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    quiet_console(("transformers", "diffusers"))

    try:
        path = run(cfg, HydraConfig.get().runtime.output_dir)
    except SPMError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    print(f"report: {path}")


if __name__ == "__main__":
    check_home()
    main()
