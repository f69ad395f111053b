"""The bulk job's last stage: validate every trained (or cached) membrane, register it, log the run.

Plain function over plain values (no Hydra): ``pipelines.bulk_train`` passes its config sections as
dicts. Bytes already in the registry are not validated or registered again: the existing version
is reported (``new`` False).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..tracking import NullTracker, open_tracker
from .blobs import sha256_file
from .core import Registry, Version
from .validate import FAILED, Gates, load_evaluator, transfer_metrics, validate

logger = logging.getLogger(__name__)


@dataclass
class Publication:
    registry: str | None = None
    wandb_run_id: str | None = None
    wandb_run_dir: str | None = None
    versions: dict[str, Version] = field(default_factory=dict)  # result key -> version
    # registry.select=best: result key -> why it was not registered (another candidate of its concept won)
    unselected: dict[str, str] = field(default_factory=dict)

    @property
    def new(self) -> list[Version]:
        return [v for v in self.versions.values() if v.new]

    def manifest_entry(self) -> dict[str, Any]:
        return {"registry": self.registry, "wandb_run_id": self.wandb_run_id, "wandb_run_dir": self.wandb_run_dir,
                "unselected": dict(self.unselected),
                "versions": {k: {"ref": v.ref, "sha256": v.sha256, "status": v.status, "new": v.new,
                                 "aliases": v.aliases} for k, v in self.versions.items()}}


# Set by launch/submit.sh (and the image build, launch/Dockerfile): a submitted Ray job runs a copy of the
# checkout without its .git, so the launcher sends the code version along
CODE_VERSION_ENV = "SPM_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code version lineage records: ``$SPM_CODE_VERSION`` when a launcher set it, else ``git describe``
    of the checkout this package runs from (the full commit hash, ``-dirty`` with uncommitted changes),
    else the installed package version.

    The variable comes first: a submitted job's code is the shipped copy it names, even where the node
    also has a checkout of its own (a cluster's nodes may have one installed, at another commit).
    """
    shipped = os.environ.get(CODE_VERSION_ENV, "").strip()
    if shipped:
        return shipped
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        # the same command as launch/submit.sh, so a checkout and a submitted copy of it record the same string
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags", "--abbrev=40"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"spm-train=={version('spm-train')}"
    except Exception:
        return "unknown"


def publish_results(results: Sequence, *, concepts: Sequence, trainer, model: Mapping[str, Any], family: str,
                    base_fingerprint: str, registry: Mapping[str, Any], tracking: Mapping[str, Any], root: str,
                    run_config: Mapping[str, Any] | None = None, run_dir: str | None = None,
                    run_name: str | None = None, tracker: NullTracker | None = None) -> Publication:
    """Log ``results`` (``ConceptResult``s) to the tracker and register their membranes.

    ``tracker``: a run the caller opened (the bulk job opens it before training, to stream losses) and
    closes; without one, a run is opened from ``tracking`` here and finished at the end.
    """
    publication = Publication()
    opened = contextlib.nullcontext(tracker) if tracker is not None else \
        open_tracker(tracking, root=root, config=run_config, name=run_name)
    with opened as tracker:
        publication.wandb_run_id, publication.wandb_run_dir = tracker.run_id, tracker.run_dir
        for r in results:
            tracker.log_history(f"{r.concept}/{r.point_id}" if r.point else r.concept, r.history)
        if registry.get("enabled", True):
            publication.registry = str(registry["uri"])
            with Registry.open(registry["uri"], registry.get("blobs")) as reg:
                _register_all(reg, results, concepts, trainer, model, family, base_fingerprint, registry,
                              tracker, run_dir, publication)
        tracker.log_table("results", ["concept", "point", "status", "loss", "version", "validation"], [
            [r.concept, r.point_id, r.status, r.loss,
             publication.versions[r.key].ref if r.key in publication.versions else None,
             publication.versions[r.key].status if r.key in publication.versions else None] for r in results])
    return publication


