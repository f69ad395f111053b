"""What to erase (``ConceptSpec``) and how to train (``TrainerConfig``), validated on construction.

Both are plain dataclasses: the Hydra layer builds them from YAML, library users build them in
Python. Every problem found is reported at once in one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ERASE = "erase"
ERASE_WITH_ANCHORING = "erase_with_la"
ACTIONS = (ERASE, ERASE_WITH_ANCHORING)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def number_problem(name: str, value, *, minimum: float | None = None, above: bool = False) -> str | None:
    """What is wrong with a numeric setting (not a number, NaN or infinite, below ``minimum``), or None.

    NaN passes every comparison, so a range check alone lets it through: finiteness is checked first.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{name} must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if minimum is not None and (value < minimum or (above and value == minimum)):
        return f"{name} must be {'>' if above else '>='} {minimum:g}, got {value!r}"
    return None


def valid_name(name) -> bool:
    """A concept name: letters, digits, ``_ . -``, starting with a letter or digit (safe as a file name)."""
    return isinstance(name, str) and bool(_NAME.match(name))


@dataclass
class ConceptSpec:
    """One concept to erase.

    The erase loss pulls ``eps_on(target)`` towards ``eps(neutral) - g * (eps(positive) - eps(neutral))``.
    With the defaults (positive = target, neutral = "") that is the paper's plain erasure. A surrogate
    ("erase A, draw B instead") sets the neutral prompt to B.
    """

    name: str
    target: str
    positive: str | None = None
    neutral: str | None = None
    surrogate: str | None = None
    action: str = ERASE_WITH_ANCHORING
    guidance_scale: float = 1.0
    nontarget: list[str] = field(default_factory=list)
    # prompts that show the concept, for measuring erasure (default: the target prompt)
    probes: list[str] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if not isinstance(self.name, str) or not _NAME.match(self.name or ""):
            problems.append(
                f"name {self.name!r} must start with a letter or digit and use only letters, digits, '_', '.', '-'"
            )
        if not isinstance(self.target, str) or not self.target.strip():
            problems.append(f"concept {self.name!r}: target prompt is empty")
        if self.action not in ACTIONS:
            problems.append(f"concept {self.name!r}: action {self.action!r} is not one of {list(ACTIONS)}")
        if self.surrogate is not None and self.neutral is not None:
            problems.append(f"concept {self.name!r}: give either surrogate or neutral, not both")
        if self.surrogate is not None and not str(self.surrogate).strip():
            problems.append(f"concept {self.name!r}: surrogate prompt is empty")
        if self.positive is not None and not str(self.positive).strip():
            problems.append(f"concept {self.name!r}: positive prompt is empty")
        problem = number_problem("guidance_scale", self.guidance_scale, minimum=0)
        if problem:
            problems.append(f"concept {self.name!r}: {problem}")
        if problems:
            raise ConfigError("concept", problems)
        self.nontarget = list(self.nontarget)
        self.probes = list(self.probes)
        self.trainer = dict(self.trainer)

    @property
    def positive_prompt(self) -> str:
        return self.positive if self.positive is not None else self.target

    @property
    def neutral_prompt(self) -> str:
        if self.surrogate is not None:
            return self.surrogate
        return self.neutral if self.neutral is not None else ""

    @property
    def uses_anchoring(self) -> bool:
        return self.action == ERASE_WITH_ANCHORING

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
SCOPES = ("transformer", "attention", "cross_attention", "cross_attention_kv")
# "none": the paper's membrane, opened per prompt; "token": a gated membrane, opened per prompt token in the
# layers that read the prompt (cross-attention keys and values), trained and applied with the same gate: on
# the concept's tokens (and tokens close to them) and on the end-of-text and padding positions, which sum up
# the prompt; "word": the same on the concept's tokens only, every other position left as the base reads it
# (docs/erasure.md: the summary positions carry the rest of the prompt, which "token" loses); "causal": as
# "token", and every position after an open one opens at least as far, since a causal text encoder writes
# the concept into each later output ("a cross, blue and checked": "blue" and "checked" carry the cross)
GATES = ("none", "token", "word", "causal")
# the per-token similarities a membrane is calibrated and gated with (spm_train.transport.PER_TOKEN)
CALIBRATED_SIMILARITIES = ("token", "lexical")
# "project": every anchor is a sampled embedding; "official": as the official code's anchor batch, half of
# them (every other one) is the unconditional embedding
ANCHOR_BATCHES = ("project", "official")


