"""Evaluation prompts for ToyWorld erasure: sentence forms that neither the base model's captions nor any
training corpus use.

The base was trained on ``render.CAPTION_TEMPLATES`` and the ``"toyworld"`` prompt corpus draws from the
same templates, so these forms (other word orders, lead-in phrases, words outside ToyWorld's vocabulary)
measure whether erasure holds beyond the phrasings a membrane trained on. Every template names a shape,
a colour and a style, so each concept kind is measured on every form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, SHAPES, STYLES, WORLD, WORLD_ENV

EVAL_TEMPLATES = (
    "a {colour} {style} {shape}",
    "a {shape}, {colour} and {style}",
    "the {style} {shape} is {colour}",
    "{colour} {shape} drawn {style}",
    "a {style} {shape} in {colour}",
    "{background} background with a {style} {colour} {shape}",
    "picture of a {style} {colour} {shape}",
    "a {shape}: {colour}, {style}",
    "one {colour} {shape}, {style}, on {background}",
    "a {style} {shape} coloured {colour}",
    "simple {style} {colour} {shape} icon",
    "a big {colour} {style} {shape}",
    "{style} {colour} {shape} on a {background} background, centred",
    "an image of a {colour} {shape} with a {style} fill",
)

HEADS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


FIELDS = ("shape", "colour", "style")  # every form names all three; "{background}" is optional


def form_problems(forms) -> list[str]:
    """Why ``forms`` (sentence forms to evaluate on, like ``EVAL_TEMPLATES``) cannot be used: each must be a
    string naming ``{shape}``, ``{colour}`` and ``{style}`` once (``{background}`` optionally) and may not be
    a form the base's captions or the training corpus use."""
    import string

    if isinstance(forms, str) or not list(forms):
        return ["forms must be a non-empty list of sentence forms"]
    seen = {t.removeprefix("a ") for t, _ in CAPTION_TEMPLATES}
    problems = []
    for form in forms:
        if not isinstance(form, str):
            problems.append(f"form {form!r} is not a string")
            continue
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(form) if f is not None]
        except ValueError as exc:
            problems.append(f"form {form!r}: {exc}")
            continue
        missing = [f for f in FIELDS if fields.count(f) != 1]
        unknown = sorted(set(fields) - set(FIELDS) - {"background"})
        if missing or unknown:
            problems.append(f"form {form!r} must name {{shape}}, {{colour}} and {{style}} once each "
                            f"({{background}} optional); missing or repeated {missing}, unknown {unknown}")
        elif form in seen or form.removeprefix("a ") in seen:
            problems.append(f"form {form!r} is a training caption form: it measures nothing held out")
    return problems


def synonym_problems(synonyms) -> list[str]:
    """Why ``synonyms`` (the share of values an evaluation names by a synonym) cannot be used: a share in
    [0, 1], above 0 only in a world that has synonyms."""
    if not isinstance(synonyms, (int, float)) or not 0 <= synonyms <= 1:
        return [f"synonyms is a share in [0, 1], got {synonyms!r}"]
    if synonyms > 0 and not WORLD.synonyms:
        return [f"synonyms={synonyms}: ToyWorld {WORLD.name!r} has no synonyms ({WORLD_ENV}=wide has)"]
    return []


def _check_disjoint() -> None:
    problems = form_problems(EVAL_TEMPLATES)
    if problems:
        raise AssertionError(f"evaluation templates: {problems}")


_check_disjoint()


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    template: int
    attributes: tuple[tuple[str, str], ...]  # (head, value) of shape, colour, style

    def value(self, head: str) -> str:
        return dict(self.attributes)[head]


def concept_head(word: str) -> str:
    """The attribute (shape, colour or style) that a ToyWorld concept word names."""
    for head, values in HEADS.items():
        if word in values:
            return head
    raise ValueError(f"{word!r} is not a ToyWorld shape, colour or style")


def fill(template: int, rng: np.random.Generator, allowed: dict[str, list[str]], forms=EVAL_TEMPLATES,
         wording: np.random.Generator | None = None, synonyms: float = 0.0, **fixed) -> EvalPrompt:
    """One prompt of form ``template``; with ``wording``, each value that has a synonym in the active world
    is spoken of by it at rate ``synonyms`` (the labels stay the values)."""
    attrs = {head: fixed.get(head) or str(rng.choice(allowed[head])) for head in HEADS}
    spoken = dict(attrs)
    if wording is not None and synonyms > 0:
        for head, value in attrs.items():
            other = WORLD.synonym(value)
            if other is not None and wording.random() < synonyms:
                spoken[head] = other
    text = forms[template].format(background=str(rng.choice(BACKGROUNDS)), **spoken)
    return EvalPrompt(text, template, tuple(attrs.items()))


def erasure_prompts(concept_words: list[str], *, fills: int = 2, seed: int = 0,
                    templates: int | None = None, forms=None,
                    synonyms: float = 0.0) -> tuple[dict[str, list[EvalPrompt]], list[EvalPrompt]]:
    """Target prompts of every concept word (each template filled ``fills`` times with the concept fixed
    and the other attributes drawn from all values) and non-target prompts (attributes drawn from the
    values no concept erases). Deterministic in ``seed``. ``forms``: sentence forms to use instead of
    ``EVAL_TEMPLATES`` (``form_problems`` says which are usable); ``templates``: only the first ones;
    ``synonyms``: the share of values named by their synonym (the same prompts otherwise: the wording has
    its own random stream)."""
    forms = tuple(EVAL_TEMPLATES if forms is None else forms)
    problems = form_problems(forms)
    if problems:
        raise ValueError("; ".join(problems))
    problems = synonym_problems(synonyms)
    if problems:
        raise ValueError("; ".join(problems))
    rng = np.random.default_rng(seed)
    wording = np.random.default_rng([seed, 1]) if synonyms > 0 else None
    erased = {head: {w for w in concept_words if concept_head(w) == head} for head in HEADS}
    everything = {head: list(values) for head, values in HEADS.items()}
    kept = {head: [v for v in values if v not in erased[head]] for head, values in HEADS.items()}
    empty = [head for head, values in kept.items() if not values]
    if empty:
        raise ValueError(f"every {', '.join(empty)} is erased: no non-target prompt can be formed")
    count = len(forms) if templates is None else min(templates, len(forms))
    targets = {w: [fill(t, rng, everything, forms, wording, synonyms, **{concept_head(w): w})
                   for t in range(count) for _ in range(fills)] for w in concept_words}
    others = [fill(t, rng, kept, forms, wording, synonyms) for t in range(count) for _ in range(fills)]
    return targets, others
