"""Validation before registration: structure of the artifact, then (optionally) its behaviour.

Structural checks need no evaluation: the file loads, its metadata is complete, its layers fit the
base family's membrane layout, every value is finite. Behavioural checks call a pluggable evaluator

    evaluate(pipe, membrane, concept_spec) -> {"erasure_rate": ..., "preservation_drop": ..., ...}

and compare its numbers with gates. Without an evaluator the behavioural result is recorded as
``not_evaluated``: a version is never marked as passed on a check that did not run. With transfer models
(other models of the family the membrane is meant for), the same evaluator and gates run on each of them
too, and the behaviour passes only where every model passes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol

from ..errors import ConfigError, IncompatibleMembraneError, MembraneFormatError
from ..membrane import (FORMAT_VERSION, OFFICIAL_SOURCE, Membrane, MembraneBank, layout_id, load_membrane,
                        validate_weights)

logger = logging.getLogger(__name__)

PASSED, FAILED, NOT_EVALUATED = "passed", "failed", "not_evaluated"
TRANSFER_PREFIX = "transfer"  # a transfer model's metrics: transfer/<model>/<metric>
UNDRAWN = "undrawn"  # a transfer model that draws the concept on none of the probes


class Evaluator(Protocol):
    def __call__(self, pipe, membrane: Membrane, concept_spec) -> dict[str, float]: ...


@dataclass(frozen=True)
class Gates:
    """Thresholds of the behavioural check: erasure rate (share of target probes where the concept is
    gone) at least ``min_erasure``, target drop (how much the membrane lowered the concept's presence,
    before minus after) at least ``min_target_drop``, preservation drop at most ``max_preservation_drop``.
    The erasure rate alone passes a concept the base model barely draws; the target drop does not."""

    min_erasure: float = 0.0
    max_preservation_drop: float = 1.0
    min_target_drop: float = 0.0

    @classmethod
    def for_concept(cls, concept: str, min_erasure: float = 0.0, max_preservation_drop: float = 1.0,
                    overrides: Mapping[str, Mapping[str, float]] | None = None,
                    min_target_drop: float = 0.0) -> "Gates":
        """The concept set's gates, with ``overrides[concept]`` (from ``registry.gates``) on top."""
        values = {"min_erasure": float(min_erasure), "max_preservation_drop": float(max_preservation_drop),
                  "min_target_drop": float(min_target_drop)}
        extra = dict((overrides or {}).get(concept, {}))
        unknown = sorted(set(extra) - set(values))
        if unknown:
            raise ConfigError(f"gates of concept {concept!r}",
                              [f"unknown gate {k!r}; known: {', '.join(values)}" for k in unknown])
        values.update({k: float(v) for k, v in extra.items()})
        return cls(**values)


