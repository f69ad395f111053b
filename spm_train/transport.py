"""Facilitated transport: open each membrane only as far as the prompt is close to its concepts.

For membrane i with erased concepts C_i and prompt p (Lyu et al. 2024):

    gamma_i(p) = f * max_{c in C_i} max(cos(E(p), E(c)), |tok(p) & tok(c)| / |tok(c)|)

with E the flattened text conditioning the UNet receives and special tokens left out of the token
sets. ``apply_membranes`` equips a diffusers pipeline so that every ``pipe(...)`` call computes
gamma per batch element and the UNet applies ``sum_i gamma_i (alpha_i / rank_i) U_i D_i``.

Similarities (``similarity=``):

- ``"paper"``: the formula above as published: cosine of the flattened embeddings, token overlap over
  every non-special token (function words included);
- ``"content"``: cosine of the mean embedding of content tokens, mapped from ``[threshold, 1]`` to
  ``[0, 1]``; overlap over content tokens only;
- ``"token"`` (default): each content token of the concept against its closest content token of the
  prompt, in the text encoder's contextual output, averaged over the concept's tokens and mapped from
  ``[zero, one]`` to ``[0, 1]``, where ``zero`` and ``one`` are calibrated per membrane
  (``calibrate_transport``) and stored in its header; overlap over content tokens only;
- ``"lexical"``: as ``"token"``, on the text encoder's input token embeddings (table mean removed) instead
  of its contextual output: what each word is, whatever its position and neighbours. A causal encoder's
  outputs can be dominated by position, so that every caption scores near 1 against every concept (on the
  wide ToyWorld the calibrated zero point of all ten concepts came out at 0.99); its input rows still
  tell synonyms (cosine 0.91-0.98 there) from other words (at most 0.61; docs/erasure.md).

A membrane's header names the similarity it was calibrated (and, when gated, trained) with; ``"token"``
scores each membrane in that one, so ``"lexical"`` membranes open as trained without any setting.

Function words (``spm_train.prompts.FUNCTION_WORDS``) never open a membrane outside ``"paper"``.

Gated membranes (header ``gate: token``, ``word`` or ``causal``, trained with the same ``TrainerConfig.gate``)
open per token in the layers that read the prompt, the keys and values of cross-attention (``token_gate``):
a content token as far as it is close to the concept, every other position not at all, except that
``"token"`` also opens the end-of-text and padding positions (where the text encoder sums up the whole
prompt) as far as the prompt is, and ``"causal"`` moreover every position after one that opens, at least as
far (a causal encoder writes the concept into every later output: in "a cross, blue and checked" the
outputs of "blue" and "checked" carry the cross). The other words of a prompt that names the concept keep their keys and
values (with ``"word"`` the summary positions too), and so do prompts that open several membranes.
``scaling="official"`` reproduces the official inference code, which multiplies both membrane factors
by gamma (an effect of gamma squared); ``"linear"`` (default) is the paper's formula. ``"shared"`` is
linear, except on the summary positions of a prompt (end-of-text and padding, which every gated membrane
open on the prompt acts on): there the open membranes share one opening of ``facilitate`` instead of each
taking its own, so that several membranes opened beyond their trained strength do not add up there
(docs/erasure.md, "Erase strength against the rest of the prompt").
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import CALIBRATED_SIMILARITIES, number_problem
from .errors import ConfigError
from .membrane import Membrane, MembraneBank
from .models import ModelAdapter, tail_positions

logger = logging.getLogger(__name__)


def token_overlap(prompt_ids: set[int], concept_ids: set[int]) -> float:
    """Share of the concept's tokens that occur in the prompt."""
    if not concept_ids:
        return 0.0
    return len(prompt_ids & concept_ids) / len(concept_ids)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every flattened row of ``a`` [B, ...] with every row of ``b`` [C, ...]."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float().to(a.device)
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


SIMILARITIES = ("paper", "content", "token", "lexical")
PER_TOKEN = CALIBRATED_SIMILARITIES  # the calibrated per-token similarities a membrane header names
SCALINGS = ("linear", "official", "shared")
TRANSPORT_KEY = "transport"  # header key of a membrane's calibrated transport
GATE_KEY = "gate"  # header key: "token", "word" or "causal" for a membrane that opens per token
GATED = ("token", "word", "causal")


