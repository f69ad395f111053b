"""Base models: load a diffusers pipeline, tell its family, encode prompts, call its UNet.

Supported families (the structure decides, not the name on the folder):

- ``sd1``: SD 1.x UNet (conv ``proj_in``/``proj_out`` in its transformer blocks), one CLIP text encoder.
- ``sd2``: SD 2.x UNet (linear projections), one text encoder; epsilon or v-prediction.
- ``sdxl``: SDXL UNet with ``text_time`` added conditioning, two text encoders, pooled embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelLoadError, UnsupportedModelError, first_line
from .prompts import function_token_ids

logger = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
_SAFETY_CHECKER_NOTED: set[str] = set()


@dataclass
class PromptEmbeds:
    """Text conditioning as the UNet consumes it: ``hidden`` [B, L, D], SDXL's ``pooled`` [B, P], and for
    training gated membranes each row's token ``gate`` [B, L]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(fn(self.hidden), None if self.pooled is None else fn(self.pooled),
                            None if self.gate is None else fn(self.gate))

    def index(self, idx) -> "PromptEmbeds":
        return self._map(lambda t: t[idx])

    def repeat(self, n: int) -> "PromptEmbeds":
        return self._map(lambda t: t.repeat_interleave(n, 0))

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        out = PromptEmbeds(self.hidden.to(*args, **kwargs),
                           None if self.pooled is None else self.pooled.to(*args, **kwargs), self.gate)
        if self.gate is not None:
            out.gate = self.gate.to(out.hidden.device)
        return out

    def with_gate(self, gate: torch.Tensor) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden, self.pooled, gate.to(self.hidden.device))

    @staticmethod
    def cat(items) -> "PromptEmbeds":
        """Rows of ``items`` in order; the gate is kept only when every item has one."""
        items = list(items)
        pooled = None if items[0].pooled is None else torch.cat([i.pooled for i in items])
        gates = [i.gate for i in items]
        gate = None if any(g is None for g in gates) else torch.cat(gates)
        return PromptEmbeds(torch.cat([i.hidden for i in items]), pooled, gate)


def detect_family(pipe) -> str:
    """Return ``sd1``, ``sd2`` or ``sdxl`` for a loaded pipeline, or raise naming what is supported."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if isinstance(getattr(unet, "_orig_mod", None), UNet2DConditionModel):
        raise UnsupportedModelError(
            f"{type(pipe).__name__}.unet is compiled (torch.compile); equip membranes on the plain UNet "
            "and compile it afterwards"
        )
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has no UNet2DConditionModel; supported families: "
            "SD 1.x, SD 2.x, SDXL (diffusers StableDiffusion / StableDiffusionXL pipelines)"
        )
    return _family_of(unet.config, type(pipe).__name__, getattr(pipe, "text_encoder", None) is not None
                      and getattr(pipe, "tokenizer", None) is not None,
                      getattr(pipe, "text_encoder_2", None) is not None)


def _family_of(config, owner: str, has_text: bool, has_text_2: bool) -> str:
    """The family a UNet config and a pipeline's text components make, by the rules of ``detect_family``."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if not any("CrossAttn" in t for t in get("down_block_types", ())):
        raise UnsupportedModelError("the UNet has no cross-attention blocks, so there is no text to erase")
    if not has_text:
        raise UnsupportedModelError(f"{owner} lacks a text encoder or tokenizer")
    embed = get("addition_embed_type")
    if embed == "text_time":
        if not has_text_2:
            raise UnsupportedModelError("an SDXL-style UNet needs text_encoder_2")
        return "sdxl"
    if embed is not None:
        raise UnsupportedModelError(f"UNet added conditioning {embed!r} is not supported (SD 1.x, SD 2.x, SDXL are)")
    return "sd2" if get("use_linear_projection") else "sd1"