@dataclass
class ValidationReport:
    structural: str = PASSED
    behavioural: str = NOT_EVALUATED
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    gates: dict[str, float] = field(default_factory=dict)
    # transfer model -> its behavioural result (its metrics are under "transfer/<model>/<metric>")
    transfer: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``failed`` if any check failed, ``passed`` if every check ran and passed, else ``not_evaluated``."""
        if FAILED in (self.structural, self.behavioural):
            return FAILED
        return PASSED if self.behavioural == PASSED else NOT_EVALUATED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ValidationReport":
        data = dict(data)
        data.pop("status", None)
        return cls(**data)


def check_structure(source: str | Membrane, *, unet=None, family: str | None = None,
                    base_fingerprint: str | None = None) -> tuple[Membrane | None, list[str]]:
    """Load (if a path) and check a membrane; returns it (None if unreadable) and every problem found."""
    reasons: list[str] = []
    if isinstance(source, Membrane):
        membrane = source
        try:
            validate_weights(membrane.weights, membrane.rank, where=membrane.name)
        except MembraneFormatError as exc:
            reasons.append(f"weights: {exc}")
    else:
        try:
            membrane = load_membrane(source)  # checks format, required metadata, shapes vs rank, finiteness
        except MembraneFormatError as exc:
            return None, [f"unreadable: {exc}"]
    reasons += _metadata_problems(membrane)
    if family and membrane.family != family:
        reasons.append(f"family: membrane is {membrane.family}, base model is {family}")
    if base_fingerprint and membrane.base_fingerprint != base_fingerprint:
        reasons.append(f"base fingerprint: membrane was trained on {membrane.base_fingerprint}, "
                       f"expected {base_fingerprint}")
    if unet is not None:
        reasons += _layout_problems(membrane, unet)
    return membrane, reasons


def _metadata_problems(m: Membrane) -> list[str]:
    problems = []
    if not m.concepts:
        problems.append("metadata: no concepts")
    if not m.family or m.family == "unknown":
        problems.append("metadata: family unknown")
    # the official code records none of these; with a base model the layout check attaches the layers
    official = m.extra.get("source_format") == OFFICIAL_SOURCE
    if not m.base_fingerprint and not official:
        problems.append("metadata: no base fingerprint")
    if not m.layout and not official:
        problems.append("metadata: no layout id")
    if not isinstance(m.rank, int) or m.rank <= 0:
        problems.append(f"metadata: rank {m.rank!r} is not a positive integer")
    if not math.isfinite(m.alpha) or m.alpha <= 0:
        problems.append(f"metadata: alpha {m.alpha!r} is not a positive finite number")
    if not m.trainer and not official:
        problems.append("metadata: no trainer config")
    if m.extra.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        problems.append(f"metadata: format version {m.extra['format_version']} != {FORMAT_VERSION}")
    return problems


def _layout_problems(m: Membrane, unet) -> list[str]:
    """Attach to the base UNet and detach: every key must name a target layer of the right shape."""
    problems = []
    try:
        bank = MembraneBank.from_membranes(unet, [m])
    except IncompatibleMembraneError as exc:
        return [f"layout: {exc}"]
    bank.detach()
    scope = m.trainer.get("scope", "transformer") if isinstance(m.trainer, dict) else "transformer"
    try:
        expected = layout_id(unet, scope)
    except (ValueError, IncompatibleMembraneError) as exc:
        return [f"layout: {exc}"]
    if m.layout and m.layout != expected:
        problems.append(f"layout: membrane layout id {m.layout} != base layout id {expected} (scope {scope})")
    return problems


def check_behaviour(evaluator: Evaluator | None, pipe, membrane: Membrane, concept_spec,
                    gates: Gates) -> tuple[str, dict[str, float], list[str]]:
    """Run the evaluator and apply the gates; (``not_evaluated``, {}, []) without an evaluator."""
    if evaluator is None:
        return NOT_EVALUATED, {}, []
    try:
        metrics = {k: float(v) for k, v in dict(evaluator(pipe, membrane, concept_spec)).items()}
    except Exception as exc:  # an evaluator crash fails this version, not the run
        logger.exception("evaluator failed on %s", membrane.name)
        return FAILED, {}, [f"evaluation error: {type(exc).__name__}: {exc}"]
    reasons = gate_problems(metrics, gates)
    return (FAILED if reasons else PASSED), metrics, reasons


def gate_problems(metrics: Mapping[str, float], gates: Gates) -> list[str]:
    """Every gate the evaluator's ``metrics`` miss."""
    reasons = []
    erasure = metrics.get("erasure_rate")
    drop = metrics.get("preservation_drop")
    if erasure is None or not math.isfinite(erasure):
        reasons.append("evaluation: no finite erasure_rate")
    elif erasure < gates.min_erasure:
        reasons.append(f"erasure_rate {erasure:.4g} < min_erasure {gates.min_erasure:.4g}")
    if drop is None or not math.isfinite(drop):
        reasons.append("evaluation: no finite preservation_drop")
    elif drop > gates.max_preservation_drop:
        reasons.append(f"preservation_drop {drop:.4g} > max_preservation_drop {gates.max_preservation_drop:.4g}")
    if gates.min_target_drop > 0:
        target_drop = metrics.get("target_drop")
        if target_drop is None or not math.isfinite(target_drop):
            reasons.append("evaluation: no finite target_drop (needed by min_target_drop)")
        elif target_drop < gates.min_target_drop:
            reasons.append(f"target_drop {target_drop:.4g} < min_target_drop {gates.min_target_drop:.4g}")
    return reasons


