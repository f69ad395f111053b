"""Latent-anchoring fine-tunes of a *pack* of membranes on one frozen base model.

Every UNet call carries the samples of all K concepts of the pack, each sample routed to its own
concept's membrane. Each concept draws its randomness from its own generators (seeded from the
trainer seed and the concept's name), its loss and its gradient clipping are its own, and AdamW
is element-wise: a pack therefore trains every membrane to the weights K separate runs would
reach. K = 1 is the paper's algorithm.

Per iteration and concept (Lyu et al. 2024):

1. ``t_to ~ U[1, T)``; denoise pure noise for ``t_to`` DDIM steps, membrane on, CFG on the target.
2. At the matching 1000-step timestep ``t``, with the membrane off: ``eps(positive)``,
   ``eps(neutral)``, ``eps(anchor_j)``; with it on: ``eps(target)``, ``eps(anchor_j)``.
3. ``L = MSE(eps_on(target), eps(neutral) - g (eps(positive) - eps(neutral)))
   + lambda * MSE(eps_on(anchors), eps_off(anchors))``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.profiler import record_function
from tqdm.auto import tqdm

from . import io
from .config import ConceptSpec, TrainerConfig
from .errors import ConfigError, TrainingDivergedError
from .membrane import Membrane, MembraneBank, layout_id
from .models import ModelAdapter, PromptEmbeds, base_fingerprint
from .parallel import DEEPSPEED_MISSING, average_gradients, deepspeed_available, pack_accelerator
from .sampling import DDIMSchedule

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "spm-pack-checkpoint-1"


def concept_seed(seed: int, name: str) -> int:
    """A per-concept seed: the same concept draws the same numbers alone or in any pack."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_anchors(target: torch.Tensor, count: int, generator: torch.Generator,
                   scale_range: tuple[float, float], pool: int = 4) -> torch.Tensor:
    """Anchor embeddings for latent anchoring, drawn without a host round-trip.

    Gaussian noise shaped like ``target``, normalised, kept with probability ``1 - cos(target, noise)``,
    rescaled to ``|target| * U(lo, hi)``. Candidates are drawn ``pool`` times over and the first
    ``count`` accepted ones are kept (in high dimension nearly all are accepted).
    """
    shape = target.shape
    dtype = torch.promote_types(torch.float32, target.dtype)
    flat_target = target.reshape(-1).to(dtype)
    norm = flat_target.norm()
    candidates = torch.randn((count * pool, flat_target.numel()), generator=generator,
                             device=target.device, dtype=dtype)
    candidates = candidates / candidates.norm(dim=1, keepdim=True)
    cosine = candidates @ (flat_target / norm)
    accepted = torch.rand(count * pool, generator=generator, device=target.device, dtype=dtype) < (1 - cosine)
    # rank accepted candidates first, keeping draw order inside each group
    order = torch.argsort((~accepted).float() * (count * pool) + torch.arange(count * pool, device=target.device))
    chosen = candidates[order[:count]]
    lo, hi = scale_range
    scale = norm * (lo + (hi - lo) * torch.rand(count, generator=generator, device=target.device, dtype=dtype))
    return (chosen * scale.unsqueeze(1)).reshape(count, *shape).to(target.dtype)


@dataclass
class _Concept:
    spec: ConceptSpec
    host_rng: torch.Generator
    rng: torch.Generator
    target: PromptEmbeds
    positive: PromptEmbeds
    neutral: PromptEmbeds
    num_anchors: int  # anchors per iteration in all: sampled embeddings and real prompts
    pick_rng: torch.Generator | None = None  # picks phrasings and prompt anchors, apart from the paper's draws
    num_random: int = 0  # of which sampled embeddings (the paper's anchors)
    num_phrasings: int = 0  # other phrasings of the target per iteration
    phrasing_pos: PromptEmbeds | None = None  # pool of phrasings
    phrasing_neu: PromptEmbeds | None = None  # each phrasing without the concept's words
    anchor_pool: PromptEmbeds | None = None  # pool of real prompts that do not mention the concept
    phrasing_prompts: list[str] = field(default_factory=list)
    anchor_prompts: list[str] = field(default_factory=list)
    calibration: object | None = None  # transport calibration (spm_train.transport.Calibration), when known
    gate_reference: tuple | None = None  # the concept's encoding for token gates (transport.concept_reference)
    target_tail: torch.Tensor | None = None  # [1, tokens]: end-of-text and padding positions (tail_penalty)
    phrasing_tail: torch.Tensor | None = None  # [pool, tokens], as phrasing_pos

    @property
    def erase_rows(self) -> int:
        """Membrane-on erase samples per batch element: the target and its phrasings."""
        return 1 + self.num_phrasings