def folder_family(path: str) -> str:
    """The family of a local diffusers pipeline folder from its configs alone (no weights are read): the
    rules of ``detect_family``, and every component ``model_index.json`` names has its folder.
    Raises ``ModelLoadError`` for a folder that is not a pipeline, ``UnsupportedModelError`` for another
    family."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_path)
    components = {k: v for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1]}
    missing = [k for k in components if not os.path.isdir(os.path.join(path, k))]
    if missing:
        raise ModelLoadError(f"{path!r}: model_index.json names {', '.join(missing)}, which has no folder")
    if components.get("unet", [None, None])[1] != "UNet2DConditionModel":
        raise UnsupportedModelError(f"{path!r} has no UNet2DConditionModel; supported families: SD 1.x, SD 2.x, "
                                    "SDXL (diffusers StableDiffusion / StableDiffusionXL pipelines)")
    return _family_of(_read_json(os.path.join(path, "unet", "config.json")), index.get("_class_name", path),
                      "text_encoder" in components and "tokenizer" in components, "text_encoder_2" in components)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {path}: {first_line(exc)}") from None


def source_family(source: str, *, dtype: str = "float32") -> str:
    """The family of a model source (as ``load_base_model`` takes): read from the configs of a local
    pipeline folder, so a multi-gigabyte model is not loaded just to name its family; loaded otherwise."""
    if os.path.isfile(os.path.join(str(source), "model_index.json")):
        return folder_family(str(source))
    return detect_family(load_base_model(source, dtype=dtype))


def load_pipeline(path: str, *, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a diffusers pipeline from a local folder, or a hub id where the hub is reachable."""
    from diffusers import DiffusionPipeline

    local = os.path.isdir(path)
    if not local and path.startswith((".", "/", "~")):  # a hub id never starts so
        raise ModelLoadError(f"base model folder {path!r} does not exist")
    # diffusers >= 0.42 names it ``dtype``; ``torch_dtype`` still works there but warns
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if local:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder (no model_index.json)")
        kwargs["local_files_only"] = True
    try:
        with _no_loading_bars():
            pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except Exception as exc:
        reason = first_line(exc)
        where = "local folder" if local else "hub id (the hub may be unreachable from here)"
        raise ModelLoadError(f"could not load base model {path!r} as a {where}: {reason}") from None
    if getattr(pipe, "safety_checker", None) is not None:
        # membranes are judged on what the UNet draws; a checker that blacks out images would hide it
        if path not in _SAFETY_CHECKER_NOTED:  # once per model and process: a run loads its base often
            _SAFETY_CHECKER_NOTED.add(path)
            logger.info("%s: its safety checker is turned off (pipe.safety_checker = None)", path)
        pipe.safety_checker = None
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    detect_family(pipe)
    return pipe


@contextlib.contextmanager
def _no_loading_bars():
    """Hide diffusers' and transformers' per-component loading bars while a base model loads.

    A run loads its base several times (driver, workers, evaluation); the bars say nothing a log line
    does not, and they interleave with the run's own progress. The previous setting is restored.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in enabled:
            module.enable_progress_bar()


def base_fingerprint(unet: nn.Module, samples_per_tensor: int = 2048) -> str:
    """A content hash of the UNet: config, and for every tensor its name, shape and strided values.

    Cheap on multi-GB models (a few thousand values per tensor), and any real fine-tune changes it.
    """
    h = hashlib.sha256()
    config = dict(getattr(unet, "config", {}))
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                        default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        if name.endswith((".down", ".up")):  # attached membranes are not part of the base
            continue
        name = name.replace(".base_layer", "")
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        values = flat[::step][:samples_per_tensor].float().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


class ModelAdapter:
    """What training and generation need from a pipeline, for one family."""

    def __init__(self, pipe, family: str | None = None):
        self.pipe = pipe
        self.family = family or detect_family(pipe)
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"family {self.family!r} is not one of {list(FAMILIES)}")
        self.unet = pipe.unet
        self.call_unet = pipe.unet  # replaced by a compiled callable when asked for
        self.vae_scale_factor = getattr(pipe, "vae_scale_factor", 8)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        resolution = resolution or self.default_resolution()
        side = resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Embed prompts exactly as the pipeline does for its own generations."""
        device = self.device
        if self.family == "sdxl":
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return PromptEmbeds(hidden, pooled)
        hidden, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return PromptEmbeds(hidden)

    def ignored_ids(self, content_only: bool = True) -> set[int]:
        """Token ids that name nothing: start, end and padding, and with ``content_only`` also function
        words and punctuation (``spm_train.prompts.FUNCTION_WORDS``)."""
        cache = self.__dict__.setdefault("_ignored_ids", {})
        if content_only not in cache:  # reading a real model's vocabulary takes a moment: once per adapter
            tok = self.pipe.tokenizer
            ids = special_ids(tok)
            cache[content_only] = ids | function_token_ids(tok) if content_only else ids
        return cache[content_only]

    def token_ids(self, prompt: str, content_only: bool = True) -> set[int]:
        """The prompt's token ids without start, end and padding tokens (and, with ``content_only``,
        without function words and punctuation)."""
        tok = self.pipe.tokenizer
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        return set(ids) - self.ignored_ids(content_only)

    def content_mask(self, prompt: str, content_only: bool = True) -> torch.Tensor:
        """Which positions of the padded prompt hold tokens that ``token_ids`` keeps."""
        return ~torch.isin(self.padded_ids(prompt), torch.tensor(sorted(self.ignored_ids(content_only))))

    def padded_ids(self, prompt: str) -> torch.Tensor:
        """Token ids of the prompt padded to the text encoder's length, as the pipelines encode it."""
        tok = self.pipe.tokenizer
        return torch.tensor(tok(prompt, padding="max_length", max_length=tok.model_max_length,
                                truncation=True).input_ids)

    @torch.no_grad()
    def lexical(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., T, D]`` float: the text encoder's input token embeddings of ``ids`` (``[..., T]``) with the
        table's mean row removed: what each token is before the encoder reads it in context. SDXL puts both
        encoders' rows side by side (their tokenizers share the vocabulary)."""
        means = self.__dict__.setdefault("_lexical_means", {})
        parts = []
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, name, None)
            if encoder is None:
                continue
            table = encoder.get_input_embeddings().weight.detach()
            if name not in means:  # the mean of a real vocabulary's table: once per adapter
                means[name] = table.float().mean(0)
            rows = table[ids.to(table.device)].float() - means[name]
            parts.append(rows.to(parts[0].device) if parts else rows)
        return torch.cat(parts, dim=-1)

    def lexical_of(self, prompts: list[str]) -> torch.Tensor:
        """``[len(prompts), T, D]``: ``lexical`` of each padded prompt, position by position as ``encode``."""
        return self.lexical(torch.stack([self.padded_ids(p) for p in prompts]))

    def tail_mask(self, prompt: str) -> torch.Tensor:
        """Positions of the padded prompt from its end-of-text token on (end-of-text and padding)."""
        return tail_positions(self.padded_ids(prompt), self.pipe.tokenizer.eos_token_id)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                resolution: int | None = None) -> torch.Tensor:
        """One UNet call; ``timesteps`` holds one value per sample."""
        kwargs = {}
        if self.family == "sdxl":
            resolution = resolution or self.default_resolution()
            time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                                    device=latents.device, dtype=self.unet.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": embeds.pooled.to(self.unet.dtype),
                "time_ids": time_ids.expand(latents.shape[0], -1),
            }
        dtype = self.unet.dtype
        return self.call_unet(latents.to(dtype), timesteps, encoder_hidden_states=embeds.hidden.to(dtype),
                              return_dict=False, **kwargs)[0]