def validate(source: str | Membrane, *, unet=None, family: str | None = None, base_fingerprint: str | None = None,
             evaluator: Evaluator | None = None, pipe=None, concept_spec=None, gates: Gates | None = None,
             transfer: Mapping[str, Callable[[], Any]] | None = None
             ) -> tuple[Membrane | None, ValidationReport]:
    """Structural then behavioural validation; behaviour is only evaluated on a structurally sound membrane.

    ``transfer`` maps a name to a function returning another pipeline of the same family: the membrane
    must fit its UNet and pass the same gates there, or the behaviour fails with the model named."""
    gates = gates or Gates()
    membrane, reasons = check_structure(source, unet=unet, family=family, base_fingerprint=base_fingerprint)
    report = ValidationReport(structural=FAILED if reasons else PASSED, reasons=list(reasons),
                              gates=asdict(gates))
    if report.structural == PASSED and evaluator is not None:
        report.behavioural, report.metrics, extra = check_behaviour(evaluator, pipe, membrane, concept_spec, gates)
        report.reasons += extra
        for name, load in (transfer or {}).items():
            status, metrics, extra = _check_transfer(evaluator, load, membrane, concept_spec, gates)
            report.transfer[name] = status
            report.metrics.update({f"{TRANSFER_PREFIX}/{name}/{k}": v for k, v in metrics.items()})
            report.reasons += [f"on {name}: {r}" for r in extra]
            if status == FAILED:
                report.behavioural = FAILED
    elif evaluator is None:
        report.reasons.append("behaviour: not evaluated (no evaluator configured)")
    return membrane, report


def _check_transfer(evaluator: Evaluator, load: Callable[[], Any], membrane: Membrane, concept_spec,
                    gates: Gates) -> tuple[str, dict[str, float], list[str]]:
    """``check_behaviour`` on a transfer model, after checking that the membrane fits its UNet. A model
    that draws the concept on none of the probes (the evaluator's ``drawable`` is 0) leaves nothing to
    erase: only its preservation is gated there, and the model is recorded as ``UNDRAWN``."""
    pipe = load()
    problems = _layout_problems(membrane, pipe.unet)
    if problems:
        return FAILED, {}, problems
    status, metrics, reasons = check_behaviour(evaluator, pipe, membrane, concept_spec, gates)
    if metrics and metrics.get("drawable") == 0:
        keep = Gates(min_erasure=0.0, max_preservation_drop=gates.max_preservation_drop, min_target_drop=0.0)
        reasons = gate_problems(metrics, keep)
        status = FAILED if reasons else UNDRAWN
    return status, metrics, reasons


def transfer_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """A report's metrics per model: ``""`` for the base, then each transfer model by name (models whose
    ``drawable`` is 0 included: callers that rank by erasure leave those out)."""
    models: dict[str, dict[str, float]] = {"": {}}
    for key, value in metrics.items():
        head, _, rest = key.partition("/")
        if head == TRANSFER_PREFIX and "/" in rest:
            name, _, metric = rest.rpartition("/")
            models.setdefault(name, {})[metric] = value
        else:
            models[""][key] = value
    return models


def load_evaluator(spec: str | None, options: Mapping[str, Any] | None = None) -> Evaluator | None:
    """``"package.module:function"`` -> the function (with ``options`` bound as keyword arguments);
    None or "" -> None (no behavioural check)."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError("registry.evaluator", [f"{spec!r} is not of the form 'package.module:function'"])
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("registry.evaluator", [f"cannot import {spec!r}: {exc}"]) from None
    if not callable(fn):
        raise ConfigError("registry.evaluator", [f"{spec!r} is not callable"])
    return functools.partial(fn, **dict(options)) if options else fn