def opens_tail(gate: str | None) -> bool:
    """Whether a gated membrane of kind ``gate`` opens the end-of-text and padding positions."""
    return gate in ("token", "causal")


def spreads(gate: str | None) -> bool:
    """Whether a gated membrane of kind ``gate`` opens every position after an open one ("causal")."""
    return gate == "causal"


@dataclass(frozen=True)
class Calibration:
    """Zero and one points of a membrane's per-token similarity (``similarity``: ``"token"`` or
    ``"lexical"``): scores at or below ``zero`` keep the membrane closed, scores at or above ``one`` open it
    fully."""

    zero: float = 0.85
    one: float = 1.0
    similarity: str = "token"

    def to_header(self) -> str:
        return json.dumps({"similarity": self.similarity, "zero": round(self.zero, 6), "one": round(self.one, 6)},
                          sort_keys=True)

    @classmethod
    def from_membrane(cls, membrane: Membrane, default: "Calibration") -> "Calibration":
        raw = membrane.extra.get(TRANSPORT_KEY)
        if not raw:
            return default
        try:
            data = json.loads(raw)
            zero, one = float(data["zero"]), float(data["one"])
            similarity = data.get("similarity", "token")
        except (ValueError, TypeError, KeyError, AttributeError):
            similarity = None
        if similarity not in PER_TOKEN or not -1.0 <= zero < one <= 1.0:
            logger.warning("membrane %s: unreadable transport calibration %r; using %s zero=%.3f one=%.3f",
                           membrane.name, raw, default.similarity, default.zero, default.one)
            return default
        return cls(zero, one, similarity)


