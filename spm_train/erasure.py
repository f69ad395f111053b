"""Erasure that holds up, measured: held-out phrasings, drawable prompts, intervals over prompts.

``ErasureBench`` scores membranes on ToyWorld with evaluation templates that no training step sees
(``toyworld.eval_prompts``). For each concept it counts only the prompts the base model draws the concept
in at least ``draw_threshold`` of the time ("drawable"), and reports

- ``p_before`` / ``p_after``: share of images on drawable prompts in which the classifier sees the concept,
  and ``drop`` between them;
- ``nontarget_drop``: classifier accuracy on non-target prompts before minus after, in points;
- ``pixel_mse``: mean per-image change on non-target prompts (pixels in [0, 1]);
- ``rest_drop``: on the drawable target prompts, accuracy on the attributes no equipped membrane erases,
  before minus after, in points (erasing red from "a red square" should leave a square);
- 95 % bootstrap intervals over prompts for ``p_after`` and ``nontarget_drop``.

Membranes are measured alone (non-target prompts: every prompt not naming the concept, so damage to the
other concepts of the set counts) and all equipped together (non-target prompts: those naming no erased
concept). A prompt that opens no equipped membrane generates exactly as on the base, so its images are
taken from the base generations instead of being rendered again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import ConceptSpec
from .evaluate import _prompt_seed
from .grids import VERDICT_LEGEND, Group, Tile, gamma_caption, write_grid
from .membrane import Membrane
from .prompts import concept_words
from .toyworld.eval_prompts import EvalPrompt, concept_head, erasure_prompts
from .transport import apply_membranes

logger = logging.getLogger(__name__)


@dataclass
class ErasureSettings:
    samples: int = 4  # images per prompt
    fills: int = 2  # prompts per template and concept
    templates: int | None = None  # how many evaluation templates (None: all)
    # sentence forms to evaluate on instead of eval_prompts.EVAL_TEMPLATES ("{colour} {shape} drawn {style}")
    forms: list[str] | None = None
    # share of the values named by a synonym of the active ToyWorld ("crimson" for red): paraphrase erasure
    synonyms: float = 0.0
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    similarity: str = "token"
    scaling: str = "linear"
    facilitate: float = 1.0
    transport: bool = True
    draw_threshold: float = 0.5
    bootstrap: int = 1000
    batch_size: int = 64


@dataclass
class ErasureRow:
    concept: str
    equipped: str
    drawable: int  # drawable target prompts
    p_before: float
    p_after: float
    p_after_ci: tuple[float, float]
    drop: float
    nontarget_before: float
    nontarget_after: float
    nontarget_drop: float  # points
    nontarget_drop_ci: tuple[float, float]
    pixel_mse: float
    rest_drop: float  # points: accuracy on the other attributes the target prompts name (the square of "a red square")
    gamma_target: float
    gamma_nontarget: float
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Snapshot:
    """What the report's pictures show of one concept under one setting: a few of its prompts (drawable
    target prompts first, then prompts not naming it), a few samples each, the classifier's verdicts and the
    gamma each prompt gives the equipped membranes."""

    prompts: list[str]
    targets: int  # the first ``targets`` prompts name the concept
    images: torch.Tensor  # [prompts, samples, 3, H, W]
    verdicts: list[list[tuple[str, bool]]]  # [prompt][sample]: (what the classifier reads, concept seen)
    captions: list[str]  # per prompt: the gamma of each equipped membrane


def bootstrap_mean(values: torch.Tensor, draws: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (one per prompt), resampling prompts."""
    if values.numel() == 0:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(values.numel(), (draws, values.numel()), generator=g)
    means = values.float()[idx].mean(dim=1)
    return (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))