def _register_all(reg: Registry, results, concepts, trainer, model, family, fingerprint, cfg, tracker: NullTracker,
                  run_dir, publication: Publication) -> None:
    specs = {c.name: c for c in concepts}
    evaluator = load_evaluator(cfg.get("evaluator"), cfg.get("evaluator_options"))
    base = _LazyBase(model)
    others = {src: _LazyBase({"source": src, "dtype": model.get("dtype", "float32")})
              for src in (cfg.get("transfer_models") or []) if evaluator is not None}
    transfer = {src: (lambda lazy=lazy: lazy.pipe) for src, lazy in others.items()}
    candidate = cfg.get("candidate_alias")
    checked = {}  # result key -> (version already registered, or None; membrane; validation report)
    for r in results:
        if not r.membrane:  # training failed (a failed validation keeps its membrane and is looked up again)
            continue
        version = reg.find(r.concept, sha256_file(r.membrane))
        if version is not None:
            checked[r.key] = (version, None, None)
            continue
        pipe = base.pipe if evaluator is not None else None
        unet = pipe.unet if pipe is not None else base.skeleton_unet()
        membrane, report = validate(r.membrane, unet=unet, family=family, base_fingerprint=fingerprint,
                                    evaluator=evaluator, pipe=pipe, concept_spec=specs.get(r.concept),
                                    gates=registry_gates(cfg, r.concept), transfer=transfer)
        checked[r.key] = (None, membrane, report)
    if cfg.get("select", "all") == "best":
        publication.unselected.update(select_best(results, checked))
    for r in results:
        if r.key not in checked or r.key in publication.unselected:
            continue
        version, membrane, report = checked[r.key]
        if version is None:
            trainer_dict = membrane.trainer if membrane is not None else {}
            lineage = {
                "base_model": model.get("source"), "base_model_id": hub_id_of(model),
                "base_license": model.get("license"), "base_fingerprint": fingerprint, "family": family,
                "config_hash": r.key, "trainer_fingerprint": _trainer_fingerprint(trainer, r.point),
                "code_version": code_version(), "seed": trainer_dict.get("seed", getattr(trainer, "seed", None)),
                "sweep_point": dict(r.point), "sweep_point_id": r.point_id, "wandb_run_id": tracker.run_id,
                "wandb_project": None if tracker.run_id is None else getattr(tracker.run, "project", None),
                # where the artifact went, so later alias changes reach it (pipelines.registry promote)
                "wandb_entity": None if tracker.run_id is None else getattr(tracker.run, "entity", None),
                "wandb_mode": None if tracker.run_id is None else ("offline" if tracker.offline else "online"),
                "run_dir": run_dir, "result_key": r.key, "job_id": r.job_id, "node": r.node,
                "trained_seconds": r.seconds, "pack_concepts": r.pack_concepts, "source_file": r.membrane,
            }
            metrics = {k: v for k, v in (("loss", r.loss), ("erase", r.erase), ("anchor", r.anchor)) if v is not None}
            aliases = (candidate,) if candidate and report.status != "failed" else ()
            version = reg.register(r.membrane, concept=r.concept, validation=report, lineage=lineage,
                                   metrics=metrics, aliases=aliases)
            if report.metrics:
                r.metrics.update(report.metrics)
        else:
            logger.info("%s already registered as %s", r.membrane, version.ref)
            reg.restore_blob(version, _read_bytes(r.membrane))  # repairs (and reports) a missing or altered blob
        if version.status == FAILED:  # the summary and the exit code count it as failed
            reasons = "; ".join(version.validation.get("reasons", [])) or "validation failed"
            r.status, r.error = "failed", f"registered as {version.ref}, which failed validation: {reasons}"
            logger.error("%s: %s", r.concept, r.error)
        publication.versions[r.key] = version
        tracker.log_metrics({**version.metrics, "validation_passed": float(version.status == "passed")},
                            prefix=f"eval/{r.concept}/{r.point_id}")
        if version.new:  # logging known bytes again would move W&B's own `latest` back to an old version
            tracker.log_membrane(version, reg.blobs.url_of(version.sha256))
    base.close()
    for lazy in others.values():
        lazy.close()


def candidate_score(report) -> tuple:
    """Order of a concept's candidates: passed before not evaluated before failed, then the larger target
    drop minus preservation drop (the erasure it buys net of what it costs), on the worst of the base and
    the transfer models it was validated on."""
    rank = {"passed": 0, "not_evaluated": 1}.get(report.status, 2)
    models = transfer_metrics(report.metrics)
    nets = [m.get("target_drop", m.get("erasure_rate", 0.0)) - m.get("preservation_drop", 0.0)
            for name, m in models.items() if not name or m.get("drawable") != 0]  # nothing to erase there
    net = min(nets)
    return (rank, -net if math.isfinite(net) else math.inf)


def select_best(results: Sequence, checked: Mapping[str, tuple]) -> dict[str, str]:
    """``registry.select=best``: per concept, keep the best candidate (``candidate_score``) of its sweep
    points; returns the other candidates' keys with the reason. A concept already registered from one
    of its candidates keeps that version as a candidate like any other, scored by its stored validation."""
    by_concept: dict[str, list] = {}
    for r in results:
        if r.key in checked:
            by_concept.setdefault(r.concept, []).append(r)
    dropped = {}
    for concept, candidates in by_concept.items():
        if len(candidates) < 2:
            continue

        def score(r):
            version, _, report = checked[r.key]
            if report is None:
                from .validate import ValidationReport

                report = ValidationReport(behavioural=version.status, metrics=dict(version.metrics))
            return candidate_score(report)

        best = min(candidates, key=score)
        for r in candidates:
            if r is not best:
                dropped[r.key] = f"{concept}: sweep point {best.point_id} scored better than {r.point_id}"
        logger.info("%s: selected sweep point %s of %d candidates", concept, best.point_id, len(candidates))
    return dropped


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_of(model: Mapping[str, Any]) -> str | None:
    """The base model's Hugging Face Hub id: ``model.hub_id``, else a source that is one (not a folder here)."""
    if model.get("hub_id"):
        return str(model["hub_id"])
    source = str(model.get("source") or "")
    return source if _HUB_ID.fullmatch(source) and not os.path.exists(source) else None


