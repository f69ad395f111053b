"""One number per bulk run, for hyperparameter sweepers (Hydra's Optuna sweeper and the like).

A sweeper compares runs by the value their app returns. The objective is named in the config
(``objective=...``) and computed over every concept and sweep point of the run from what the run
measured: final training losses, and the evaluation metrics the registry's validation recorded.
A run with a failed concept, or without the metric the objective needs, gives NaN (the app then returns
nothing, which a sweeper records as a failed trial) instead of ranking an incomplete run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # what a sweeper should do with it: "maximize" or "minimize"
    needs_evaluation: bool
    describe: str
    per_concept: Callable[[Mapping[str, float]], float | None]


def _metric(name: str) -> Callable[[Mapping[str, float]], float | None]:
    return lambda m: m.get(name)


def _erasure_minus_drop(m: Mapping[str, float]) -> float | None:
    if m.get("erasure_rate") is None or m.get("preservation_drop") is None:
        return None
    return m["erasure_rate"] - m["preservation_drop"]


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("erasure_minus_drop", "maximize", True,
              "mean over concepts of the erasure rate minus the non-target accuracy drop", _erasure_minus_drop),
    Objective("erasure", "maximize", True, "mean erasure rate", _metric("erasure_rate")),
    Objective("target_drop", "maximize", True, "mean drop of the target's presence", _metric("target_drop")),
    Objective("preservation_drop", "minimize", True, "mean non-target accuracy drop",
              _metric("preservation_drop")),
    Objective("loss", "minimize", False, "mean final training loss (needs no evaluation)", _metric("loss")),
)}


def check_objective(name: str, *, evaluated: bool, sweeping: bool) -> list[str]:
    """Problems of ``objective=name``; one that needs evaluation is refused only in a sweep without any."""
    if name not in OBJECTIVES:
        known = ", ".join(f"{o.name} ({o.direction})" for o in OBJECTIVES.values())
        return [f"objective={name}: one of {known}"]
    if sweeping and OBJECTIVES[name].needs_evaluation and not evaluated:
        return [f"objective={name} needs evaluation metrics, and this sweep evaluates nothing: set eval=toyworld, "
                "eval.kind=clip or registry.evaluator, or sweep on objective=loss"]
    return []


def objective_value(name: str, rows: Sequence[Mapping[str, float] | None]) -> float:
    """The objective over a run's results: ``rows`` holds each result's measurements (None: it failed)."""
    objective = OBJECTIVES[name]
    values = []
    for row in rows:
        value = None if row is None else objective.per_concept(row)
        if value is None or not math.isfinite(value):
            return math.nan
        values.append(float(value))
    return sum(values) / len(values) if values else math.nan