class _TailEnergy:
    """Per membrane-on row, the relative energy of the membranes' edit of cross-attention keys and values at
    the positions ``mask`` marks: ``sum |delta|^2 / sum |base|^2`` over those positions, averaged over the
    layers that read the prompt (``TrainerConfig.tail_penalty``). Forward hooks, so every routing path of the
    bank (gathered, one-hot, DeepSpeed) is measured alike; nothing is hooked when ``mask`` is None."""

    def __init__(self, bank, mask: torch.Tensor | None):
        self.mask, self.hooks, self.parts = mask, [], []
        self.layers = [layer for layer in bank.layers.values() if layer.reads_text] if mask is not None else []
        self.window: torch.Tensor | None = None
        self.base: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "_TailEnergy":
        for layer in self.layers:  # the base projection's own output, so nothing is computed twice
            self.hooks.append(layer.base_layer.register_forward_hook(self._keep_base))
            self.hooks.append(layer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.parts, self.base = [], [], {}

    def rows(self, lo: int, hi: int) -> None:
        self.window = None if self.mask is None else self.mask[lo:hi]
        self.parts, self.base = [], {}

    def _keep_base(self, base_layer, args, output) -> None:
        self.base[id(base_layer)] = output

    def _hook(self, layer, args, output) -> None:
        base = self.base.pop(id(layer.base_layer), None)
        if base is None or self.window is None or base.dim() != 3 or base.shape[:2] != self.window.shape:
            return
        base = base.detach().float()
        m = self.window.to(base.device, torch.float32)
        delta = output.float() - base
        energy = (delta.pow(2).sum(-1) * m).sum(-1) / (base.pow(2).sum(-1) * m).sum(-1).clamp(min=1e-12)
        self.parts.append(energy)

    def collect(self) -> torch.Tensor:
        if not self.parts:
            raise RuntimeError("tail_penalty: no layer that reads the prompt was called on the membrane-on batch")
        out = torch.stack(self.parts).mean(0)
        self.parts = []
        return out


@dataclass
class TrainingResult:
    membranes: list[Membrane]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0

    def final_losses(self) -> dict[str, dict]:
        last: dict[str, dict] = {}
        for row in self.history:
            last[row["concept"]] = row
        return last


class PackTrainer:
    """Trains one membrane per concept, all concepts of the pack in shared UNet batches."""

    # Where each concept-iteration's trajectory length comes from: None, the concept's own generator; a
    # callable returning the next length lets a benchmark train every path on the same lengths.
    trajectory_lengths: Callable[[], int] | None = None

    def __init__(self, pipe, concepts: Sequence[ConceptSpec], trainer: TrainerConfig, *,
                 checkpoint_dir: str | None = None, callback: Callable[[int, list[dict]], None] | None = None,
                 progress: bool = True, deepspeed: dict | None = None,
                 on_checkpoint: Callable[[int, str], None] | None = None):
        self.cfg = trainer
        self.checkpoint_dir = checkpoint_dir
        self.callback = callback
        # after each checkpoint, on every rank (the url on rank 0, "" elsewhere): Ray Train's report
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        self.ds_config = deepspeed
        self.engine = None
        if deepspeed is not None:
            if not deepspeed_available():
                raise ConfigError("trainer", [f"a DeepSpeed config was given: {DEEPSPEED_MISSING}"])
            _init_deepspeed_process_group()
        self._setup_concepts(concepts)
        try:
            self._setup_model(pipe)
            self._setup_accelerator()
            self._setup_bank()
            self._setup_prompts()
            self._setup_layout()
            self._setup_optimizer()
            self._setup_memory_format()
            self._setup_weight_noise()
        except BaseException:
            # all or nothing: membranes left attached to a cached base would fail every later pack on it
            # ("already carries membranes") and hide this error, the real cause
            self.close()
            raise
        self.step = 0
        self.history: list[dict] = []

    # -- setup ---------------------------------------------------------------------------
    def _setup_concepts(self, concepts: Sequence[ConceptSpec]) -> None:
        concepts = list(concepts)
        if not concepts:
            raise ConfigError("pack", ["the concept list is empty"])
        names = [c.name for c in concepts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("pack", [f"concept names must be unique, repeated: {dupes}"])
        self.specs = concepts

    def _setup_model(self, pipe) -> None:
        self.model = ModelAdapter(pipe)
        self.unet = pipe.unet
        self.device = self.model.device
        # membranes, latents and losses are fp32 at least (fp64 on an fp64 base)
        self.compute_dtype = torch.promote_types(torch.float32, self.unet.dtype)
        # restored by close(): which parameters wanted gradients, and train/eval mode
        self._unet_state = ({name for name, p in self.unet.named_parameters() if p.requires_grad},
                            self.unet.training)
        self.unet.requires_grad_(False)
        self.unet.eval()
        self.fingerprint = base_fingerprint(self.unet)
        self.layout = layout_id(self.unet, self.cfg.scope)
        self.schedule = DDIMSchedule.from_scheduler_config(pipe.scheduler.config)
        self.trajectory = self.schedule.timesteps(self.cfg.max_denoising_steps)
        self.resolution = self.cfg.resolution or self.model.default_resolution()
        self.latent_shape = self.model.latent_shape(self.resolution)
        if self.cfg.compile:
            # Each pack traces its own graphs (routing modes, K): a fresh cache per pack keeps a process that
            # trains many packs under Dynamo's recompile limit, past which it would silently run eager.
            # Sizes other than the batch never change: automatic dynamic shapes mark the batch alone.
            torch._dynamo.reset()
            self.model.call_unet = torch.compile(self.unet)

    def _setup_accelerator(self) -> None:
        """Rank, world size, mixed precision and collectives from accelerate (see ``parallel``)."""
        self.accelerator = pack_accelerator(self.device, self.cfg.precision)
        self.worker_rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes

    def _setup_bank(self) -> None:
        seeds = [concept_seed(self.cfg.seed, s.name) for s in self.specs]
        # every rank starts from the same membrane; each rank then draws its own trajectories and anchors
        init_rngs = [torch.Generator().manual_seed(s ^ 0x5EED) for s in seeds]
        if self.world_size > 1:
            seeds = [concept_seed(self.cfg.seed, f"{s.name}#rank{self.worker_rank}") for s in self.specs]
        dtype = self.compute_dtype
        self.bank = MembraneBank.attach(self.unet, count=len(self.specs), rank=self.cfg.rank,
                                        alpha=self.cfg.alpha, scope=self.cfg.scope, generators=init_rngs,
                                        dtype=dtype)
        self.seeds = seeds

    def _setup_prompts(self) -> None:
        cfg = self.cfg
        prompts = []
        for spec in self.specs:
            prompts += [spec.target, spec.positive_prompt, spec.neutral_prompt]
        embeds = self.model.encode(prompts + [""])
        self.uncond = embeds.index(slice(len(prompts), len(prompts) + 1))
        if cfg.gate != "none":
            # the unconditional half of a trajectory's CFG batch follows the target: open on its tail
            # ("token"), closed ("word": the empty prompt holds no concept token)
            from .transport import opens_tail

            tail = self.model.tail_mask("").float().unsqueeze(0)
            self.uncond = self.uncond.with_gate(tail if opens_tail(cfg.gate) else torch.zeros_like(tail))
        corpus = self.corpus = self._corpus()
        self.concepts = []
        for i, (spec, seed) in enumerate(zip(self.specs, self.seeds)):
            rows = [embeds.index(slice(3 * i + j, 3 * i + j + 1)) for j in range(3)]
            anchoring = spec.uses_anchoring and cfg.la_strength > 0
            concept = _Concept(
                spec=spec,
                host_rng=torch.Generator().manual_seed(seed),
                rng=torch.Generator(device=self.device).manual_seed(seed),
                target=rows[0], positive=rows[1], neutral=rows[2],
                num_anchors=0, num_random=cfg.anchors_per_step if anchoring else 0,
                pick_rng=torch.Generator().manual_seed(seed ^ 0xC0A5),
            )
            if corpus is not None:
                self._setup_corpus_prompts(concept, corpus, anchoring)
            if cfg.gate != "none":
                self._setup_gates(concept)
            concept.num_anchors = concept.num_random + (cfg.prompt_anchors if concept.anchor_pool is not None else 0)
            self.concepts.append(concept)

    def _setup_gates(self, concept: _Concept) -> None:
        """Token gates of a gated membrane's prompts, as ``apply_membranes`` will open it: the target and
        its phrasings on the concept's tokens and tail, real prompt anchors as far as they are close."""
        from .transport import (Calibration, calibrate_transport, concept_reference, opens_tail, prompt_gates,
                                spreads)

        spec = concept.spec
        similarity = self.cfg.similarity
        concept.calibration = (calibrate_transport(self.model.pipe, [spec.target], self.corpus, similarity=similarity)
                               if self.cfg.calibrate else Calibration(similarity=similarity))
        concept.gate_reference = concept_reference(self.model, spec.target, similarity)

        def gated(embeds: PromptEmbeds, prompts: list[str]) -> PromptEmbeds:
            return embeds.with_gate(prompt_gates(self.model, prompts, embeds.hidden, spec.target, concept.calibration,
                                                 concept.gate_reference, open_tail=opens_tail(self.cfg.gate),
                                                 spread=spreads(self.cfg.gate)))

        concept.target = gated(concept.target, [spec.target])
        if concept.phrasing_pos is not None:
            concept.phrasing_pos = gated(concept.phrasing_pos, concept.phrasing_prompts)
        if self.cfg.tail_penalty:
            dev = concept.target.hidden.device
            concept.target_tail = self.model.tail_mask(spec.target).unsqueeze(0).to(dev)
            if concept.phrasing_pos is not None:
                concept.phrasing_tail = torch.stack([self.model.tail_mask(p) for p in concept.phrasing_prompts]).to(dev)
        if concept.anchor_pool is not None:
            concept.anchor_pool = gated(concept.anchor_pool, concept.anchor_prompts)

    def _corpus(self):
        if not (self.cfg.phrasings or self.cfg.prompt_anchors or self.cfg.calibrate):
            return None
        from .prompts import PromptCorpus

        return PromptCorpus.load(self.cfg.corpus, size=self.cfg.corpus_size, seed=self.cfg.seed)

    def _setup_corpus_prompts(self, concept: _Concept, corpus, anchoring: bool, pool: int = 256) -> None:
        """Encode the concept's pools once: its phrasings (each with the concept's words replaced by the
        neutral prompt, or by a surrogate's own words: "a circle here" -> "a square here") and real prompts
        that mention no concept of the pack."""
        from .prompts import concept_words

        spec, cfg = concept.spec, self.cfg
        if cfg.phrasings:
            found = [p for p in corpus.phrasings(spec.target, pool) if p.strip() != spec.target.strip()]
            if found:
                swap = spec.neutral_prompt
                if spec.surrogate is not None:
                    swap = " ".join(concept_words(spec.surrogate))
                neutral = [corpus.replace(p, spec.target, swap) for p in found]
                concept.phrasing_pos = self.model.encode(found)
                concept.phrasing_neu = self.model.encode(neutral)
                concept.phrasing_prompts = found
                concept.num_phrasings = cfg.phrasings
            else:
                logger.warning("concept %s: the corpus %s has no other phrasing of %r; training on the target "
                               "prompt alone", spec.name, corpus.source, spec.target)
        if cfg.prompt_anchors and anchoring:
            unrelated = corpus.unrelated([s.target for s in self.specs], pool)
            if unrelated:
                concept.anchor_pool = self.model.encode(unrelated)
                concept.anchor_prompts = unrelated
            else:
                logger.warning("concept %s: the corpus %s has no prompt without the pack's concepts; no prompt "
                               "anchors", spec.name, corpus.source)

    def _setup_layout(self) -> None:
        """Per-sample constants of the membrane-on batch, built once on the device: which membrane each
        sample trains (``owner``), its loss weight, and its slot in the per-concept [erase, anchor] sums."""
        cfg, dev, B = self.cfg, self.device, self.cfg.batch_size
        numel = math.prod(self.latent_shape)
        owner, weight, kind, divisor = [], [], [], []
        for k, c in enumerate(self.concepts):
            na, ne = c.num_anchors, B * c.erase_rows
            owner += [k] * (ne + na)
            weight += [1.0 / (ne * numel)] * ne + [cfg.la_strength / (max(na, 1) * numel)] * na
            kind += [0] * ne + [1] * na
            divisor.append(cfg.la_strength if na else 1.0)
        owner_t = torch.tensor(owner, device=dev)
        self.sample_layout = {
            "owner": owner_t,
            "weight": torch.tensor(weight, device=dev, dtype=self.compute_dtype),
            "slot": owner_t * 2 + torch.tensor(kind, device=dev),
            "anchor_divisor": torch.tensor(divisor, device=dev, dtype=self.compute_dtype),
            "anchor_rows": {na: torch.arange(na, device=dev) % B for na in {c.num_anchors for c in self.concepts}},
        }

    def _setup_memory_format(self) -> None:
        """Channels-last on request, as the last setup step (a failed setup leaves the UNet as it was);
        ``close`` undoes only what this did."""
        convs = [m.weight for m in self.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        already = bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        self.made_channels_last = self.cfg.channels_last and not already
        if self.made_channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def _setup_weight_noise(self) -> None:
        """A clean copy of every frozen UNet tensor, which each iteration perturbs and restores."""
        self.noisy: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        if not self.cfg.weight_noise:
            return
        if self.engine is not None and self.zero_stage == 3:
            raise ConfigError("trainer config", ["weight_noise needs the whole base on each device; ZeRO stage 3 "
                                                 "partitions it (use stage 2 or weight_noise 0)"])
        own = {id(p) for p in self.bank.parameters()}
        for p in self.unet.parameters():
            if id(p) in own or not p.is_floating_point():
                continue
            clean = p.detach().clone()
            self.noisy.append((p, clean, float(clean.float().pow(2).mean().sqrt())))

    @contextlib.contextmanager
    def _perturbed_base(self):
        """The base with this iteration's weight noise (from the seed, the step and the rank, so a resumed
        run draws what an uninterrupted one would), restored exactly afterwards, also on errors."""
        if not self.noisy:
            yield
            return
        g = torch.Generator(device=self.device)
        g.manual_seed(concept_seed(self.cfg.seed, f"weight_noise#{self.step}#{self.worker_rank}"))
        try:
            with torch.no_grad():
                for p, clean, rms in self.noisy:
                    noise = torch.randn(p.shape, generator=g, device=self.device, dtype=p.dtype)
                    p.copy_(clean + noise.to(p.device).mul_(self.cfg.weight_noise * rms))
            yield
        finally:
            with torch.no_grad():
                for p, clean, _ in self.noisy:
                    p.copy_(clean)

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay)
        self.lr_scheduler = get_scheduler(
            self.cfg.lr_scheduler, self.optimizer, num_warmup_steps=self.cfg.lr_warmup_steps,
            num_training_steps=self.cfg.iterations, num_cycles=self.cfg.lr_cycles,
        )
        if self.ds_config is not None:
            self._setup_deepspeed()
        else:  # fp16 on a GPU: accelerate's loss scaler steps (or skips) AdamW
            self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)

    def _setup_deepspeed(self) -> None:
        """Hand the UNet to a DeepSpeed engine: ZeRO shards what the config says (stage 3: the frozen base
        too, for bases that do not fit one device). DeepSpeed averages and clips the pack's gradients
        (one norm for the whole pack), and steps our AdamW and schedule."""
        import deepspeed

        problems = []
        if self.cfg.micro_batch:
            problems.append("micro_batch is not supported with DeepSpeed (use its gradient accumulation)")
        if problems:
            raise ConfigError("trainer config", problems)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, **self.ds_config}
        if self.cfg.max_grad_norm:
            config.setdefault("gradient_clipping", self.cfg.max_grad_norm)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.unet, model_parameters=self.bank.parameters(), optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, config=config)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))

    def _gathered(self):
        """Full membrane weights, also when ZeRO-3 partitions them."""
        if self.engine is None:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.bank.parameters(), modifier_rank=0)

    # -- one iteration ---------------------------------------------------------------------
    def _draw(self):
        """Per-concept random draws of one iteration, in a fixed order per concept."""
        cfg = self.cfg
        draws = []
        for c in self.concepts:
            t_to = (int(torch.randint(1, cfg.max_denoising_steps, (1,), generator=c.host_rng))
                    if self.trajectory_lengths is None else self.trajectory_lengths())
            noise = torch.randn((cfg.batch_size, *self.latent_shape), generator=c.rng, device=self.device,
                                dtype=self.compute_dtype)
            parts = []
            if c.num_random:
                scale = (cfg.anchor_scale_min, cfg.anchor_scale_max)
                hidden = sample_anchors(c.target.hidden[0], c.num_random, c.rng, scale)
                pooled = (None if c.target.pooled is None
                          else sample_anchors(c.target.pooled[0], c.num_random, c.rng, scale))
                if cfg.anchor_batch == "official":
                    # the official code anchors [uncond, s_j] pairs: every other anchor is the empty prompt's
                    hidden[0::2] = self.uncond.hidden[0].to(hidden.dtype)
                    if pooled is not None:
                        pooled[0::2] = self.uncond.pooled[0].to(pooled.dtype)
                sampled = PromptEmbeds(hidden, pooled)
                if c.calibration is not None:  # a gated membrane opens on sampled anchors as far as they are close
                    from .transport import prompt_gates

                    sampled = sampled.with_gate(prompt_gates(self.model, None, hidden, c.spec.target, c.calibration,
                                                             c.gate_reference))
                parts.append(sampled)
            if c.num_anchors > c.num_random:
                pick = torch.randint(len(c.anchor_pool), (c.num_anchors - c.num_random,), generator=c.pick_rng)
                parts.append(c.anchor_pool.index(pick.to(c.anchor_pool.hidden.device)))
            anchors = PromptEmbeds.cat(parts) if parts else None
            phrasings = None
            if c.num_phrasings:
                pick = torch.randint(len(c.phrasing_pos), (c.num_phrasings,), generator=c.pick_rng)
                pick = pick.to(c.phrasing_pos.hidden.device)
                phrasings = (c.phrasing_pos.index(pick), c.phrasing_neu.index(pick),
                             None if c.phrasing_tail is None else c.phrasing_tail[pick])
            draws.append((t_to, noise, anchors, phrasings))  # DDIM starts from unit-variance noise
        return draws

    @torch.no_grad()
    def _trajectories(self, draws) -> list[torch.Tensor]:
        """Run every concept's partial trajectory in shared batches (membranes on, CFG on the target)."""
        cfg = self.cfg
        latents = [d[1] for d in draws]
        t_tos = [d[0] for d in draws]
        for i in range(max(t_tos)):
            active = [k for k, t_to in enumerate(t_tos) if t_to > i]
            x = torch.cat([latents[k] for k in active])
            n = x.shape[0]
            owners = torch.cat([torch.full((cfg.batch_size,), k, dtype=torch.long, device=self.device)
                                for k in active])
            cond = PromptEmbeds.cat([self.concepts[k].target.repeat(cfg.batch_size) for k in active])
            embeds = PromptEmbeds.cat([self.uncond.repeat(n), cond])
            t = torch.full((2 * n,), self.trajectory[i], device=self.device, dtype=torch.long)
            self.bank.route(torch.cat([owners, owners]), embeds.gate)
            with self.accelerator.autocast():
                out = self.model.predict(torch.cat([x, x]), t, embeds, self.resolution)
            uncond, cond_out = out.to(self.compute_dtype).chunk(2)
            guided = uncond + cfg.trajectory_guidance * (cond_out - uncond)
            x = self.schedule.step(guided, t[:n], x, cfg.max_denoising_steps)
            for j, k in enumerate(active):
                latents[k] = x[j * cfg.batch_size:(j + 1) * cfg.batch_size]
        return latents

    def _train_step(self) -> torch.Tensor:
        cfg = self.cfg
        layout = self.sample_layout
        with record_function("spm.draw"):
            draws = self._draw()
        with record_function("spm.trajectory"):
            latents = self._trajectories(draws)
        B, dev = cfg.batch_size, self.device
        off_embeds, on_embeds = [], []
        off_x, off_t, on_x, on_t = [], [], [], []
        tails = []  # per membrane-on row: the positions tail_penalty weighs (none on anchor rows)
        for c, (t_to, _, anchors, phrasings), x in zip(self.concepts, draws, latents):
            t = self.schedule.train_timestep(t_to, cfg.max_denoising_steps)
            na, ne = c.num_anchors, B * c.erase_rows
            ax = x[layout["anchor_rows"][na]]
            ex = x.repeat(c.erase_rows, *[1] * (x.dim() - 1))
            positive, neutral, target = c.positive.repeat(B), c.neutral.repeat(B), c.target.repeat(B)
            tail = [c.target_tail.repeat_interleave(B, 0)] if c.target_tail is not None else []
            if phrasings is not None:  # phrasing j erased on every batch element: rows ordered j-major
                pos, neu = (p.repeat(B) for p in phrasings[:2])
                positive, neutral = PromptEmbeds.cat([positive, pos]), PromptEmbeds.cat([neutral, neu])
                target = PromptEmbeds.cat([target, pos])
                if tail:
                    tail.append(phrasings[2].repeat_interleave(B, 0))
            if tail:
                tails += tail + [torch.zeros(na, tail[0].shape[1], dtype=torch.bool, device=tail[0].device)]
            # membrane off: positives, neutrals, anchors
            off_x += [ex, ex, ax]
            off_embeds += [positive, neutral] + ([anchors] if na else [])
            off_t.append(torch.full((2 * ne + na,), t, dtype=torch.long, device=dev))
            # membrane on: target and phrasings, anchors
            on_x += [ex, ax]
            on_embeds += [target] + ([anchors] if na else [])
            on_t.append(torch.full((ne + na,), t, dtype=torch.long, device=dev))
        with torch.no_grad(), record_function("spm.membrane_off"):
            self.bank.set_permeability(None)
            with self.accelerator.autocast():
                off = self.model.predict(torch.cat(off_x), torch.cat(off_t), PromptEmbeds.cat(off_embeds),
                                         self.resolution).to(self.compute_dtype)
        # goals of every membrane-on sample: sum_i w_i |eps_on_i - goal_i|^2 is the pack's loss
        goals = []
        off_i = 0
        for c in self.concepts:
            na, ne = c.num_anchors, B * c.erase_rows
            pos, neu = off[off_i:off_i + ne], off[off_i + ne:off_i + 2 * ne]
            g = self._erase_guidance(c, pos)
            goals += [neu - g * (pos - neu), off[off_i + 2 * ne:off_i + 2 * ne + na]]
            off_i += 2 * ne + na
        goal, weight, owner = torch.cat(goals), layout["weight"], layout["owner"]
        x_on, t_on, e_on = torch.cat(on_x), torch.cat(on_t), PromptEmbeds.cat(on_embeds)
        n = x_on.shape[0]
        chunk = cfg.micro_batch or n
        sq = torch.zeros(n, device=dev, dtype=self.compute_dtype)
        pen = torch.zeros(n, device=dev, dtype=self.compute_dtype)  # the tail_penalty term of each row
        tail_mask = torch.cat(tails) if tails else None
        with record_function("spm.membrane_on"), _TailEnergy(self.bank, tail_mask) as tail_energy:
            for lo in range(0, n, chunk):  # micro-batches bound activation memory; gradients accumulate
                hi = min(lo + chunk, n)
                self.bank.route(owner[lo:hi], None if e_on.gate is None else e_on.gate[lo:hi])
                tail_energy.rows(lo, hi)
                with self.accelerator.autocast():
                    on = self.model.predict(x_on[lo:hi], t_on[lo:hi], e_on.index(slice(lo, hi)),
                                            self.resolution).to(self.compute_dtype)
                err = (on - goal[lo:hi]).pow(2).flatten(1).sum(1)
                total = err
                if tail_mask is not None:  # in units of the latent MSE, as the erase rows' weight divides by numel
                    penalty = self.cfg.tail_penalty * math.prod(self.latent_shape) * tail_energy.collect()
                    total = err + penalty
                    pen[lo:hi] = penalty.detach()
                if self.engine is not None:
                    self.engine.backward((total * weight[lo:hi]).sum())
                else:  # scaled for fp16 on a GPU
                    self.accelerator.backward((total * weight[lo:hi]).sum())
                sq[lo:hi] = err.detach()
        self.bank.set_permeability(None)

        # per-concept [loss, erase, anchor, tail], without leaving the device: erase is the latent error
        # alone, tail the tail_penalty term, loss what was minimised
        parts = torch.zeros(2 * len(self.concepts), device=dev, dtype=self.compute_dtype)
        parts.index_add_(0, layout["slot"], sq * weight)
        parts = parts.view(-1, 2)
        anchor = parts[:, 1] / layout["anchor_divisor"]
        penalties = torch.zeros(2 * len(self.concepts), device=dev, dtype=self.compute_dtype)
        penalties = penalties.index_add_(0, layout["slot"], pen * weight).view(-1, 2).sum(1)
        losses = torch.stack([parts[:, 0] + parts[:, 1] + penalties, parts[:, 0], anchor, penalties], dim=1)
        with record_function("spm.update"):
            if self.engine is not None:
                self.engine.step()  # reduce, clip, AdamW, schedule, zero
                return losses
            average_gradients(self.accelerator, self.bank.parameters())
            if self.accelerator.scaler is not None:  # clipping needs the true gradients
                self.accelerator.unscale_gradients()
            self._clip_per_membrane()
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _erase_guidance(self, c: _Concept, pos: torch.Tensor) -> float | torch.Tensor:
        """The erase guidance of each erase row: the concept's ``guidance_scale`` for its target, and
        ``phrasing_guidance`` (when set) for the phrasings after it."""
        g = c.spec.guidance_scale
        if not c.num_phrasings or self.cfg.phrasing_guidance is None:
            return g
        rows = torch.full((pos.shape[0],), float(self.cfg.phrasing_guidance), device=pos.device,
                          dtype=pos.dtype)
        rows[:self.cfg.batch_size] = g
        return rows.view(-1, *[1] * (pos.dim() - 1))

    @torch.no_grad()
    def _clip_per_membrane(self) -> None:
        """Clip each membrane's gradient to its own norm, as K separate runs would."""
        if not self.cfg.max_grad_norm:
            return
        owner = self.bank.router.slot_tensors(self.device)[0]
        per_slot = torch.zeros(owner.numel(), device=self.device)
        layers = list(self.bank.layers.values())
        for layer in layers:
            if layer.down.grad is not None:
                per_slot += layer.down.grad.flatten(1).pow(2).sum(1)
            if layer.up.grad is not None:
                per_slot += layer.up.grad.transpose(0, 1).flatten(1).pow(2).sum(1)
        per_membrane = torch.zeros(self.bank.num_membranes, device=self.device).index_add_(0, owner, per_slot)
        coef = (self.cfg.max_grad_norm / (per_membrane.sqrt() + 1e-6)).clamp(max=1.0)[owner]
        for layer in layers:
            if layer.down.grad is not None:
                layer.down.grad.mul_(coef.view(-1, *[1] * (layer.down.dim() - 1)))
            if layer.up.grad is not None:
                layer.up.grad.mul_(coef.view(1, -1, *[1] * (layer.up.dim() - 2)))

    # -- loop ------------------------------------------------------------------------------
    def train(self) -> TrainingResult:
        cfg = self.cfg
        start = time.perf_counter()
        resumed_from = self.load_checkpoint() if self.checkpoint_dir else 0
        names = ", ".join(s.name for s in self.specs)
        bar = tqdm(total=cfg.iterations, initial=self.step, disable=not self.progress,
                   desc=f"pack[{len(self.specs)}]", unit="it", leave=False)
        try:
            while self.step < cfg.iterations:
                with self._perturbed_base():
                    losses = self._train_step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    rows = self._log(losses)
                    bar.set_postfix(loss=f"{sum(r['loss'] for r in rows) / len(rows):.4g}")
                if cfg.checkpoint_every and self.checkpoint_dir and (
                        self.step % cfg.checkpoint_every == 0 and self.step < cfg.iterations):
                    url = self.save_checkpoint()
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(self.step, url)
        finally:
            bar.close()
        with self._gathered():
            membranes = [self._export(i) for i in range(len(self.specs))]
        seconds = time.perf_counter() - start
        logger.info("trained %d membrane(s) [%s] for %d iterations in %.1fs", len(membranes), names,
                    cfg.iterations - resumed_from, seconds)
        return TrainingResult(membranes, self.history, self.step, resumed_from, seconds)

    def _log(self, losses: torch.Tensor) -> list[dict]:
        # every rank sees (and acts on) the same averaged losses
        losses = self.accelerator.reduce(losses, reduction="mean") if self.world_size > 1 else losses
        values = losses.cpu().tolist()
        lr = self.lr_scheduler.get_last_lr()[0]
        rows = [{"step": self.step, "concept": c.spec.name, "loss": v[0], "erase": v[1], "anchor": v[2], "lr": lr}
                for c, v in zip(self.concepts, values)]
        if self.cfg.tail_penalty:
            for row, v in zip(rows, values):
                row["tail"] = v[3]
        diverged = [r["concept"] for r in rows if not math.isfinite(r["loss"])]
        if diverged:
            raise TrainingDivergedError(diverged, self.step)
        self.history += rows
        if self.callback is not None:
            self.callback(self.step, rows)
        return rows

    def _export(self, index: int) -> Membrane:
        spec = self.specs[index]
        trainer = self.cfg.to_dict()
        extra = {"concept": json.dumps(spec.to_dict(), sort_keys=True), "iterations": str(self.step)}
        from .transport import GATE_KEY, TRANSPORT_KEY, Calibration, calibrate_transport

        calibration = self.concepts[index].calibration if self.concepts else None
        if calibration is None and self.cfg.calibrate:
            calibration = calibrate_transport(self.model.pipe, [spec.target], self.corpus,
                                              similarity=self.cfg.similarity)
        elif calibration is None and self.cfg.similarity != "token":
            calibration = Calibration(similarity=self.cfg.similarity)  # loaders score it as it was meant
        if calibration is not None:
            extra[TRANSPORT_KEY] = calibration.to_header()
        if self.cfg.gate != "none":
            extra[GATE_KEY] = self.cfg.gate
        return self.bank.export(
            index, name=spec.name, concepts=(spec.target,), family=self.model.family, layout=self.layout,
            base_fingerprint=self.fingerprint, trainer=trainer, extra=extra,
        )

    def close(self) -> None:
        """Detach the membranes: the pipeline's UNet is as it was before training (layers, memory format,
        which parameters require gradients, train/eval mode); also after a setup that failed part way."""
        if getattr(self, "bank", None) is not None:
            self.bank.detach()
        self.noisy = []  # the clean copy of the base's weights (weight_noise) is not needed any more
        if getattr(self, "made_channels_last", False):
            self.unet.to(memory_format=torch.contiguous_format)
            self.made_channels_last = False
        if getattr(self, "_unet_state", None) is None:
            return
        wanted_grad, training = self._unet_state
        for name, p in self.unet.named_parameters():
            p.requires_grad_(name in wanted_grad)
        self.unet.train(training)

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_identity(self) -> dict[str, str]:
        return {
            "format": CHECKPOINT_FORMAT,
            "concepts": json.dumps([s.to_dict() for s in self.specs], sort_keys=True),
            "trainer": self.cfg.fingerprint(),
            "base_fingerprint": self.fingerprint,
        }

    def save_checkpoint(self) -> str:
        """Membrane weights, optimizer state, step and every generator's state, written atomically."""
        tensors: dict[str, torch.Tensor] = {}
        with self._gathered():
            for i, (path, layer) in enumerate(self.bank.layers.items()):
                tensors[f"bank.{i}.down"] = layer.down.detach().cpu().clone()
                tensors[f"bank.{i}.up"] = layer.up.detach().cpu().clone()
        params = self.bank.parameters()
        # DeepSpeed keeps the optimizer state in its own partitions: a DeepSpeed run resumes weights,
        # step and generators, and restarts AdamW's moments
        optimizer_state = self.optimizer.state if self.engine is None else {}
        for i, p in enumerate(params):
            for key, value in optimizer_state.get(p, {}).items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        scaler = self.accelerator.scaler
        if scaler is not None:  # fp16: the loss scale decides which of the next steps are skipped
            state = scaler.state_dict()
            tensors["scaler.scale"] = torch.tensor(state["scale"], dtype=torch.float64)
            tensors["scaler.growth_tracker"] = torch.tensor(state["_growth_tracker"], dtype=torch.int64)
        for rank, states in enumerate(self._gather_rng_states()):
            for k, (host, device, pick) in enumerate(states):
                tensors[f"rng.{k}.host{_rank_suffix(rank)}"] = host
                tensors[f"rng.{k}.device{_rank_suffix(rank)}"] = device
                tensors[f"rng.{k}.pick{_rank_suffix(rank)}"] = pick
        if self.worker_rank != 0:
            return ""
        meta = dict(self._checkpoint_identity(), step=str(self.step), world_size=str(self.world_size))
        url = os.path.join(self.checkpoint_dir, CHECKPOINT_FILE)
        with io.atomic_output(url) as tmp:
            save_file(tensors, tmp, metadata=meta)
        logger.info("checkpoint at step %d -> %s", self.step, url)
        return url

    def _gather_rng_states(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        mine = [(c.host_rng.get_state(), c.rng.get_state(), c.pick_rng.get_state()) for c in self.concepts]
        if self.world_size == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])  # one list per rank, in rank order

    def load_checkpoint(self) -> int:
        """Resume from the checkpoint in ``checkpoint_dir`` if there is one; returns its step (0 if none)."""
        url = os.path.join(self.checkpoint_dir, CHECKPOINT_FILE)
        if not io.exists(url):
            return 0
        with io.local_copy(url) as path, safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        identity = self._checkpoint_identity()
        differs = [k for k, v in identity.items() if meta.get(k) != v]
        if differs:
            raise ConfigError("checkpoint", [f"{url} belongs to another run (different {', '.join(differs)})"])
        with torch.no_grad(), self._gathered():
            for i, layer in enumerate(self.bank.layers.values()):
                layer.down.copy_(tensors[f"bank.{i}.down"])
                layer.up.copy_(tensors[f"bank.{i}.up"])
        state = {}
        for i, p in enumerate(self.bank.parameters()):
            entry = {key.split(".", 2)[2]: v.to(p.device) for key, v in tensors.items()
                     if key.startswith(f"opt.{i}.")}
            if entry:
                if "step" in entry:
                    entry["step"] = entry["step"].cpu()
                state[i] = entry
        if self.engine is None:
            opt_state = self.optimizer.state_dict()
            opt_state["state"] = state
            self.optimizer.load_state_dict(opt_state)
        scaler = self.accelerator.scaler
        if scaler is not None and "scaler.scale" in tensors:
            scaler.load_state_dict(dict(scaler.state_dict(), scale=tensors["scaler.scale"].item(),
                                        _growth_tracker=int(tensors["scaler.growth_tracker"])))
        if int(meta.get("world_size", 1)) != self.world_size:
            raise ConfigError("checkpoint", [f"{url} was written by {meta.get('world_size', 1)} worker(s), "
                                             f"this run has {self.world_size}"])
        suffix = _rank_suffix(self.worker_rank)
        for k, c in enumerate(self.concepts):
            c.host_rng.set_state(tensors[f"rng.{k}.host{suffix}"])
            c.rng.set_state(tensors[f"rng.{k}.device{suffix}"])
            if f"rng.{k}.pick{suffix}" in tensors:  # checkpoints from before phrasings have none
                c.pick_rng.set_state(tensors[f"rng.{k}.pick{suffix}"])
        self.step = int(meta["step"])
        with warnings.catch_warnings():  # replaying the schedule, the optimizer state is already restored
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.lr_scheduler.step()
        logger.info("resumed from %s at step %d", url, self.step)
        return self.step