def tail_positions(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Whether each position of ``ids`` (last axis) lies at or after the first end-of-text token."""
    if eos_id is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    return (ids == eos_id).long().cumsum(-1) > 0


def special_ids(tokenizer) -> set[int]:
    """Start, end, padding and other special token ids of ``tokenizer``."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    return {i for i in ids if i is not None}


TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_base_model(source: str, *, dtype: str = "float32", device: str | torch.device | None = None):
    """Load a base model by source string.

    - ``toyworld`` / ``toyworld:variant``: the ToyWorld pipelines shipped inside this package;
    - ``random:sd1`` / ``random:sd2`` / ``random:sdxl``: tiny random-weight models built from config
      (deterministic, for tests and dry runs);
    - ``arch:sd15`` / ``arch:sd21`` / ``arch:sdxl``: full-size published architectures with random
      weights (benchmarks: compute cost does not depend on weight values);
    - anything else: a local diffusers folder, or a hub id where a hub is reachable.
    """
    if dtype not in TORCH_DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; supported: {sorted(TORCH_DTYPES)}")
    torch_dtype = TORCH_DTYPES[dtype]
    if source.startswith(("random:", "arch:")):
        from .architectures import cast_pipeline, full_pipeline, tiny_pipeline

        kind, name = source.split(":", 1)
        if kind == "arch":  # initialised where it will run: random init of a full UNet is slow on a CPU
            pipe = full_pipeline(name, device=device or "cpu", dtype=torch_dtype)
        else:
            pipe = cast_pipeline(tiny_pipeline(name), torch_dtype)
        pipe.set_progress_bar_config(disable=True)
    elif source in ("toyworld", "toyworld:base", "toyworld:variant"):
        from . import toyworld

        which = "variant" if source.endswith("variant") else "base"
        try:
            path = toyworld.variant_model_path() if which == "variant" else toyworld.base_model_path()
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from None
        pipe = load_pipeline(str(path), torch_dtype=torch_dtype)
    else:
        pipe = load_pipeline(source, torch_dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    return pipe