@dataclass
class TrainerConfig:
    """Hyper-parameters of the latent-anchoring fine-tune. Defaults are the paper's preset."""

    iterations: int = 3000
    lr: float = 1e-4
    weight_decay: float = 1e-2
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 500
    lr_cycles: int = 3
    batch_size: int = 1
    max_denoising_steps: int = 30
    trajectory_guidance: float = 3.0
    la_strength: float = 1000.0
    anchors_per_step: int = 4
    anchor_scale_min: float = 0.8
    anchor_scale_max: float = 1.2
    # beyond the paper (docs/erasure.md): other phrasings of the target per iteration, each erased towards
    # itself without the concept's words; anchors from real prompts that do not mention the concept; both
    # drawn from ``corpus`` ("toyworld" or a text file with one caption per line)
    phrasings: int = 0
    # erase guidance of those phrasings (None: the concept's guidance_scale, as for the target itself);
    # 0 maps each phrasing onto the same sentence with the surrogate's words and nothing beyond
    phrasing_guidance: float | None = None
    prompt_anchors: int = 0
    # relative std of Gaussian noise on the frozen UNet's weights (each tensor's noise scaled by its RMS),
    # redrawn every iteration: the membrane learns to erase on a neighbourhood of the base, which is where
    # fine-tunes of it lie (transfer); 0: the base as it is
    weight_noise: float = 0.0
    # gated membranes (gate "token") act on the end-of-text and padding positions, where the causal text
    # encoder sums up the prompt, and every gated membrane open on a prompt acts there together: the weight of
    # the relative energy of this membrane's edit of cross-attention keys and values at those positions on the
    # erase rows, |delta|^2 / |base|^2 averaged over layers, in units of the latent MSE (0: off)
    tail_penalty: float = 0.0
    corpus: str | None = None
    corpus_size: int = 2000
    anchor_batch: str = "project"
    # store each membrane's calibrated transport (zero and one points of the "token" similarity, from
    # ``corpus``) in its header
    calibrate: bool = False
    # the per-token similarity that calibration and gated training use (spm_train.transport): "token", the
    # text encoder's contextual output, or "lexical", its input token embeddings; stored in the header
    similarity: str = "token"
    rank: int = 1
    alpha: float = 1.0
    scope: str = "transformer"
    gate: str = "none"
    # the paper and the official code do not clip gradients (0: off)
    max_grad_norm: float = 0.0
    # autocast of the UNet calls through accelerate (membranes, losses and AdamW stay fp32); fp16 adds
    # accelerate's loss scaler and needs a GPU
    precision: str = "fp32"
    # membrane-on samples per forward/backward (0: all at once); bounds activation memory of large packs
    micro_batch: int = 0
    compile: bool = False
    # the UNet in channels-last memory format while it trains (restored afterwards)
    channels_last: bool = False
    resolution: int | None = None
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10

    def __post_init__(self):
        problems = []

        def positive(name, allow_zero=False):
            problem = number_problem(name, getattr(self, name), minimum=0, above=not allow_zero)
            if problem:
                problems.append(problem)

        for name in ("iterations", "lr", "batch_size", "rank", "alpha", "max_denoising_steps", "log_every"):
            positive(name)
        for name in ("weight_decay", "lr_warmup_steps", "la_strength", "anchors_per_step",
                     "max_grad_norm", "checkpoint_every", "trajectory_guidance", "micro_batch",
                     "phrasings", "prompt_anchors", "weight_noise", "tail_penalty"):
            positive(name, allow_zero=True)
        for name in ("iterations", "batch_size", "rank", "max_denoising_steps", "anchors_per_step",
                     "lr_warmup_steps", "lr_cycles", "checkpoint_every", "log_every", "seed", "micro_batch",
                     "phrasings", "prompt_anchors", "corpus_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer, got {value!r}")
        for name in ("compile", "channels_last", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.max_denoising_steps, int) and self.max_denoising_steps < 2:
            problems.append(f"max_denoising_steps must be >= 2, got {self.max_denoising_steps}")
        if isinstance(self.lr_cycles, int) and self.lr_cycles < 1:
            problems.append(f"lr_cycles must be >= 1, got {self.lr_cycles}")
        if self.phrasing_guidance is not None:
            positive("phrasing_guidance", allow_zero=True)
        scales = [number_problem(n, getattr(self, n)) for n in ("anchor_scale_min", "anchor_scale_max")]
        problems += [p for p in scales if p]
        if not any(scales) and not (0 < self.anchor_scale_min <= self.anchor_scale_max):
            problems.append(
                f"anchor scale range must satisfy 0 < min <= max, got [{self.anchor_scale_min}, {self.anchor_scale_max}]"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler {self.lr_scheduler!r} is not one of {list(LR_SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.anchor_batch not in ANCHOR_BATCHES:
            problems.append(f"anchor_batch {self.anchor_batch!r} is not one of {list(ANCHOR_BATCHES)}")
        uses_corpus = [n for n in ("phrasings", "prompt_anchors") if isinstance(getattr(self, n), int)
                       and getattr(self, n) > 0] + (["calibrate"] if self.calibrate is True else [])
        if uses_corpus and not (isinstance(self.corpus, str) and self.corpus.strip()):
            problems.append(f"{', '.join(uses_corpus)} need corpus (\"toyworld\" or a caption file)")
        if isinstance(self.corpus_size, int) and self.corpus_size < 1:
            problems.append(f"corpus_size must be >= 1, got {self.corpus_size}")
        if self.scope not in SCOPES:
            problems.append(f"scope {self.scope!r} is not one of {list(SCOPES)}")
        if self.similarity not in CALIBRATED_SIMILARITIES:
            problems.append(f"similarity {self.similarity!r} is not one of {list(CALIBRATED_SIMILARITIES)}")
        if self.gate not in GATES:
            problems.append(f"gate {self.gate!r} is not one of {list(GATES)}")
        elif self.tail_penalty and self.gate not in ("token", "causal"):
            problems.append(f"tail_penalty acts on the end-of-text positions that gate \"token\" opens; gate is "
                            f"{self.gate!r} (set gate: token or tail_penalty: 0)")
        if self.resolution is not None and (
            not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8
        ):
            problems.append(f"resolution must be a positive multiple of 8, got {self.resolution!r}")
        if problems:
            raise ConfigError("trainer config", problems)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainerConfig":
        if name not in TRAINER_PRESETS:
            raise ConfigError("trainer config", [f"unknown preset {name!r}; known: {sorted(TRAINER_PRESETS)}"])
        return dataclasses.replace(TRAINER_PRESETS[name], **overrides)

    def replace(self, **overrides) -> "TrainerConfig":
        """A copy with ``overrides``; unknown keys and bad values are reported together."""
        known = {f.name for f in dataclasses.fields(self)}
        problems = [f"unknown key {k!r}" for k in sorted(set(overrides) - known)]
        try:
            replaced = dataclasses.replace(self, **{k: v for k, v in overrides.items() if k in known})
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError("trainer config", problems)
        return replaced

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every field that changes the trained weights (cadence and memory/speed knobs left out)."""
        data = self.to_dict()
        for key in ("log_every", "checkpoint_every", "micro_batch", "compile", "channels_last"):
            data.pop(key)
        if data["gate"] == "none":  # keys of membranes trained before gates existed stay valid
            data.pop("gate")
        if data["phrasing_guidance"] is None:  # as for gates: older keys stay valid
            data.pop("phrasing_guidance")
        for name in ("weight_noise", "tail_penalty"):
            if data[name] == 0:
                data.pop(name)
        if data["similarity"] == "token":
            data.pop("similarity")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


TRAINER_PRESETS: dict[str, TrainerConfig] = {
    # Lyu et al. 2024: AdamW 1e-4, 3000 iterations, cosine with 3 restarts, 500 warm-up, batch 1, rank 1.
    "paper": TrainerConfig(),
    # A shorter schedule for quick looks on real models.
    "fast": TrainerConfig(iterations=1000, lr=3e-4, lr_warmup_steps=100, precision="bf16", max_grad_norm=1.0),
    # ToyWorld (docs/evaluation-and-toyworld.md, "Erasure on ToyWorld"): the paper's lambda = 1000 holds
    # the tiny model's membrane still; lambda = 1 with a 3e-3 step erases. Pair it with a surrogate and
    # guidance_scale 4 on the concepts (or guidance_scale 16 towards the empty prompt; docs/erasure.md).
    "toyworld": TrainerConfig(iterations=150, lr=3e-3, lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                              max_denoising_steps=10, anchors_per_step=4, la_strength=1.0, log_every=10,
                              checkpoint_every=50, max_grad_norm=1.0, phrasings=4, prompt_anchors=4,
                              corpus="toyworld", calibrate=True, gate="token", similarity="lexical"),
    # Seconds on a CPU with tiny models: for tests and smoke runs, not for real erasure.
    "smoke": TrainerConfig(iterations=4, lr=1e-3, lr_scheduler="constant", lr_warmup_steps=0,
                           max_denoising_steps=4, anchors_per_step=2, log_every=1),
}
