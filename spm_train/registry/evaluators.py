"""Evaluators for the registry's behavioural gate, adapting the evaluation suite to the protocol

    evaluate(pipe, membrane, concept_spec) -> {"erasure_rate": ..., "preservation_drop": ..., ...}

Select one with ``registry.evaluator=spm_train.registry.evaluators:toyworld`` and pass settings with
``registry.evaluator_options`` (samples_per_prompt, steps, guidance_scale, seed, transport).
"""

from __future__ import annotations

from ..config import ConceptSpec
from ..membrane import Membrane


def _settings(**options):
    from ..evaluate import EvalSettings

    # validation reads numbers only: no images are kept for grids
    return EvalSettings(**{**options, "grid_samples": 0})


def _concept(membrane: Membrane, concept_spec: ConceptSpec | None) -> ConceptSpec:
    if concept_spec is not None:
        return concept_spec
    target = membrane.concepts[0] if membrane.concepts else membrane.name
    return ConceptSpec(name=membrane.name, target=target)


def toyworld(pipe, membrane: Membrane, concept_spec: ConceptSpec | None = None, **options) -> dict[str, float]:
    """Erasure and preservation read by the ToyWorld classifier (for ToyWorld base models)."""
    from ..evaluate import ToyWorldScorer, evaluate_concept

    return evaluate_concept(pipe, _concept(membrane, concept_spec), [membrane], ToyWorldScorer(),
                            _settings(**options)).metrics()


def clip(pipe, membrane: Membrane, concept_spec: ConceptSpec | None = None, *, clip_path: str,
         **options) -> dict[str, float]:
    """Erasure and preservation read by a CLIP model from a local folder (for real base models)."""
    from ..evaluate import ClipScorer, evaluate_concept

    return evaluate_concept(pipe, _concept(membrane, concept_spec), [membrane], ClipScorer(path=clip_path),
                            _settings(**options)).metrics()
