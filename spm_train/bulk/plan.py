"""Turn a concept set, a trainer config and a sweep into packs of identical-trainer concepts."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..config import ConceptSpec, TrainerConfig
from ..errors import ConfigError


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def result_key(concept: ConceptSpec, trainer: TrainerConfig, base_fingerprint: str) -> str:
    """Identity of a trained membrane: same concept, trainer and base model -> same result."""
    spec = concept.to_dict()
    spec.pop("trainer")  # already folded into ``trainer``
    spec.pop("nontarget")  # evaluation prompts do not change the weights
    spec.pop("probes")
    return _hash({"concept": spec, "trainer": trainer.fingerprint(), "base": base_fingerprint})


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


def sweep_points(sweep: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Cartesian product of ``{trainer_field: [values]}``; one empty point without a sweep."""
    if not sweep:
        return [{}]
    keys = sorted(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(sweep[k]) for k in keys))]


def point_id(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


def expand(concepts: Sequence[ConceptSpec], trainer: TrainerConfig, sweep, base_fingerprint: str) -> list[Task]:
    """Every (concept, sweep point) with its effective trainer; all problems reported at once.

    Precedence: the set's trainer, then the concept's own overrides, then the sweep point.
    """
    problems: list[str] = []
    if not concepts:
        problems.append("the concept set is empty")
    names = [c.name for c in concepts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"concept names must be unique, repeated: {dupes}")
    tasks, seen = [], set()
    for point in sweep_points(sweep):
        for concept in concepts:
            try:
                effective = trainer.replace(**concept.trainer).replace(**point)
            except ConfigError as exc:
                problems += [f"concept {concept.name!r} at {point_id(point)}: {p}" for p in exc.problems]
                continue
            key = result_key(concept, effective, base_fingerprint)
            if key not in seen:  # two sweep points may give the same effective trainer
                seen.add(key)
                tasks.append(Task(concept, effective, dict(point), point_id(point), key))
    if problems:
        raise ConfigError("bulk run", sorted(set(problems), key=problems.index))
    return tasks


def pack(tasks: Sequence[Task], pack_size: int) -> list[Job]:
    """Group tasks with identical trainer configs into packs of at most ``pack_size`` concepts."""
    if pack_size < 1:
        raise ConfigError("bulk run", [f"pack_size must be >= 1, got {pack_size}"])
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.trainer.fingerprint(), []).append(task)
    jobs = []
    for group in groups.values():
        for i in range(0, len(group), pack_size):
            chunk = group[i:i + pack_size]
            jobs.append(Job(job_id=_hash(sorted(t.key for t in chunk)), trainer=chunk[0].trainer, tasks=chunk))
    return jobs