def token_similarity(prompt_embeds: torch.Tensor, prompt_masks: Sequence[torch.Tensor | None],
                     concept_embeds: torch.Tensor, concept_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, C]`` raw per-token similarity: for each content token of the concept, the cosine with the
    closest content token of the prompt (contextual text-encoder output), averaged over the concept's
    tokens. A prompt without content tokens scores 0; an unknown mask (``None``) scores ``nan``."""
    out = torch.full((prompt_embeds.shape[0], concept_embeds.shape[0]), float("nan"))
    concepts = [torch.nn.functional.normalize(e[m.to(e.device)].float(), dim=-1)
                for e, m in zip(concept_embeds, concept_masks)]
    for b, (e, m) in enumerate(zip(prompt_embeds, prompt_masks)):
        if m is None:
            continue
        tokens = torch.nn.functional.normalize(e[m.to(e.device)].float(), dim=-1)
        for c, ct in enumerate(concepts):
            if tokens.shape[0] == 0 or ct.shape[0] == 0:
                out[b, c] = 0.0
            else:
                out[b, c] = (ct @ tokens.T).max(dim=1).values.mean().cpu()
    return out


def per_token_similarity(prompt_embeds: torch.Tensor, prompt_lexical: torch.Tensor | None,
                         prompt_masks: Sequence[torch.Tensor | None], concept_embeds: torch.Tensor,
                         concept_lexical: torch.Tensor | None, concept_masks: Sequence[torch.Tensor],
                         similarities: Sequence[str]) -> torch.Tensor:
    """``[B, C]`` raw ``token_similarity``, concept ``c`` scored in ``similarities[c]``: ``"token"`` on the
    contextual embeddings, ``"lexical"`` on the input token embeddings (``ModelAdapter.lexical``)."""
    raw = torch.full((prompt_embeds.shape[0], concept_embeds.shape[0]), float("nan"))
    for name, prompts, concepts in (("token", prompt_embeds, concept_embeds),
                                    ("lexical", prompt_lexical, concept_lexical)):
        cols = [c for c, s in enumerate(similarities) if s == name]
        if not cols:
            continue
        if prompts is None or concepts is None:
            raise ValueError(f"similarity {name!r} needs the prompts' and concepts' {name} embeddings")
        raw[:, cols] = token_similarity(prompts, prompt_masks, concepts[cols], [concept_masks[c] for c in cols])
    return raw


def calibrated(raw: torch.Tensor, zero: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """``raw`` mapped linearly from ``[zero, one]`` to ``[0, 1]`` (per column), clamped."""
    return ((raw - zero) / (one - zero).clamp(min=1e-6)).clamp(0, 1)


def token_gate(prompt_embeds: torch.Tensor, content: torch.Tensor, tail: torch.Tensor, prompt_gamma: torch.Tensor,
               concept_embeds: torch.Tensor, concept_masks: Sequence[torch.Tensor],
               calibration: Sequence[Calibration], prompt_ids: torch.Tensor | None = None,
               concept_ids: Sequence[set[int]] | None = None, spread: Sequence[bool] | None = None) -> torch.Tensor:
    """``[B, T, C]`` per-token openings of each concept's membrane.

    A content position (``content[b, t]``) opens fully when it holds one of the concept's own tokens
    (``prompt_ids`` against ``concept_ids``: the per-token form of the paper's token overlap; a causal text
    encoder gives "blue" after "a" another embedding than "blue" alone), otherwise as far as its
    contextual embedding is close to the concept's closest content token, mapped by the concept's
    calibration (synonyms and paraphrases); end-of-text and padding positions
    (``tail``), which the causal text encoder fills with a summary of the whole prompt, open as far as the
    prompt does (``prompt_gamma[b, c]``); start, function-word and punctuation positions stay closed.
    ``spread[c]`` (gate ``"causal"``): every position opens at least as far as the most open position
    before it, since a causal text encoder writes the concept into every later output."""
    e = torch.nn.functional.normalize(prompt_embeds.float(), dim=-1)
    out = torch.zeros(*e.shape[:2], concept_embeds.shape[0], device=e.device)
    for c, (ce, cm) in enumerate(zip(concept_embeds, concept_masks)):
        ct = torch.nn.functional.normalize(ce[cm.to(ce.device)].float(), dim=-1).to(e.device)
        if ct.shape[0]:
            cal = calibration[c]
            out[:, :, c] = calibrated((e @ ct.T).max(dim=-1).values, torch.tensor(cal.zero), torch.tensor(cal.one))
        if prompt_ids is not None and concept_ids is not None and concept_ids[c]:
            own = torch.isin(prompt_ids.to(out.device), torch.tensor(sorted(concept_ids[c]), device=out.device))
            out[:, :, c] = torch.where(own, torch.ones_like(out[:, :, c]), out[:, :, c])
    out = out * content.to(out.device).unsqueeze(-1)
    cols = [c for c, on in enumerate(spread or ()) if on]
    if cols:
        out[:, :, cols] = out[:, :, cols].cummax(dim=1).values
    return torch.where(tail.to(out.device).unsqueeze(-1), prompt_gamma.to(out).unsqueeze(1), out)


def concept_reference(model: ModelAdapter, concept: str, similarity: str = "token") -> tuple:
    """What ``prompt_gates`` compares prompts with: the concept's contextual embedding (``"lexical"``: its
    input token embeddings), content mask and content token ids (encode once, gate every iteration)."""
    embeds = model.lexical_of([concept]) if similarity == "lexical" else model.encode([concept]).hidden.float()
    return embeds, [model.content_mask(concept)], [model.token_ids(concept)]


def prompt_gates(model: ModelAdapter, prompts: Sequence[str] | None, hidden: torch.Tensor, concept: str,
                 calibration: Calibration, reference: tuple | None = None,
                 open_tail: bool = True, spread: bool = False) -> torch.Tensor:
    """``[N, T]`` token gate of one concept's membrane for prompts encoded as ``hidden`` (training).

    ``prompts=None`` for embeddings that are no prompt (sampled anchors): every position counts as a
    content token and none as the tail; under ``"lexical"`` they hold no token, so the membrane stays
    closed on them. ``reference``: ``concept_reference(model, concept, calibration.similarity)``, when the
    caller keeps it. ``open_tail=False`` (``gate="word"``) keeps the end-of-text and padding positions
    closed; ``spread`` (``gate="causal"``) opens every position after an open one at least as far."""
    lexical = calibration.similarity == "lexical"
    if reference is None:
        reference = concept_reference(model, concept, calibration.similarity)
    c_embeds, c_masks, c_ids = reference
    ids = None
    compare = hidden
    if prompts is None:
        if lexical:
            return torch.zeros(hidden.shape[:2], device=hidden.device)
        content = torch.ones(hidden.shape[:2], dtype=torch.bool)
        tail = torch.zeros_like(content)
        gamma = torch.zeros(hidden.shape[0], 1)
    else:
        masks = [model.content_mask(p) for p in prompts]
        content, tail = torch.stack(masks), torch.stack([model.tail_mask(p) for p in prompts])
        ids = torch.stack([model.padded_ids(p) for p in prompts])
        if lexical:
            compare = model.lexical(ids)
        if open_tail:  # the tail opens as far as the whole prompt does
            raw = token_similarity(compare, masks, c_embeds, c_masks)
            overlap = torch.tensor([[token_overlap(model.token_ids(p), c_ids[0])] for p in prompts])
            gamma = torch.maximum(calibrated(raw, torch.tensor([calibration.zero]),
                                             torch.tensor([calibration.one])), overlap)
        else:
            gamma = torch.zeros(len(prompts), 1)
    gate = token_gate(compare, content, tail, gamma, c_embeds, c_masks, [calibration], ids, c_ids,
                      [spread and prompts is not None])
    return gate[..., 0].to(hidden.device)


def content_cosine(prompt_embeds: torch.Tensor, prompt_masks: Sequence[torch.Tensor | None],
                   concept_embeds: torch.Tensor, concept_masks: Sequence[torch.Tensor],
                   threshold: float) -> torch.Tensor:
    """Calibrated similarity: cosine of the mean embeddings of content tokens only (start, end and padding
    positions left out), mapped linearly from [threshold, 1] to [0, 1].

    The paper's cosine of whole flattened embeddings is high for any two prompts padded to the same
    length (their padding positions look alike); pooling content positions removes that floor.
    Rows whose mask is unknown (``None``) get the paper's cosine.
    """
    def pooled(embeds, masks):
        rows = []
        for e, m in zip(embeds, masks):
            m = m.to(e.device, e.dtype).unsqueeze(-1)
            rows.append((e * m).sum(0) / m.sum().clamp(min=1))
        return torch.stack(rows)

    known = [m is not None for m in prompt_masks]
    score = cosine_matrix(prompt_embeds, concept_embeds)
    if any(known):
        idx = [i for i, k in enumerate(known) if k]
        pooled_prompts = pooled(prompt_embeds[idx].float(), [prompt_masks[i] for i in idx])
        cos = cosine_matrix(pooled_prompts, pooled(concept_embeds.float(), concept_masks))
        score[idx] = ((cos - threshold) / (1 - threshold)).clamp(0, 1)
    return score


def permeability(prompt_embeds: torch.Tensor, prompt_ids: Sequence[set[int] | None],
                 concept_embeds: torch.Tensor, concept_ids: Sequence[set[int]], owners: Sequence[int],
                 num_membranes: int, facilitate: float = 1.0, *, similarity: str = "paper",
                 prompt_masks: Sequence[torch.Tensor | None] | None = None,
                 concept_masks: Sequence[torch.Tensor] | None = None, threshold: float = 0.85,
                 calibration: Sequence[Calibration] | None = None, prompt_lexical: torch.Tensor | None = None,
                 concept_lexical: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, membranes]`` permeabilities. ``owners[c]`` is the membrane that erased concept ``c``.

    ``similarity="paper"``: cosine of the flattened embeddings; ``"content"``: ``content_cosine``;
    ``"token"``: ``token_similarity`` mapped by each concept's ``calibration`` (zero and one points; by
    default ``threshold`` and 1), in the similarity the calibration names (contextual embeddings, or
    ``prompt_lexical`` against ``concept_lexical`` for ``"lexical"`` ones); ``"lexical"``: every concept on
    the lexical embeddings. All but ``"paper"`` need the token masks. A prompt whose tokens are unknown
    (``None``) is scored by the paper's whole-embedding cosine alone.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r} is not one of {list(SIMILARITIES)}")
    masks = prompt_masks or [None] * len(prompt_ids)
    if similarity == "content":
        score = content_cosine(prompt_embeds, masks, concept_embeds, concept_masks, threshold)
    elif similarity in PER_TOKEN:
        cal = (list(calibration) if calibration is not None
               else [Calibration(threshold, 1.0, similarity)] * len(concept_ids))
        zero = torch.tensor([c.zero for c in cal])
        one = torch.tensor([c.one for c in cal])
        spaces = [c.similarity if similarity == "token" else "lexical" for c in cal]
        raw = per_token_similarity(prompt_embeds, prompt_lexical, masks, concept_embeds, concept_lexical,
                                   concept_masks, spaces)
        score = calibrated(raw, zero, one).to(prompt_embeds.device)
        unknown = torch.isnan(raw).any(dim=1)
        if unknown.any():
            score[unknown] = cosine_matrix(prompt_embeds[unknown], concept_embeds)
    else:
        score = cosine_matrix(prompt_embeds, concept_embeds)
    overlap = torch.tensor(
        [[token_overlap(ids, cids) if ids is not None else 0.0 for cids in concept_ids] for ids in prompt_ids],
        dtype=score.dtype, device=score.device,
    ).reshape(score.shape)
    score = torch.maximum(score, overlap)
    gamma = torch.zeros(score.shape[0], num_membranes, device=score.device)
    owner = torch.as_tensor(list(owners), device=score.device)
    gamma = gamma.scatter_reduce(1, owner.expand(score.shape[0], -1), score, reduce="amax", include_self=False)
    return facilitate * gamma


class MembraneHandle:
    """Membranes equipped on a pipeline. ``remove()`` (or leaving the ``with`` block) restores it."""

    def __init__(self, pipe, membranes: Sequence[Membrane], *, transport: bool = True,
                 facilitate: float = 1.0, scales: Sequence[float] | None = None, similarity: str = "token",
                 threshold: float = 0.85, scaling: str = "linear"):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity {similarity!r} is not one of {list(SIMILARITIES)}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling {scaling!r} is not one of {list(SCALINGS)}")
        self.pipe = pipe
        self.scaling = scaling
        # the paper's token overlap counts every non-special token; the other similarities content tokens only
        self.content_only = similarity != "paper"
        self.membranes = list(membranes)
        self.transport = transport
        self.facilitate = facilitate
        self.similarity = similarity
        self.threshold = threshold
        self.model = ModelAdapter(pipe)
        self.scales = torch.tensor(list(scales) if scales is not None else [1.0] * len(self.membranes))
        if self.scales.numel() != len(self.membranes):
            raise ValueError(f"got {self.scales.numel()} scales for {len(self.membranes)} membranes")
        self.bank = MembraneBank.from_membranes(pipe.unet, self.membranes)
        self.last_permeability: torch.Tensor | None = None
        self._hooks = []
        self._rows: deque = deque(maxlen=256)
        self._calls = 0  # text-encoder calls seen, to tell a CFG batch's negative half from its prompts
        self._memo = None
        self._warned_unknown = False
        try:
            if transport:
                self._setup_concepts()
                self._hooks.append(pipe.text_encoder.register_forward_hook(self._record_tokens, with_kwargs=True))
                self._hooks.append(pipe.unet.register_forward_pre_hook(self._open, with_kwargs=True))
            else:
                self.bank.set_permeability(self.scales.to(self.model.device).unsqueeze(0))
                self.last_permeability = self.scales.unsqueeze(0)
        except BaseException:
            self.remove()  # a failed set-up leaves the pipeline as it was
            raise

    def _setup_concepts(self) -> None:
        prompts, owners, calibration = [], [], []
        default = Calibration(self.threshold)
        for i, m in enumerate(self.membranes):
            concepts = list(m.concepts) or [m.name]
            prompts += concepts
            owners += [i] * len(concepts)
            cal = Calibration.from_membrane(m, default)
            if self.similarity == "lexical" and cal.similarity != "lexical":
                cal = Calibration(self.threshold, 1.0, "lexical")  # its points hold for another similarity
            calibration += [cal] * len(concepts)
        self.concept_prompts = prompts
        self.concept_owner = owners
        self.calibration = calibration
        self.gated = torch.tensor([m.extra.get(GATE_KEY) in GATED for m in self.membranes])
        # a "word" membrane keeps the summary positions closed (read for gated membranes only)
        self.tail_open = torch.tensor([float(opens_tail(m.extra.get(GATE_KEY))) for m in self.membranes])
        self.spread = [spreads(self.membranes[i].extra.get(GATE_KEY)) for i in owners]
        self.concept_embeds = self.model.encode(prompts).hidden.float()
        self.concept_ids = [self.model.token_ids(p, self.content_only) for p in prompts]
        self.concept_masks = [self.model.content_mask(p, self.content_only) for p in prompts]
        self.spaces = [c.similarity for c in calibration]
        self.concept_lexical = (self.model.lexical_of(prompts).to(self.concept_embeds.device)
                                if "lexical" in self.spaces else None)

    def _prompt_lexical(self, hidden: torch.Tensor, found) -> torch.Tensor | None:
        """``[B, T, D]`` lexical embeddings of the batch's prompts from their recorded token ids (zeros for
        rows whose tokens are unknown); ``None`` when no membrane is scored on them."""
        if self.concept_lexical is None:
            return None
        pad = torch.zeros(hidden.shape[1], dtype=torch.long)
        ids = torch.stack([f[4] if f[4] is not None and f[4].shape[0] == hidden.shape[1] else pad for f in found])
        return self.model.lexical(ids).to(hidden.device)

    # -- hooks -----------------------------------------------------------------------------
    def _record_tokens(self, module, args, kwargs, output) -> None:
        """Remember which token ids produced which text-encoder rows, to score token overlap later."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return
        candidates = [output[0]]
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None:
            candidates.append(hidden_states[-2])
        special = torch.tensor(sorted(self.model.ignored_ids(self.content_only)), device=input_ids.device)
        tails = tail_positions(input_ids, self.pipe.tokenizer.eos_token_id).cpu()
        self._calls += 1
        for r in range(input_ids.shape[0]):
            mask = ~torch.isin(input_ids[r], special)
            ids = set(input_ids[r][mask].tolist())
            self._rows.append((ids, mask.cpu(), [c[r].detach() for c in candidates], self._calls, tails[r],
                               input_ids[r].cpu()))

    def _tokens_of(self, row: torch.Tensor) -> tuple:
        """Token ids, content mask, text-encoder call number, end-of-text positions and the ids by position of
        the latest encoding equal to ``row`` (all None when none is)."""
        for ids, mask, candidates, call, tail, positions in reversed(self._rows):
            for cand in candidates:
                width = cand.shape[-1]
                if cand.shape == row[..., :width].shape and torch.equal(cand.to(row.dtype), row[..., :width]):
                    return ids, mask, call, tail, positions
        return None, None, None, None, None

    def _cfg_pairs(self, hidden: torch.Tensor, calls: list[int | None]) -> bool:
        """Whether the batch is ``[negative half, prompt half]`` of classifier-free guidance.

        Diffusers pipelines encode the prompts, then (only when guiding) the negative prompts, and pass
        ``cat([negative, prompt])``. So: every pair whose negative row was encoded after its prompt row (or
        equals it) makes a CFG batch; a batch encoded by one text-encoder call has no negative half. Any
        other batch (rows encoded elsewhere, SDXL's zeroed negatives, embeddings cached in another
        order) is read by the pipeline's own guidance flag."""
        half = len(calls) // 2
        if half == 0 or len(calls) % 2:
            return False
        if None not in calls:
            if all(calls[b] > calls[half + b] or torch.equal(hidden[b], hidden[half + b]) for b in range(half)):
                return True
            if len(set(calls)) == 1:
                return False
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:
            return False

    def _open(self, module, args, kwargs):
        hidden = kwargs.get("encoder_hidden_states")
        if hidden is None and len(args) > 2:
            hidden = args[2]
        if hidden is None:
            self.bank.set_permeability(None)
            return None
        # a pipeline passes the same embedding tensor at every denoising step: score it once
        if (self._memo is not None and self._memo[0] is hidden and self._memo[1] == hidden._version
                and self._memo[3] == self._calls):
            self.bank.set_permeability(*self._memo[2])
            return None
        found = [self._tokens_of(hidden[b]) for b in range(hidden.shape[0])]
        cfg_pairs = self._cfg_pairs(hidden, [f[2] for f in found])
        unknown = [b for b, f in enumerate(found) if f[0] is None and not (cfg_pairs and b < len(found) // 2)]
        if unknown and self.similarity != "paper" and not self._warned_unknown:
            logger.warning("transport: %d prompt embedding(s) did not come from this pipeline's text encoder "
                           "(embeddings passed in or reweighted), so their tokens are unknown and their "
                           "permeability is the paper's whole-embedding cosine, not the content similarity",
                           len(unknown))
            self._warned_unknown = True
        gamma = self._score(hidden, found)
        if cfg_pairs:
            # the unconditional half of a CFG batch follows its prompt, as in the paper's sampler
            half = hidden.shape[0] // 2
            gamma = torch.cat([gamma[half:], gamma[half:]])
        tokens = self._token_permeability(hidden, found, gamma) if bool(self.gated.any()) else None
        self.last_permeability = gamma.detach().cpu()
        self._memo = (hidden, hidden._version, (gamma, tokens), self._calls)
        self.bank.set_permeability(gamma, tokens)
        return None

    def _score(self, hidden: torch.Tensor, found) -> torch.Tensor:
        gamma = permeability(hidden, [f[0] for f in found], self.concept_embeds, self.concept_ids,
                             self.concept_owner, len(self.membranes), self.facilitate, similarity=self.similarity,
                             prompt_masks=[f[1] for f in found], concept_masks=self.concept_masks,
                             threshold=self.threshold, calibration=self.calibration,
                             prompt_lexical=self._prompt_lexical(hidden, found), concept_lexical=self.concept_lexical)
        if self.scaling == "official":
            gamma = gamma.pow(2)  # the official code scales both factors of the membrane by gamma
        return gamma * self.scales.to(gamma.device)

    def _token_permeability(self, hidden: torch.Tensor, found, gamma: torch.Tensor) -> torch.Tensor:
        """``[B, T, membranes]``: gated membranes per token (``token_gate``), the others (and rows whose
        tokens are unknown) at their per-prompt ``gamma`` on every token."""
        tokens = gamma.unsqueeze(1).expand(-1, hidden.shape[1], -1).clone()
        rows = [b for b, f in enumerate(found) if f[1] is not None and f[3] is not None]
        if not rows:
            return tokens
        content = torch.stack([found[b][1] for b in rows])
        tail = torch.stack([found[b][3] for b in rows])
        ids = torch.stack([found[b][4] for b in rows])
        owner = torch.as_tensor(self.concept_owner, device=gamma.device)
        # the tail is set below from the final per-membrane permeability
        lexical = self._prompt_lexical(hidden, [found[b] for b in rows])
        per_concept = torch.zeros(len(rows), hidden.shape[1], len(owner), device=hidden.device)
        for name, prompts, concepts in (("token", hidden[rows], self.concept_embeds),
                                        ("lexical", lexical, self.concept_lexical)):
            cols = [c for c, space in enumerate(self.spaces) if space == name]
            if cols:
                per_concept[:, :, cols] = token_gate(
                    prompts, content, tail, torch.ones(len(rows), len(cols)), concepts[cols],
                    [self.concept_masks[c] for c in cols], [self.calibration[c] for c in cols], ids,
                    [self.concept_ids[c] for c in cols], [self.spread[c] for c in cols]).to(per_concept.device)
        per_concept = (self.facilitate * per_concept).to(gamma.device)
        if self.scaling == "official":
            per_concept = per_concept.pow(2)
        per_concept = per_concept * self.scales.to(gamma.device).index_select(0, owner)
        gated = torch.zeros(len(rows), hidden.shape[1], len(self.membranes), device=gamma.device)
        gated = gated.scatter_reduce(2, owner.expand(*per_concept.shape[:2], -1), per_concept, reduce="amax",
                                     include_self=False)
        # the tail positions follow the prompt's own (final) permeability, or stay closed ("word")
        tail_gamma = gamma[rows] * self.tail_open.to(gamma.device)
        if self.scaling == "shared":
            # fully open membranes on the prompt, counted in units of `facilitate`: beyond one, they share
            opened = gamma[rows].sum(dim=1, keepdim=True) / max(self.facilitate, 1e-12)
            tail_gamma = tail_gamma / opened.clamp(min=1.0)
        gated = torch.where(tail.to(gamma.device).unsqueeze(-1), tail_gamma.unsqueeze(1), gated)
        use = self.gated.to(gamma.device)
        tokens[rows] = torch.where(use, gated, tokens[rows])
        return tokens

    @torch.no_grad()
    def prompt_permeability(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), membranes]``: how far each prompt would open each membrane (scales applied),
        from the text encoder alone. A membrane at 0 leaves that prompt's generation exactly as the base's."""
        if not self.transport:
            return self.scales.unsqueeze(0).expand(len(prompts), -1).clone()
        hidden = self.model.encode(list(prompts)).hidden
        return self._score(hidden, [self._tokens_of(hidden[b]) for b in range(hidden.shape[0])]).cpu()

    # -- lifetime --------------------------------------------------------------------------
    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._memo = None
        self.bank.detach()

    def __enter__(self) -> "MembraneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_membranes(pipe, membranes: Sequence[Membrane], *, transport: bool = True, facilitate: float = 1.0,
                    scales: Sequence[float] | None = None, similarity: str = "token",
                    threshold: float = 0.85, scaling: str = "linear") -> MembraneHandle:
    """Equip ``pipe`` with ``membranes``; with ``transport`` each opens per prompt by facilitated transport.

    Without transport every membrane is fully open (times its scale) for every prompt. ``similarity``
    picks the permeability's similarity (module docstring): ``"token"`` (default; each membrane's calibrated
    similarity with its zero and one points from its header, ``threshold`` as the zero point of membranes
    without one), ``"lexical"`` (every membrane on the input token embeddings; the points of membranes
    calibrated for another similarity are ``threshold`` and 1),
    ``"content"`` (``threshold`` is its zero point) or the paper's ``"paper"``. ``scaling="official"``
    applies gamma squared, as the official inference code does. On ToyWorld the paper's similarity opened
    membranes to 0.92 for unrelated prompts and counted "a" as a shared token (docs/erasure.md).
    """
    problem = number_problem("facilitate", facilitate, minimum=0)
    if problem:
        raise ConfigError("transport", [problem])
    return MembraneHandle(pipe, membranes, transport=transport, facilitate=facilitate, scales=scales,
                          similarity=similarity, threshold=threshold, scaling=scaling)


@torch.no_grad()
def calibrate_transport(pipe, concepts: Sequence[str], corpus, *, limit: int = 256,
                        quantile: float = 0.99, margin: float = 0.01, similarity: str = "token") -> Calibration:
    """Zero and one points of the per-token ``similarity`` (``"token"`` or ``"lexical"``) for a membrane
    erasing ``concepts``, from the text encoder of ``pipe`` and a caption corpus
    (``spm_train.prompts.PromptCorpus``).

    ``zero``: the ``quantile`` of the scores of captions that mention none of the concepts, plus
    ``margin``: unrelated prompts leave the membrane closed. ``one``: the median score of captions that
    mention a concept (its other phrasings), at least ``zero + margin``: a typical phrasing opens it fully.
    """
    if similarity not in PER_TOKEN:
        raise ValueError(f"calibrated similarity {similarity!r} is not one of {list(PER_TOKEN)}")
    model = ModelAdapter(pipe)
    concepts = list(concepts)
    phrasings = [p for c in concepts for p in corpus.phrasings(c, limit)]
    unrelated = corpus.unrelated(concepts, limit)
    if not unrelated:
        raise ValueError(f"the corpus {corpus.source!r} has no caption without {concepts}: cannot calibrate")
    def view(prompts: list[str]) -> torch.Tensor:
        return model.lexical_of(prompts) if similarity == "lexical" else model.encode(prompts).hidden.float()

    c_embeds = view(concepts)
    c_masks = [model.content_mask(c) for c in concepts]

    def best(prompts: list[str]) -> torch.Tensor:
        scores = []
        for lo in range(0, len(prompts), 64):
            chunk = prompts[lo:lo + 64]
            raw = token_similarity(view(chunk), [model.content_mask(p) for p in chunk], c_embeds, c_masks)
            scores.append(raw.max(dim=1).values)
        return torch.cat(scores)

    zero = float(torch.quantile(best(unrelated), quantile)) + margin
    one = float(torch.quantile(best(phrasings), 0.5)) if phrasings else 1.0
    one = min(max(one, zero + margin), 1.0)
    zero = min(zero, one - margin)
    logger.info("%s transport calibration of %s: zero %.3f, one %.3f (%d phrasings, %d unrelated captions)",
                similarity, concepts, zero, one, len(phrasings), len(unrelated))
    return Calibration(zero, one, similarity)