def _init_deepspeed_process_group() -> None:
    """DeepSpeed needs a process group; a lone process (a plain Ray task) gets a group of one."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()


def _rank_suffix(rank: int) -> str:
    return "" if rank == 0 else f".rank{rank}"


def train_membranes(pipe, concepts: Sequence[ConceptSpec], trainer: TrainerConfig | None = None, *,
                    checkpoint_dir: str | None = None, callback=None, progress: bool = True,
                    deepspeed: dict | None = None) -> TrainingResult:
    """Train one membrane per concept as a single pack on ``pipe`` (left unchanged afterwards).

    ``checkpoint_dir``: with ``trainer.checkpoint_every > 0`` the pack checkpoints there and resumes
    from the last checkpoint when restarted. The pipeline stays on the device the caller put it on.
    ``deepspeed``: a DeepSpeed config (dict) to train under a DeepSpeed engine (ZeRO); with ZeRO stage 3
    the base model's weights are partitioned and the pipeline cannot be reused afterwards.
    """
    trainer = trainer or TrainerConfig()
    pack = PackTrainer(pipe, concepts, trainer, checkpoint_dir=checkpoint_dir, callback=callback,
                       progress=progress, deepspeed=deepspeed)
    try:
        return pack.train()
    finally:
        pack.close()
