"""Turn a concept set, a trainer config and a sweep into packs of identical-trainer concepts."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..config import ConceptSpec, TrainerConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .runner import ClusterOptions


# concept fields a sweep may vary beside the trainer's: the erase strength g, the setting a concept's
# candidates most often differ in (docs/erasure.md)
CONCEPT_SWEEP_FIELDS = ("guidance_scale",)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_setup(cluster: ClusterOptions | None) -> dict[str, Any]:
    """The cluster settings that change a pack's weights; empty for one process without DeepSpeed.

    Data-parallel workers each draw their own trajectories and anchors, and a DeepSpeed engine
    optimizes in its own way, so either one trains other membranes than a single plain process.
    """
    if cluster is None:
        return {}
    setup: dict[str, Any] = {}
    if cluster.workers_per_job > 1:
        setup["workers_per_job"] = cluster.workers_per_job
    if cluster.deepspeed:
        setup["deepspeed"] = cluster.deepspeed
    return setup


def result_key(concept: ConceptSpec, trainer: TrainerConfig, base_fingerprint: str,
               setup: Mapping[str, Any] | None = None) -> str:
    """Identity of a trained membrane: same concept, trainer, base model and training setup -> same result.

    ``setup`` is ``training_setup(cluster)``; the default one (empty) leaves the key as it always was.
    """
    spec = concept.to_dict()
    spec.pop("trainer")  # already folded into ``trainer``
    spec.pop("nontarget")  # evaluation prompts do not change the weights
    spec.pop("probes")
    identity: dict[str, Any] = {"concept": spec, "trainer": trainer.fingerprint(), "base": base_fingerprint}
    if setup:
        identity["setup"] = dict(setup)
    return _hash(identity)


@dataclass
class Task:
    """One concept at one sweep point."""

    concept: ConceptSpec
    trainer: TrainerConfig
    point: dict[str, Any]
    point_id: str
    key: str


@dataclass
class Job:
    """One pack: concepts sharing a trainer config, trained together by one Ray task."""

    job_id: str
    trainer: TrainerConfig
    tasks: list[Task] = field(default_factory=list)

    @property
    def concepts(self) -> list[ConceptSpec]:
        return [t.concept for t in self.tasks]

    @property
    def names(self) -> list[str]:
        return [t.concept.name for t in self.tasks]

    def split(self) -> list["Job"]:
        """One job per concept (used to isolate a failing concept)."""
        return [Job(job_id=_hash([t.key, "single"]), trainer=self.trainer, tasks=[t]) for t in self.tasks]

    def part(self, tasks: Sequence[Task]) -> "Job":
        """A pack of some of this job's tasks, named by their keys like every pack.

        The name is also the pack's checkpoint folder, so a retried worker resumes a part only when
        it holds the same concepts.
        """
        return Job(job_id=_pack_id(tasks), trainer=self.trainer, tasks=list(tasks))


def _pack_id(tasks: Sequence[Task]) -> str:
    return _hash(sorted(t.key for t in tasks))


def sweep_points(sweep: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Cartesian product of ``{field: [values]}`` (trainer fields and ``CONCEPT_SWEEP_FIELDS``); one empty
    point without a sweep."""
    if not sweep:
        return [{}]
    keys = sorted(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(sweep[k]) for k in keys))]


def point_id(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


def expand(concepts: Sequence[ConceptSpec], trainer: TrainerConfig, sweep, base_fingerprint: str, *,
           cluster: ClusterOptions | None = None) -> list[Task]:
    """Every (concept, sweep point) with its effective trainer; all problems reported at once.

    Precedence: the set's trainer, then the concept's own overrides, then the sweep point. A sweep over a
    concept field (``guidance_scale``) sets it on every concept at that point.
    ``cluster`` is how the packs will train: data-parallel or DeepSpeed settings enter the result keys.
    """
    setup = training_setup(cluster)
    problems: list[str] = []
    if not concepts:
        problems.append("the concept set is empty")
    names = [c.name for c in concepts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"concept names must be unique, repeated: {dupes}")
    tasks, seen = [], set()
    for point in sweep_points(sweep):
        on_trainer = {k: v for k, v in point.items() if k not in CONCEPT_SWEEP_FIELDS}
        on_concept = {k: v for k, v in point.items() if k in CONCEPT_SWEEP_FIELDS}
        for concept in concepts:
            try:
                effective = trainer.replace(**concept.trainer).replace(**on_trainer)
                if on_concept:
                    concept = dataclasses.replace(concept, **on_concept)
            except ConfigError as exc:
                problems += [f"concept {concept.name!r} at {point_id(point)}: {p}" for p in exc.problems]
                continue
            key = result_key(concept, effective, base_fingerprint, setup)
            if key not in seen:  # two sweep points may give the same effective trainer
                seen.add(key)
                tasks.append(Task(concept, effective, dict(point), point_id(point), key))
    if problems:
        raise ConfigError("bulk run", sorted(set(problems), key=problems.index))
    return tasks


def pack(tasks: Sequence[Task], pack_size: int) -> list[Job]:
    """Group tasks with identical trainer configs into packs of at most ``pack_size`` concepts (a concept's
    candidates at several values of a concept field train in separate packs: a pack holds a name once)."""
    if pack_size < 1:
        raise ConfigError("bulk run", [f"pack_size must be >= 1, got {pack_size}"])
    groups: dict[tuple, list[Task]] = {}
    for task in tasks:
        on_concept = tuple((k, task.point[k]) for k in CONCEPT_SWEEP_FIELDS if k in task.point)
        groups.setdefault((task.trainer.fingerprint(), on_concept), []).append(task)
    jobs = []
    for group in groups.values():
        for i in range(0, len(group), pack_size):
            chunk = group[i:i + pack_size]
            jobs.append(Job(job_id=_pack_id(chunk), trainer=chunk[0].trainer, tasks=chunk))
    return jobs
