"""Erasure and preservation of membranes, measured on fixed-seed generations.

For a concept and a set of membranes the suite generates, with the same seeds, the concept's probe
prompts and its non-target prompts without and with the membranes, and reports

- ``target_before`` / ``target_after``: share of probe images in which the scorer sees the concept, over
  the probes the base draws it in at least ``draw_threshold`` of the time (``drawable`` of them);
  ``erasure_rate = 1 - target_after`` and ``target_drop = target_before - target_after``;
- ``nontarget_before`` / ``nontarget_after``: scorer accuracy on non-target prompts, and
  ``preservation_drop`` between them;
- ``nontarget_pixel_mse`` and ``nontarget_feature_distance``: mean per-image change between the
  original and the membrane-equipped image of the same seed (pixels in [0, 1]; the scorer's features);
- ``gamma_target`` / ``gamma_nontarget``: mean facilitated-transport permeability the prompts opened.

It also keeps, for the report's grids, the first ``grid_samples`` images of every prompt without and with
the membranes, what the scorer reads in each (``verdicts``) and each prompt's permeability (``Pictures``).

Scorers: ``ToyWorldScorer`` reads shape, colour and style with the ToyWorld classifier; ``ClipScorer``
serves real models with a CLIP model loaded from a local folder (CLIP score and CLIP accuracy).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from .config import ConceptSpec
from .membrane import Membrane
from .transport import apply_membranes

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    samples_per_prompt: int = 8
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 64
    transport: bool = True
    similarity: str = "token"  # facilitated transport's similarity (see transport.permeability)
    threshold: float = 0.85
    # erasure is counted on probes the base draws the concept in at least this often ("drawable")
    draw_threshold: float = 0.5
    # images per prompt kept for the report's grids, with the scorer's verdict on each (0: none kept)
    grid_samples: int = 4


class Scorer(Protocol):
    """What a scorer reads. It may also offer ``verdicts(images, prompts, concept)``: per image, a short
    text of what it reads and whether it sees the concept (the grids' labels; see ``verdicts``)."""

    def concept_present(self, images: torch.Tensor, concept: ConceptSpec) -> torch.Tensor: ...

    def prompt_accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


def _prompt_seed(seed: int, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _render(pipe, flat: Sequence[str], index: Sequence[int], settings: EvalSettings, on_batch=None) -> torch.Tensor:
    out = []
    for lo in range(0, len(flat), settings.batch_size):
        chunk = list(flat[lo:lo + settings.batch_size])
        generators = [torch.Generator().manual_seed(_prompt_seed(settings.seed, p, i))
                      for p, i in zip(chunk, index[lo:lo + settings.batch_size])]
        images = pipe(chunk, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      generator=generators, output_type="pt").images
        out.append(images.float().cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(out)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], settings: EvalSettings, on_batch=None) -> tuple[torch.Tensor, list[str]]:
    """``samples_per_prompt`` images per prompt, each from its own seed: [N, 3, H, W] in [0, 1], on CPU.

    An image depends on its prompt, sample index and ``settings.seed`` only, not on the batch it is in.
    """
    flat = [p for p in prompts for _ in range(settings.samples_per_prompt)]
    index = [i for _ in prompts for i in range(settings.samples_per_prompt)]
    return _render(pipe, flat, index, settings, on_batch), flat


def probe_prompts(concept: ConceptSpec) -> list[str]:
    return list(concept.probes) or [concept.target]


def verdicts(scorer: Scorer, images: torch.Tensor, prompts: Sequence[str],
             concept: ConceptSpec) -> list[tuple[str, bool]]:
    """Per image: what ``scorer`` reads in it (a few words) and whether it sees ``concept``."""
    own = getattr(scorer, "verdicts", None)
    if own is not None:
        return own(images, prompts, concept)
    present = scorer.concept_present(images, concept).tolist()
    return [(f"{concept.name} seen" if p else f"no {concept.name}", bool(p)) for p in present]


@dataclass
class Pictures:
    """The first samples of every prompt without and with the membranes (same seeds), what the scorer
    reads in each, and the permeability each prompt gives each equipped membrane: the report's grids."""

    prompts: list[str]
    probes: int  # the first ``probes`` prompts show the concept, the rest are its non-target prompts
    before: torch.Tensor  # [prompts, samples, 3, H, W] in [0, 1]
    after: torch.Tensor
    verdicts_before: list[list[tuple[str, bool]]]  # [prompt][sample]: (what the scorer reads, concept seen)
    verdicts_after: list[list[tuple[str, bool]]]
    membranes: list[str]
    gamma: torch.Tensor  # [prompts, membranes]
    transport: bool


@dataclass
class ConceptEvaluation:
    concept: str
    membranes: list[str]
    transport: bool
    target_before: float
    target_after: float
    erasure_rate: float
    target_drop: float
    nontarget_before: float | None
    nontarget_after: float | None
    preservation_drop: float | None
    nontarget_pixel_mse: float | None
    nontarget_feature_distance: float | None
    target_pixel_mse: float
    gamma_target: float | None
    gamma_nontarget: float | None
    samples: int
    # probe prompts the base draws the concept in (the ones erasure is counted on; with none, every probe
    # is counted and this is 0)
    drawable: int = 0
    # the first ``grid_samples`` images of every prompt, without and with the membranes
    images: Pictures | None = field(default=None, repr=False, compare=False)
    equipped: str = "alone"  # "alone" or "all together"
    anchoring: bool = True  # False: the membrane was trained without latent anchoring (ablation)

    def metrics(self) -> dict[str, float]:
        skip = {"images", "anchoring"}
        return {k: getattr(self, k) for k in self.__dataclass_fields__
                if k not in skip and isinstance(getattr(self, k), (int, float))
                and not isinstance(getattr(self, k), bool)}


@torch.no_grad()
def evaluate_concept(pipe, concept: ConceptSpec, membranes: Sequence[Membrane], scorer: Scorer,
                     settings: EvalSettings | None = None, *, baseline: dict | None = None) -> ConceptEvaluation:
    """Score ``concept`` on ``pipe`` without and with ``membranes`` (same seeds for both).

    ``baseline`` caches the membrane-free generations between calls (keyed by prompt list).
    """
    settings = settings or EvalSettings()
    probes, others = probe_prompts(concept), list(concept.nontarget)
    prompts = probes + others
    cache = baseline if baseline is not None else {}
    key = (tuple(prompts), settings.samples_per_prompt, settings.steps, settings.guidance_scale, settings.seed)
    if key not in cache:
        cache[key] = generate(pipe, prompts, settings)
    before, flat = cache[key]
    gammas: list[torch.Tensor] = []
    with apply_membranes(pipe, membranes, transport=settings.transport, similarity=settings.similarity,
                         threshold=settings.threshold) as handle:
        def record_gamma(n: int) -> None:
            g = handle.last_permeability  # CFG batches list the conditional rows last
            g = g[-n:] if g.shape[0] >= n else g.expand(n, -1)
            gammas.append(g.max(dim=1).values)

        after, _ = generate(pipe, prompts, settings, on_batch=record_gamma)
        prompt_gamma = handle.prompt_permeability(prompts) if settings.grid_samples > 0 else None
    n_probe = len(probes) * settings.samples_per_prompt
    is_probe = torch.zeros(len(flat), dtype=torch.bool)
    is_probe[:n_probe] = True
    per_image = scorer.concept_present(before[is_probe], concept).float()
    per_probe = per_image.view(len(probes), settings.samples_per_prompt).mean(dim=1)
    drawable = (per_probe >= settings.draw_threshold).repeat_interleave(settings.samples_per_prompt)
    drawn = int(drawable.sum()) // settings.samples_per_prompt  # 0 says: nothing to erase on this model
    if not drawable.any():
        logger.warning("%s: the base draws the concept in none of its probes (at least %.0f%% of the time); "
                       "erasure is counted on every probe", concept.name, 100 * settings.draw_threshold)
        drawable = torch.ones_like(drawable)
    present_before = per_image[drawable].mean().item()
    present_after = scorer.concept_present(after[is_probe][drawable], concept).float().mean().item()
    gamma = torch.cat(gammas) if gammas else None
    result = dict(
        concept=concept.name, membranes=[m.name for m in membranes], transport=settings.transport,
        target_before=present_before, target_after=present_after, erasure_rate=1.0 - present_after,
        target_drop=present_before - present_after,
        target_pixel_mse=F.mse_loss(after[is_probe], before[is_probe]).item(),
        gamma_target=None if gamma is None else gamma[is_probe].mean().item(),
        gamma_nontarget=None if gamma is None or not others else gamma[~is_probe].mean().item(),
        samples=settings.samples_per_prompt, drawable=drawn,
        nontarget_before=None, nontarget_after=None, preservation_drop=None, nontarget_pixel_mse=None,
        nontarget_feature_distance=None,
    )
    if others:
        rest = [p for p, probe in zip(flat, is_probe.tolist()) if not probe]
        acc_before = scorer.prompt_accuracy(before[~is_probe], rest).mean().item()
        acc_after = scorer.prompt_accuracy(after[~is_probe], rest).mean().item()
        fb, fa = scorer.features(before[~is_probe]), scorer.features(after[~is_probe])
        result.update(
            nontarget_before=acc_before, nontarget_after=acc_after, preservation_drop=acc_before - acc_after,
            nontarget_pixel_mse=F.mse_loss(after[~is_probe], before[~is_probe]).item(),
            nontarget_feature_distance=(fa - fb).norm(dim=1).mean().item(),
        )
    if prompt_gamma is not None:
        result["images"] = _pictures(scorer, concept, prompts, len(probes), before, after, settings,
                                     [m.name for m in membranes], prompt_gamma)
    evaluation = ConceptEvaluation(**result)
    drop = evaluation.preservation_drop
    logger.info("evaluated %s with %s (transport %s): erasure %.2f, preservation drop %s", concept.name,
                evaluation.membranes, settings.transport, evaluation.erasure_rate,
                "-" if drop is None else f"{drop:.2f}")
    return evaluation


def _pictures(scorer, concept, prompts, probes, before, after, settings, names, gamma) -> Pictures:
    spp = settings.samples_per_prompt
    k = min(settings.grid_samples, spp)
    keep = [p * spp + j for p in range(len(prompts)) for j in range(k)]
    texts = [prompts[i // spp] for i in keep]

    def read(images):
        flat = verdicts(scorer, images, texts, concept)
        return [flat[p * k:(p + 1) * k] for p in range(len(prompts))]

    shape = (len(prompts), k, *before.shape[1:])
    return Pictures(prompts=list(prompts), probes=probes, before=before[keep].view(shape),
                    after=after[keep].view(shape), verdicts_before=read(before[keep]),
                    verdicts_after=read(after[keep]), membranes=names, gamma=gamma.float(),
                    transport=settings.transport)


# -- scorers -----------------------------------------------------------------------------------------


class ToyWorldScorer:
    """Reads shape, colour and style with the ToyWorld classifier."""

    def __init__(self, classifier=None, device="cpu"):
        from .toyworld import load_classifier

        self.classifier = classifier if classifier is not None else load_classifier(device)
        self.heads = {name: list(classes) for name, classes in self.classifier.config.heads.items()}

    def attributes(self, prompt: str) -> dict[str, int]:
        """Head -> class index for every attribute the prompt names."""
        words = prompt.lower().replace(",", " ").split()
        named = {}
        for head, classes in self.heads.items():
            for i, cls in enumerate(classes):
                if cls in words:
                    named[head] = i
        return named

    def concept_attribute(self, concept: ConceptSpec) -> tuple[str, int]:
        named = self.attributes(concept.target)
        if len(named) != 1:
            raise ValueError(f"ToyWorld concept {concept.name!r} must name exactly one shape, colour or style "
                             f"in its target prompt, found {sorted(named) or 'none'}")
        return next(iter(named.items()))

    def concept_present(self, images, concept):
        head, cls = self.concept_attribute(concept)
        return self.classifier.classify(images)[head] == cls

    def verdicts(self, images, prompts, concept):
        """The style, colour and shape it reads (those the prompt or the concept names), and whether the
        concept's attribute is among them."""
        head, cls = self.concept_attribute(concept)
        preds = self.classifier.classify(images)
        order = [h for h in ("style", "colour", "shape") if h in self.heads]
        order += [h for h in self.heads if h not in order]
        out = []
        for i, prompt in enumerate(prompts):
            named = set(self.attributes(prompt)) | {head}
            words = [self.heads[h][int(preds[h][i])] for h in order if h in named]
            out.append((" ".join(words), bool(preds[head][i] == cls)))
        return out

    def prompt_accuracy(self, images, prompts):
        preds = self.classifier.classify(images)
        scores = []
        for i, prompt in enumerate(prompts):
            named = self.attributes(prompt)
            hits = [float(preds[h][i] == c) for h, c in named.items()]
            scores.append(sum(hits) / len(hits) if hits else float("nan"))
        return torch.tensor(scores)

    @torch.no_grad()
    def features(self, images):
        self.classifier.eval()
        return self.classifier.features(images).cpu()


class ClipScorer:
    """CLIP score and CLIP accuracy with a ``transformers`` CLIPModel loaded from a local folder."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model=None, tokenizer=None, path: str | None = None, device="cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = (model or CLIPModel.from_pretrained(path, local_files_only=True)).to(device).eval()
        self.tokenizer = tokenizer or CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def image_embeds(self, images):
        size = self.model.config.vision_config.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        out = self.model.get_image_features(pixel_values=((x - mean) / std).to(self.device))
        return F.normalize(_projected(out), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**tokens)
        return F.normalize(_projected(out), dim=-1).cpu()

    def clip_score(self, images, prompts) -> torch.Tensor:
        """100 x cosine of each image with its prompt (clipped at 0), per image."""
        return (100 * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)).clamp(min=0)

    def concept_present(self, images, concept):
        """CLIP accuracy: the concept's target wins over its non-target alternatives."""
        candidates = [concept.target] + [p for p in concept.nontarget if p != concept.target]
        sims = self.image_embeds(images) @ self.text_embeds(candidates).T
        return sims.argmax(dim=1) == 0

    def verdicts(self, images, prompts, concept):
        """The candidate prompt (the target or a non-target) the image is closest to."""
        candidates = [concept.target] + [p for p in concept.nontarget if p != concept.target]
        best = (self.image_embeds(images) @ self.text_embeds(candidates).T).argmax(dim=1).tolist()
        return [(candidates[b], b == 0) for b in best]

    def prompt_accuracy(self, images, prompts):
        unique = sorted(set(prompts))
        sims = self.image_embeds(images) @ self.text_embeds(unique).T
        own = torch.tensor([unique.index(p) for p in prompts])
        return (sims.argmax(dim=1) == own).float()

    def features(self, images):
        return self.image_embeds(images)


def _projected(out) -> torch.Tensor:
    """Projected CLIP features: a tensor in transformers 4.x, the output's pooler_output in 5.x."""
    return out if torch.is_tensor(out) else out.pooler_output


def default_scorer(source: str, clip_path: str | None = None, device="cpu") -> Scorer:
    """The ToyWorld classifier for ToyWorld models, CLIP from ``clip_path`` for real ones."""
    if source.startswith("toyworld"):
        return ToyWorldScorer(device=device)
    if clip_path:
        return ClipScorer(path=clip_path, device=device)
    raise ValueError(f"no scorer for {source!r}: give eval.clip_path (a local CLIP model folder)")


def evaluate_set(pipe, concepts: Sequence[ConceptSpec], membranes: dict[str, Membrane], scorer: Scorer,
                 settings: EvalSettings | None = None, *, ablations: dict[str, Membrane] | None = None,
                 together: bool = True) -> list[ConceptEvaluation]:
    """The report's comparisons for every concept with a membrane: transport on and off, the membrane
    trained without latent anchoring (``ablations``), and all membranes equipped together."""
    settings = settings or EvalSettings()
    off = EvalSettings(**{**asdict(settings), "transport": False})
    cache: dict = {}
    rows = []
    for concept in concepts:
        if concept.name not in membranes:
            continue
        own = [membranes[concept.name]]
        rows.append(_tag(evaluate_concept(pipe, concept, own, scorer, settings, baseline=cache), "alone", True))
        rows.append(_tag(evaluate_concept(pipe, concept, own, scorer, off, baseline=cache), "alone", True))
        if ablations and concept.name in ablations:
            rows.append(_tag(evaluate_concept(pipe, concept, [ablations[concept.name]], scorer, settings,
                                              baseline=cache), "alone", False))
        if together and len(membranes) > 1:
            rows.append(_tag(evaluate_concept(pipe, concept, list(membranes.values()), scorer, settings,
                                              baseline=cache), "all together", True))
    return rows


def _tag(evaluation: ConceptEvaluation, equipped: str, anchoring: bool) -> ConceptEvaluation:
    evaluation.equipped = equipped
    evaluation.anchoring = anchoring
    return evaluation