def _read_bytes(url: str) -> bytes:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def registry_gates(cfg: Mapping[str, Any], concept: str) -> Gates:
    """The gates of ``concept`` from a registry config section (defaults, then ``gates[concept]``)."""
    return Gates.for_concept(concept, cfg.get("min_erasure", 0.0), cfg.get("max_preservation_drop", 1.0),
                             cfg.get("gates"), min_target_drop=cfg.get("min_target_drop", 0.0))


def check_registry_config(cfg: Mapping[str, Any], concepts: Sequence[str]) -> list[str]:
    """Every problem of a registry config section that would otherwise surface after training."""
    from ..errors import ConfigError
    from .core import ALIAS_RULE, LATEST, PROTECTED_ALIASES, is_protected, valid_alias

    problems = []
    gates = cfg.get("gates") or {}
    if not isinstance(gates, Mapping):
        return ["registry.gates must map concept names to gates"]
    unknown = sorted(set(gates) - set(concepts))
    if unknown:
        problems.append(f"registry.gates names concept(s) not in the concept set: {', '.join(map(str, unknown))}")
    for concept in concepts:
        try:
            g = registry_gates(cfg, concept)
        except ConfigError as exc:
            problems += exc.problems
            continue
        except (TypeError, ValueError) as exc:
            problems.append(f"registry gates of {concept!r}: {exc}")
            continue
        for name in ("min_erasure", "max_preservation_drop", "min_target_drop"):
            value = getattr(g, name)
            if not (math.isfinite(value) and -1.0 <= value <= 1.0):
                problems.append(f"registry gate {name} of {concept!r} is {value}; rates and drops lie in [-1, 1]")
    if cfg.get("select", "all") not in ("all", "best"):
        problems.append(f"registry.select={cfg.get('select')}: all (every sweep point) or best (per concept)")
    alias = cfg.get("candidate_alias")
    if alias:
        if alias == LATEST or is_protected(alias):
            problems.append(f"registry.candidate_alias={alias}: '{LATEST}' moves by itself and "
                            f"{'/'.join(PROTECTED_ALIASES)} is set by promotion only; pick another name")
        elif not valid_alias(alias):
            problems.append(f"registry.candidate_alias={alias}: {ALIAS_RULE}")
    try:
        evaluator = load_evaluator(cfg.get("evaluator"), cfg.get("evaluator_options"))
    except ConfigError as exc:
        problems += exc.problems
        evaluator = False
    transfer = cfg.get("transfer_models") or []
    if not isinstance(transfer, Sequence) or isinstance(transfer, str) or not all(
            isinstance(t, str) and t.strip() for t in transfer):
        problems.append(f"registry.transfer_models must be a list of model sources, got {transfer!r}")
    else:
        repeated = sorted({t for t in transfer if list(transfer).count(t) > 1})
        if repeated:
            problems.append(f"registry.transfer_models lists {', '.join(repeated)} more than once")
        if transfer and evaluator is None:
            problems.append("registry.transfer_models need an evaluator (registry.evaluator, or eval.enabled "
                            "in a bulk run): transfer is measured behaviour")
    return problems


def _trainer_fingerprint(trainer, point: Mapping[str, Any]) -> str | None:
    try:
        return trainer.replace(**dict(point)).fingerprint() if point else trainer.fingerprint()
    except Exception:
        return None


class _LazyBase:
    """The base pipeline, loaded on first use only (cached re-runs need none)."""

    def __init__(self, model: Mapping[str, Any]):
        self.model = model
        self._pipe = None
        self._skeleton = None

    @property
    def pipe(self):
        if self._pipe is None:
            from ..models import load_base_model

            self._pipe = load_base_model(self.model["source"], dtype=self.model.get("dtype", "float32"))
        return self._pipe

    def skeleton_unet(self):
        """The base UNet's modules without weights (meta device) when the base is a local diffusers folder:
        the structural check needs layer names and shapes only, not gigabytes of weights on the driver."""
        if self._pipe is None and self._skeleton is None:
            self._skeleton = _meta_unet(self.model["source"])
        if self._skeleton is not None:
            return self._skeleton
        return self.pipe.unet

    def close(self) -> None:
        self._pipe = None
        self._skeleton = None


def _meta_unet(source: str):
    config = os.path.join(str(source), "unet", "config.json")
    if not os.path.isfile(config):
        return None
    try:
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.dirname(config)))
    except Exception as exc:  # fall back to loading the model
        logger.warning("could not build the UNet of %s without weights (%s); loading it", source, exc)
        return None