class ErasureBench:
    """Fixed evaluation prompts and base generations for a ToyWorld concept set, reused by every
    ``measure`` call (one per set of membranes or transport setting)."""

    def __init__(self, pipe, concepts: Sequence[ConceptSpec], settings: ErasureSettings | None = None,
                 classifier=None, progress: bool = True):
        from .toyworld import load_classifier

        self.pipe = pipe
        self.settings = settings or ErasureSettings()
        self.classifier = classifier if classifier is not None else load_classifier()
        self.progress = progress
        self.concepts = list(concepts)
        self.words = {}
        for c in self.concepts:
            names = concept_words(c.target)
            if len(names) != 1:
                raise ValueError(f"concept {c.name!r}: a ToyWorld concept names one shape, colour or style, "
                                 f"its target {c.target!r} names {names}")
            concept_head(names[0])  # a clear error for a word ToyWorld does not know
            self.words[c.name] = names[0]
        s = self.settings
        targets, others = erasure_prompts(list(self.words.values()), fills=s.fills, seed=s.seed,
                                          templates=s.templates, forms=s.forms, synonyms=s.synonyms)
        self.targets = {name: targets[w] for name, w in self.words.items()}
        self.others = others
        prompts: dict[str, EvalPrompt] = {}
        for p in [p for ps in targets.values() for p in ps] + others:
            prompts.setdefault(p.text, p)
        self.prompts = list(prompts.values())
        self.index = {p.text: i for i, p in enumerate(self.prompts)}
        self.base = self._render(list(range(len(self.prompts))), "base")
        self.base_labels = self._classify(self.base)

    def with_settings(self, settings: ErasureSettings) -> "ErasureBench":
        """The same prompts and base generations under other transport settings (similarity, scaling,
        transport on or off); the settings that shape the base generations must be equal."""
        fixed = ("samples", "fills", "templates", "forms", "synonyms", "steps", "guidance_scale", "seed")
        differ = [k for k in fixed if getattr(settings, k) != getattr(self.settings, k)]
        if differ:
            raise ValueError(f"with_settings keeps the base generations: {', '.join(differ)} cannot change")
        clone = object.__new__(ErasureBench)
        clone.__dict__.update(self.__dict__)
        clone.settings = settings
        return clone

    # -- generation --------------------------------------------------------------------------
    def _render(self, which: list[int], desc: str) -> torch.Tensor | None:
        s = self.settings
        flat = [(i, k) for i in which for k in range(s.samples)]
        out = []
        bar = tqdm(total=len(flat), desc=f"generate[{desc}]", unit="img", leave=False, disable=not self.progress)
        for lo in range(0, len(flat), s.batch_size):
            chunk = flat[lo:lo + s.batch_size]
            texts = [self.prompts[i].text for i, _ in chunk]
            gens = [torch.Generator().manual_seed(_prompt_seed(s.seed, t, k)) for t, (_, k) in zip(texts, chunk)]
            with torch.no_grad():
                images = self.pipe(texts, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                                   generator=gens, output_type="pt").images
            out.append(images.float().cpu())
            bar.update(len(chunk))
        bar.close()
        if not out:
            return None
        images = torch.cat(out)
        return images.view(len(which), s.samples, *images.shape[1:])

    @torch.no_grad()
    def _classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = images.flatten(0, 1)
        preds = {head: [] for head in ("shape", "colour", "style")}
        for lo in range(0, flat.shape[0], 256):
            out = self.classifier.classify(flat[lo:lo + 256])
            for head in preds:
                preds[head].append(out[head].cpu())
        return {head: torch.cat(v).view(images.shape[0], images.shape[1]) for head, v in preds.items()}

    def _value_index(self, head: str, value: str) -> int:
        return list(self.classifier.config.heads[head]).index(value)

    def generations(self, membranes: Sequence[Membrane]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Images of every prompt with ``membranes`` equipped (base images where none opens), their
        predicted labels and the permeability ``[prompts, membranes]``."""
        s = self.settings
        texts = [p.text for p in self.prompts]
        with apply_membranes(self.pipe, membranes, transport=s.transport, similarity=s.similarity,
                             scaling=s.scaling, facilitate=s.facilitate) as handle:
            gamma = handle.prompt_permeability(texts)
            opened = [i for i in range(len(texts)) if bool((gamma[i] > 0).any())]
            rendered = self._render(opened, "+".join(m.name for m in membranes)[:40])
        images = self.base.clone()
        if rendered is not None:
            images[opened] = rendered
        labels = {h: v.clone() for h, v in self.base_labels.items()}
        if rendered is not None:
            new = self._classify(rendered)
            for h in labels:
                labels[h][opened] = new[h]
        return images, labels, gamma

    # -- scores ------------------------------------------------------------------------------
    def _present(self, labels: dict, name: str, rows: list[int]) -> torch.Tensor:
        word = self.words[name]
        head = concept_head(word)
        return (labels[head][rows] == self._value_index(head, word)).float().mean(dim=1)

    def _accuracy(self, labels: dict, rows: list[int], erased: frozenset = frozenset()) -> torch.Tensor:
        """Per prompt: the share of its named attributes (those not ``erased``) the classifier reads back."""
        scores = []
        for r in rows:
            hits = [(labels[h][r] == self._value_index(h, v)).float() for h, v in self.prompts[r].attributes
                    if v not in erased]
            scores.append(torch.stack(hits).mean() if hits else torch.tensor(float("nan")))
        return torch.stack(scores) if scores else torch.zeros(0)

    def _row(self, name: str, equipped: str, images, labels, gamma, column: int, nontarget: list[int],
             erased: frozenset) -> ErasureRow:
        s = self.settings
        target_rows = [self.index[p.text] for p in self.targets[name]]
        before = self._present(self.base_labels, name, target_rows)
        drawable = [r for r, b in zip(target_rows, before.tolist()) if b >= s.draw_threshold]
        p_before = self._present(self.base_labels, name, drawable)
        p_after = self._present(labels, name, drawable)
        acc_before = self._accuracy(self.base_labels, nontarget)
        acc_after = self._accuracy(labels, nontarget)
        drop_pts = 100 * (acc_before - acc_after)
        mse = (images[nontarget] - self.base[nontarget]).pow(2).flatten(1).mean(1) if nontarget else torch.zeros(0)
        rest = 100 * (self._accuracy(self.base_labels, drawable, erased) - self._accuracy(labels, drawable, erased))
        g_target = gamma[target_rows].max(dim=1).values if column < 0 else gamma[target_rows, column]
        g_other = gamma[nontarget].max(dim=1).values if column < 0 else gamma[nontarget, column]
        return ErasureRow(
            concept=name, equipped=equipped, drawable=len(drawable),
            p_before=_mean(p_before), p_after=_mean(p_after),
            p_after_ci=bootstrap_mean(p_after, s.bootstrap, s.seed), drop=_mean(p_before) - _mean(p_after),
            nontarget_before=_mean(acc_before), nontarget_after=_mean(acc_after), nontarget_drop=_mean(drop_pts),
            nontarget_drop_ci=bootstrap_mean(drop_pts, s.bootstrap, s.seed + 1), pixel_mse=_mean(mse),
            rest_drop=_mean(rest),
            gamma_target=_mean(g_target), gamma_nontarget=_mean(g_other),
        )

    def measure(self, membranes: dict[str, Membrane], *, alone: bool = True, together: bool = True,
                snapshots: dict | None = None) -> list[ErasureRow]:
        """Rows for every concept with a membrane: alone, and all equipped together. ``snapshots``, when
        given, receives each row's pictures under the key (concept, "alone" or "together")."""
        rows = []
        names = [c.name for c in self.concepts if c.name in membranes]
        if alone:
            for name in names:
                images, labels, gamma = self.generations([membranes[name]])
                word = self.words[name]
                nontarget = [i for i, p in enumerate(self.prompts) if p.value(concept_head(word)) != word]
                rows.append(self._row(name, "alone", images, labels, gamma, 0, nontarget, frozenset({word})))
                if snapshots is not None:
                    snapshots[(name, "alone")] = self.snapshot(name, images, labels, gamma, [name])
        if together and len(names) > 1:
            images, labels, gamma = self.generations([membranes[n] for n in names])
            erased = frozenset(self.words[n] for n in names)
            nontarget = [i for i, p in enumerate(self.prompts) if not erased & {v for _, v in p.attributes}]
            for name in names:
                rows.append(self._row(name, "together", images, labels, gamma, -1, nontarget, erased))
                if snapshots is not None:
                    snapshots[(name, "together")] = self.snapshot(name, images, labels, gamma, names)
        return rows

    # -- pictures ----------------------------------------------------------------------------
    def picture_rows(self, name: str, targets: int = 2, others: int = 2) -> tuple[list[int], int]:
        """The prompts the pictures of ``name`` show: its first target prompts (drawable ones first) and
        the first prompts not naming it (other concepts' prompts come first); and how many are targets."""
        word = self.words[name]
        head = concept_head(word)
        target_rows = [self.index[p.text] for p in self.targets[name]]
        seen = self._present(self.base_labels, name, target_rows).tolist()
        drawable = [r for r, b in zip(target_rows, seen) if b >= self.settings.draw_threshold]
        chosen = (drawable + [r for r in target_rows if r not in drawable])[:targets]
        rest = [i for i, p in enumerate(self.prompts) if p.value(head) != word][:others]
        return chosen + rest, len(chosen)

    def snapshot(self, name: str, images: torch.Tensor | None = None, labels: dict | None = None,
                 gamma: torch.Tensor | None = None, equipped: Sequence[str] = (), samples: int = 2) -> Snapshot:
        """``name``'s pictures from ``generations``' output (default: the base generations, no membrane)."""
        rows, n_targets = self.picture_rows(name)
        images = self.base if images is None else images
        labels = self.base_labels if labels is None else labels
        k = min(samples, self.settings.samples)
        word = self.words[name]
        head = concept_head(word)
        heads = self.classifier.config.heads
        order = [h for h in ("style", "colour", "shape") if h in heads]
        verdicts = []
        for r in rows:
            named = {h for h, _ in self.prompts[r].attributes} | {head}
            verdicts.append([(" ".join(heads[h][int(labels[h][r, j])] for h in order if h in named),
                              heads[head][int(labels[head][r, j])] == word) for j in range(k)])
        captions = ["" if gamma is None else gamma_caption(list(equipped), gamma[r].tolist(),
                                                            transport=self.settings.transport) for r in rows]
        return Snapshot(prompts=[self.prompts[r].text for r in rows], targets=n_targets,
                        images=images[rows, :k].clone(), verdicts=verdicts, captions=captions)


def write_pictures(url: str, concept: str, rows: Sequence[tuple[str, Snapshot]]) -> str:
    """One concept's picture: a row per setting (base, each variant, transport off...), a column per
    prompt, each image with the classifier's verdict and each group with its gamma. Written atomically."""
    first = rows[0][1]
    if any(s.prompts != first.prompts for _, s in rows):
        raise ValueError(f"{concept}: every row of a picture must show the same prompts")
    titles = [("target: " if c < first.targets else "other: ") + p for c, p in enumerate(first.prompts)]
    groups = [[Group([Tile(image, *v) for image, v in zip(s.images[c], s.verdicts[c])], s.captions[c])
               for c in range(len(first.prompts))] for _, s in rows]
    header = [f"{concept}: held-out prompts, the same seeds in every row", VERDICT_LEGEND]
    write_grid(url, [label for label, _ in rows], titles, groups, header=header, label_width=150)
    return url


def _mean(values: torch.Tensor) -> float:
    """Mean over the values that are defined (a prompt whose every attribute is erased has no rest)."""
    values = values.float()
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


def summarise(rows: Sequence[ErasureRow]) -> dict[str, dict[str, float]]:
    """Worst and mean figures per equipping mode: what a bar is checked against. A concept the model never
    draws on these prompts (no drawable prompt: P after undefined) is left out of the figures it has no
    value for; ``measured`` counts the concepts with drawable prompts."""
    def worst(values):
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else float("nan")

    def mean(values):
        return _mean(torch.tensor(list(values), dtype=torch.float64))

    out = {}
    for mode in sorted({r.equipped for r in rows}):
        sel = [r for r in rows if r.equipped == mode]
        out[mode] = {
            "max_p_after": worst(r.p_after for r in sel),
            "mean_p_after": mean(r.p_after for r in sel),
            "max_nontarget_drop": worst(r.nontarget_drop for r in sel),
            "mean_nontarget_drop": mean(r.nontarget_drop for r in sel),
            "mean_pixel_mse": mean(r.pixel_mse for r in sel),
            "mean_rest_drop": mean(r.rest_drop for r in sel),
            "measured": sum(r.drawable > 0 for r in sel),
        }
    return out
