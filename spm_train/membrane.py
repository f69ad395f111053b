"""Membranes: rank-r adapters wrapping the Linear and Conv2d layers of a UNet's transformer blocks.

A ``MembraneLayer`` wraps one base layer and holds the down/up weights of *several* membranes
stacked along the rank axis. Which membrane acts on which sample is decided per call by a shared
``Router``. With a ``[batch, membranes]`` matrix of permeabilities ``gamma`` every layer computes

    y = W x + sum_i gamma[b, i] * (alpha_i / rank_i) * up_i(down_i(x))

in two matmuls over the stacked ranks: the exact multi-membrane composition used at generation
(never a sum of up- and down-weights, which would add cross terms). Training packs route each sample
to one membrane instead: the layer gathers that membrane's rows and computes one branch per sample.

``Membrane`` is the detached artifact: weights keyed in the kohya/webui LoRA convention
(``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) plus
metadata, stored as safetensors with JSON metadata in the header.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from . import io
from .errors import IncompatibleMembraneError, MembraneFormatError

logger = logging.getLogger(__name__)

FORMAT_NAME = "spm-membrane"
FORMAT_VERSION = "1"
KEY_PREFIX = "lora_unet_"
REQUIRED_METADATA = ("format", "format_version", "name", "concepts", "family", "layout",
                     "base_fingerprint", "rank", "alpha", "trainer")
# The official SPM code (Lyu et al.) writes only these; its tensors use the same kohya keys as ours.
OFFICIAL_METADATA = ("prompts", "rank", "alpha")
OFFICIAL_SOURCE = "spm-official"  # ``extra["source_format"]`` of a membrane read from such a file

# ---------------------------------------------------------------------------------------------
# Which layers a membrane covers


def _transformer_block_types() -> tuple[type, ...]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return (Transformer2DModel,)


def _in_scope(path: str, scope: str) -> bool:
    if scope == "transformer":
        return True
    if scope == "attention":
        return ".attn1." in path or ".attn2." in path
    if scope == "cross_attention":
        return ".attn2." in path
    if scope == "cross_attention_kv":
        return reads_text(path)
    raise ValueError(f"unknown membrane scope {scope!r}; supported: transformer, attention, cross_attention, "
                     "cross_attention_kv")


def reads_text(path: str) -> bool:
    """Whether the layer at ``path`` reads the text encoder's states, one row per prompt token: the key and
    value projections of cross-attention. Only these layers can open a membrane per token."""
    return path.endswith((".attn2.to_k", ".attn2.to_v"))


def membrane_targets(unet: nn.Module, scope: str = "transformer") -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` inside the UNet's ``Transformer2DModel`` blocks, by module path.

    ``scope`` narrows the set: ``attention`` (self- and cross-attention projections),
    ``cross_attention`` (``attn2`` only) or ``cross_attention_kv`` (its key and value projections, which
    read the prompt's tokens). Paths are sorted so every walk visits layers in one order.
    """
    block_types = _transformer_block_types()
    found: dict[str, nn.Module] = {}
    for block_path, block in unet.named_modules():
        if not isinstance(block, block_types):
            continue
        for sub_path, module in block.named_modules():
            path = f"{block_path}.{sub_path}" if sub_path else block_path
            if isinstance(module, MembraneLayer):
                raise IncompatibleMembraneError(
                    f"layer {path} already carries membranes; detach them before attaching new ones"
                )
            _check_plain(path, module)
            base = isinstance(module, (nn.Linear, nn.Conv2d))
            if base and not _inside_membrane(path, found) and _in_scope(path, scope):
                found[path] = module
    return dict(sorted(found.items()))


def _check_plain(path: str, module: nn.Module) -> None:
    """Refuse layouts whose layers a membrane would wrap without ever being called, or under another name."""
    processor = getattr(module, "processor", None)
    if getattr(module, "fused_projections", False) and "Fused" in type(processor).__name__:
        raise IncompatibleMembraneError(
            f"the attention projections of {path} are fused (fuse_qkv_projections), so to_q/to_k/to_v are never "
            "called; unfuse them (pipe.unfuse_qkv_projections()) before attaching membranes"
        )
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        raise IncompatibleMembraneError(
            f"layer {path} carries LoRA adapters (e.g. from pipe.load_lora_weights); fuse or unload them "
            "(pipe.fuse_lora() then pipe.unload_lora_weights(), or pipe.unload_lora_weights()) before "
            "attaching membranes"
        )


def _inside_membrane(path: str, found: dict[str, nn.Module]) -> bool:
    return any(path.startswith(p + ".") for p in found)


def kohya_name(module_path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return KEY_PREFIX + module_path.replace(".", "_")


def layer_shapes(module: nn.Module) -> tuple[tuple[int, ...], int]:
    """(shape of one down row, output features) for a Linear or Conv2d."""
    if isinstance(module, MembraneLayer):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return (module.in_features,), module.out_features
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise IncompatibleMembraneError(f"grouped convolutions are not supported (groups={module.groups})")
        return (module.in_channels, *module.kernel_size), module.out_channels
    raise IncompatibleMembraneError(
        f"membranes wrap nn.Linear and nn.Conv2d layers only, got {type(module).__name__}"
    )


def layout_id(unet: nn.Module, scope: str = "transformer") -> str:
    """A short hash of the adapted layers' names and shapes: equal ids mean membranes transfer."""
    rows = [(kohya_name(p), *layer_shapes(m)) for p, m in membrane_targets(unet, scope).items()]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Runtime: layers, router, bank


class Router:
    """Per-call routing shared by all layers of one bank, in one of two modes.

    ``set(gamma)`` takes a ``[batch, membranes]`` (or ``[membranes]``) tensor of permeabilities: every
    layer computes all membranes' branches and weights them (generation: facilitated transport mixes
    several membranes per sample). ``route(owners)`` opens for each sample one membrane only (training
    packs): when there are several membranes of one rank, layers gather each sample's own down/up rows
    and compute a single branch per sample instead of all of them. ``None`` closes every membrane.

    Gated membranes open per token in the layers that read the prompt's tokens (``reads_text``): ``set``
    then also takes ``[batch, tokens, membranes]`` permeabilities and ``route`` a ``[batch, tokens]`` gate
    of each sample's own membrane; every other layer uses the per-sample permeability.
    """

    def __init__(self, slot_owner: torch.Tensor, slot_scale: torch.Tensor):
        self.slot_owner = slot_owner
        self.slot_scale = slot_scale
        self.num_membranes = int(slot_owner.max().item()) + 1 if slot_owner.numel() else 0
        ranks = torch.bincount(slot_owner, minlength=self.num_membranes).tolist() if slot_owner.numel() else []
        self.uniform_rank = ranks[0] if ranks and len(set(ranks)) == 1 else None
        self.weights: torch.Tensor | None = None
        self.token_weights: torch.Tensor | None = None  # [batch, tokens, slots] for layers that read text
        self.owners: torch.Tensor | None = None
        self.owner_gate: torch.Tensor | None = None  # [batch, tokens], routed mode
        self.owner_coef: torch.Tensor | None = None
        self._slot_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._one_hot: torch.Tensor | None = None
        self.merged = False  # while the membranes sit in the base weights, layers add no branch

    def set(self, gamma: torch.Tensor | None, tokens: torch.Tensor | None = None) -> None:
        self.owners = self.owner_coef = self._one_hot = self.owner_gate = self.token_weights = None
        if gamma is None:
            self.weights = None
            return
        gamma = torch.as_tensor(gamma)
        if gamma.dim() == 1:
            gamma = gamma.unsqueeze(0)
        if gamma.dim() != 2 or gamma.shape[1] != self.num_membranes:
            raise ValueError(
                f"permeability must have shape [batch, {self.num_membranes}], got {tuple(gamma.shape)}"
            )
        owner, scale = self.slot_tensors(gamma.device)
        self.weights = gamma.index_select(1, owner) * scale.to(gamma.dtype)
        if tokens is not None:
            if tokens.dim() != 3 or tokens.shape[0] != gamma.shape[0] or tokens.shape[2] != self.num_membranes:
                raise ValueError(f"per-token permeability must have shape [{gamma.shape[0]}, tokens, "
                                 f"{self.num_membranes}], got {tuple(tokens.shape)}")
            self.token_weights = tokens.index_select(2, owner) * scale.to(tokens.dtype)

    def route(self, owners: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """``owners[b]``: the membrane sample ``b`` passes through, or -1 for none.

        Gathering pays when there are several membranes (the dense branch would compute all of them for
        every sample); with one membrane, or membranes of different ranks, the one-hot rows are used.
        ``gate[b, t]`` opens sample ``b``'s membrane per token in the layers that read text (gated membranes)."""
        if gate is not None and (gate.dim() != 2 or gate.shape[0] != owners.shape[0]):
            raise ValueError(f"a token gate must have shape [{owners.shape[0]}, tokens], got {tuple(gate.shape)}")
        if self.uniform_rank is None or self.num_membranes == 1:
            membranes = torch.arange(self.num_membranes, device=owners.device)
            hit = (owners.unsqueeze(1) == membranes).float()  # -1 matches no membrane
            self.set(hit, None if gate is None else hit.unsqueeze(1) * gate.unsqueeze(2).to(hit.dtype))
            return
        self.weights = self._one_hot = self.token_weights = None
        self.owner_gate = gate
        _, scale = self.slot_tensors(owners.device)
        self.owners = owners.clamp(min=0)
        self.owner_coef = (owners >= 0).float() * scale[self.owners * self.uniform_rank]

    def state(self) -> tuple:
        return self.weights, self.owners, self.owner_coef, self._one_hot, self.token_weights, self.owner_gate

    def restore(self, state: tuple) -> None:
        self.weights, self.owners, self.owner_coef, self._one_hot, self.token_weights, self.owner_gate = state

    def slot_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``slot_owner`` and ``slot_scale`` on ``device``, copied there once rather than at every call."""
        if self._slot_cache is None or self._slot_cache[0].device != device:
            self._slot_cache = (self.slot_owner.to(device), self.slot_scale.to(device))
        return self._slot_cache

    def _check_batch(self, rows: int, batch: int) -> None:
        if rows not in (1, batch):
            raise RuntimeError(
                f"membrane permeability was set for a batch of {rows} but the UNet got a batch of {batch}"
            )

    def routed_for(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(owner, coefficient) per sample in routed mode, else None; one row routes every sample."""
        if self.owners is None or self.merged:
            return None
        self._check_batch(self.owners.shape[0], batch)
        if self.owners.shape[0] != batch:
            return self.owners.expand(batch), self.owner_coef.expand(batch)
        return self.owners, self.owner_coef

    def gate_for(self, batch: int) -> torch.Tensor | None:
        """Routed mode's ``[batch, tokens]`` token gate, if one is set."""
        if self.owner_gate is None or self.owner_gate.shape[0] == batch:
            return self.owner_gate
        return self.owner_gate.expand(batch, -1)

    def token_weights_for(self, batch: int) -> torch.Tensor | None:
        """Dense ``[batch, tokens, slots]`` weights of the layers that read text, if per-token ones are set."""
        w = self.token_weights
        if w is None or self.merged:
            return None
        self._check_batch(w.shape[0], batch)
        return w

    def weights_for(self, batch: int) -> torch.Tensor | None:
        """Dense ``[batch, slots]`` weights (built once per routing for layers that cannot gather)."""
        if self.merged:
            return None
        if self.owners is not None:
            self._check_batch(self.owners.shape[0], batch)
            if self._one_hot is None:
                slot_owner, _ = self.slot_tensors(self.owners.device)
                hit = (self.owners.unsqueeze(1) == slot_owner).to(self.owner_coef.dtype)
                self._one_hot = hit * self.owner_coef.unsqueeze(1)
            return self._one_hot
        w = self.weights
        if w is not None:
            self._check_batch(w.shape[0], batch)
        return w


class MembraneLayer(nn.Module):
    """Wraps a Linear or Conv2d; its membranes' ranks are stacked along one axis of ``down``/``up``."""

    def __init__(self, base_layer: nn.Module, router: Router, num_slots: int, dtype=torch.float32,
                 text: bool = False):
        super().__init__()
        self.reads_text = text  # rows are prompt tokens: gated membranes open here per token
        in_shape, out_features = layer_shapes(base_layer)
        self.base_layer = base_layer
        self.router = router
        device = base_layer.weight.device
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.down = nn.Parameter(torch.zeros(num_slots, *in_shape, device=device, dtype=dtype))
        up_shape = (out_features, num_slots, 1, 1) if self.is_conv else (out_features, num_slots)
        self.up = nn.Parameter(torch.zeros(up_shape, device=device, dtype=dtype))
        # routed mode gathers per-sample rows; a conv other than 1x1 / stride 1 / no padding runs dense
        self.gathers = not self.is_conv or (
            tuple(base_layer.kernel_size) == (1, 1) and tuple(base_layer.stride) == (1, 1)
            and tuple(base_layer.dilation) == (1, 1) and base_layer.padding in ((0, 0), 0, "valid"))

    @property
    def fan_in(self) -> int:
        return math.prod(self.down.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routed = self.router.routed_for(x.shape[0]) if self.gathers else None
        if routed is not None:
            return self._routed(x, y, *routed)
        w = self.router.weights_for(x.shape[0])
        if w is None:
            return y
        down, up = self._branch_weights(self.down, self.up, x)
        if self.is_conv:
            conv = self.base_layer
            h = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
            h = h * w.to(h.device, h.dtype)[:, :, None, None]
            delta = F.conv2d(h, up)
        else:
            h = F.linear(x, down)
            tokens = self.router.token_weights_for(x.shape[0]) if self.reads_text else None
            if tokens is not None and h.dim() == 3 and tokens.shape[1] == h.shape[1]:
                h = h * tokens.to(h.device, h.dtype)
            else:
                h = h * w.to(h.device, h.dtype).view(w.shape[0], *([1] * (h.dim() - 2)), w.shape[1])
            delta = F.linear(h, up)
        return y + delta.to(y.dtype)

    @staticmethod
    def _branch_weights(down: torch.Tensor, up: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch runs in the activations' dtype (autocast's, or a bf16/fp16 base's) with the membranes'
        weights cast to it, as autocast does: casting the small weights, never copying the activations."""
        if not _autocast_on(x.device.type) and x.dtype != down.dtype:
            return down.to(x.dtype), up.to(x.dtype)
        return down, up

    def _routed(self, x: torch.Tensor, y: torch.Tensor, owners: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """One membrane per sample: gather its rows, two batched matmuls of its rank, the add fused in.

        Rows are gathered (and scaled) in the membranes' own dtype before any cast, so the gradients of
        samples sharing a membrane are summed at that precision."""
        n, members, rank = x.shape[0], self.router.num_membranes, self.router.uniform_rank
        # [n, rank, in], each sample's rows scaled by its alpha / rank (0 for a sample with no membrane)
        d = self.down.reshape(members, rank, -1).index_select(0, owners) * coef.to(self.down.dtype).view(n, 1, 1)
        u = self.up.reshape(self.up.shape[0], members, rank)  # [out, membranes, rank]
        if self.is_conv and not _channels_last(x):  # 1x1, stride 1: a matmul over the channels of [n, C, H*W]
            d, u = self._branch_weights(d, u.transpose(0, 1).index_select(0, owners), x)  # u: [n, out, rank]
            h = torch.bmm(d, x.flatten(2))  # [n, rank, HW]
            return torch.baddbmm(y.flatten(2), u, h).view(y.shape).to(y.dtype)
        if self.is_conv:  # channels last: channels are the innermost axis, as for a Linear
            x3 = x.permute(0, 2, 3, 1).reshape(n, -1, x.shape[1])
            y3 = y.permute(0, 2, 3, 1).reshape(n, -1, y.shape[1])
        else:
            x3, y3 = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
        d, u = self._branch_weights(d, u.permute(1, 2, 0).index_select(0, owners), x)  # u: [n, rank, out]
        h = torch.bmm(x3, d.transpose(1, 2))  # [n, rows, rank]
        gate = self.router.gate_for(n) if self.reads_text else None
        if gate is not None and gate.shape[1] == h.shape[1]:
            h = h * gate.to(h.device, h.dtype).unsqueeze(2)
        out = torch.baddbmm(y3, h, u)
        if self.is_conv:
            return out.view(n, *y.shape[2:], y.shape[1]).permute(0, 3, 1, 2).to(y.dtype)
        return out.view(y.shape).to(y.dtype)

    def delta_weight(self, slot_weights: torch.Tensor) -> torch.Tensor:
        """The dense weight update for fixed per-slot weights (``[slots]``), shaped like the base weight."""
        if self.is_conv and self.down.shape[-1] * self.down.shape[-2] != 1:
            up = self.up.flatten(1) * slot_weights
            return torch.einsum("os,sikl->oikl", up, self.down)
        up = self.up.reshape(self.up.shape[0], -1) * slot_weights
        delta = up @ self.down.reshape(self.down.shape[0], -1)
        return delta.reshape(self.base_layer.weight.shape)


def _autocast_on(device_type: str) -> bool:
    """Autocast state for the device type; devices without autocast (``meta``: shape-only runs) have none."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


@dataclass(frozen=True)
class SlotSpec:
    """Rank and alpha of one membrane in a bank."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class MembraneBank:
    """M membranes attached to one UNet. Detaching restores the original layers exactly."""

    def __init__(self, unet: nn.Module, targets: dict[str, nn.Module], specs: Sequence[SlotSpec],
                 dtype: torch.dtype = torch.float32):
        if not specs:
            raise ValueError("a membrane bank needs at least one membrane")
        for spec in specs:
            if not isinstance(spec.rank, int) or spec.rank <= 0:
                raise ValueError(f"membrane rank must be a positive integer, got {spec.rank!r}")
        if not targets:
            raise IncompatibleMembraneError("the UNet has no Linear/Conv2d layers inside Transformer2DModel blocks")
        self.unet = unet
        self.specs = list(specs)
        owner = torch.cat([torch.full((s.rank,), i, dtype=torch.long) for i, s in enumerate(specs)])
        scale = torch.cat([torch.full((s.rank,), s.scale, dtype=torch.float32) for s in specs])
        self.slot_starts = [sum(s.rank for s in specs[:i]) for i in range(len(specs))]
        self.router = Router(owner, scale)
        self.layers: dict[str, MembraneLayer] = {}
        for path, base in targets.items():
            layer = MembraneLayer(base, self.router, num_slots=len(owner), dtype=dtype, text=reads_text(path))
            _set_submodule(unet, path, layer)
            self.layers[path] = layer
        self.attached = True
        self.merged: MergedWeights | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def attach(cls, unet: nn.Module, count: int = 1, rank: int = 1, alpha: float = 1.0,
               scope: str = "transformer", generators: Sequence[torch.Generator] | None = None,
               dtype: torch.dtype = torch.float32) -> "MembraneBank":
        """Attach ``count`` fresh membranes: down kaiming-uniform (a=sqrt(5)), up zeros.

        ``generators`` (one per membrane) make each membrane's initial draw independent of the
        others, so a membrane starts from the same weights alone or in a pack.
        """
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"membrane rank must be a positive integer, got {rank!r}")
        if generators is not None and len(generators) != count:
            raise ValueError(f"got {len(generators)} generators for {count} membranes")
        bank = cls(unet, membrane_targets(unet, scope), [SlotSpec(rank, float(alpha))] * count, dtype=dtype)
        for i in range(count):
            bank.reset_membrane(i, generators[i] if generators is not None else None)
        return bank

    @classmethod
    def from_membranes(cls, unet: nn.Module, membranes: Sequence["Membrane"],
                       dtype: torch.dtype = torch.float32) -> "MembraneBank":
        """Attach trained membranes; each must fit the UNet's layer names and shapes."""
        if not membranes:
            raise ValueError("no membranes given")
        all_targets = membrane_targets(unet, "transformer")
        by_name = {kohya_name(p): p for p in all_targets}
        used: set[str] = set()
        for m in membranes:
            _check_fits(m, all_targets, by_name)
            used.update(by_name[k] for k in m.weights)
        targets = {p: all_targets[p] for p in sorted(used)}
        bank = cls(unet, targets, [SlotSpec(m.rank, m.alpha) for m in membranes], dtype=dtype)
        for i, m in enumerate(membranes):
            bank.load_membrane(i, m)
        return bank

    # -- weights -------------------------------------------------------------------------
    def _slots(self, index: int) -> slice:
        start = self.slot_starts[index]
        return slice(start, start + self.specs[index].rank)

    @torch.no_grad()
    def reset_membrane(self, index: int, generator: torch.Generator | None = None) -> None:
        s = self._slots(index)
        for layer in self.layers.values():
            bound = 1.0 / math.sqrt(layer.fan_in)  # kaiming_uniform(a=sqrt(5)) on a [rank, fan_in] weight
            shape = (self.specs[index].rank, *layer.down.shape[1:])
            draw = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            layer.down[s] = draw.to(layer.down)
            layer.up[:, s] = 0

    @torch.no_grad()
    def load_membrane(self, index: int, membrane: "Membrane") -> None:
        s = self._slots(index)
        for path, layer in self.layers.items():
            key = kohya_name(path)
            if key in membrane.weights:
                down, up = membrane.weights[key]
                layer.down[s] = down.to(layer.down)
                layer.up[:, s] = up.to(layer.up)
            else:
                layer.down[s] = 0
                layer.up[:, s] = 0

    def export(self, index: int, **metadata) -> "Membrane":
        """A detached copy (CPU, fp32) of membrane ``index`` with the given metadata."""
        s = self._slots(index)
        weights = {
            kohya_name(path): (layer.down[s].detach().float().cpu().clone(),
                               layer.up[:, s].detach().float().cpu().clone())
            for path, layer in self.layers.items()
        }
        spec = self.specs[index]
        return Membrane(weights=weights, rank=spec.rank, alpha=spec.alpha, **metadata)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down, layer.up)]

    @property
    def num_membranes(self) -> int:
        return len(self.specs)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_parameters(self, index: int | None = None) -> int:
        """Parameters of one membrane (``index``), or of all of them."""
        total = sum(layer.down[0].numel() + layer.up.shape[0] for layer in self.layers.values())
        if index is None:
            return total * sum(s.rank for s in self.specs)
        return total * self.specs[index].rank

    # -- routing -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the membranes live (the UNet's device, also after the pipeline was moved)."""
        return next(iter(self.layers.values())).down.device

    def _on_device(self, gamma: torch.Tensor | None) -> torch.Tensor | None:
        return None if gamma is None else torch.as_tensor(gamma).to(self.device)

    def set_permeability(self, gamma: torch.Tensor | None, tokens: torch.Tensor | None = None) -> None:
        """``gamma``: ``[batch, membranes]`` (or ``[membranes]`` for every sample); None closes all.
        ``tokens``: ``[batch, tokens, membranes]`` permeabilities of the layers that read text (gated
        membranes); without it those layers use ``gamma`` too."""
        self.router.set(self._on_device(gamma), self._on_device(tokens))

    def route(self, owners: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """Open for each sample only its own membrane: ``owners[b]`` is a membrane index or -1 for none;
        ``gate[b, t]`` (optional) opens it per token in the layers that read text."""
        self.router.route(self._on_device(owners), self._on_device(gate))

    @contextlib.contextmanager
    def permeability(self, gamma: torch.Tensor | None) -> Iterator[None]:
        previous = self.router.state()
        self.router.set(self._on_device(gamma))
        try:
            yield
        finally:
            self.router.restore(previous)

    # -- merge / detach ------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, gamma: Sequence[float] | torch.Tensor) -> "MergedWeights":
        """Fold ``sum_i gamma_i * scale_i * U_i D_i`` into the base weights; ``unmerge`` restores them bit for bit.

        Only for a fixed permeability per membrane: while merged, the layers add no branch of their own
        (whatever permeability is set, e.g. by facilitated transport, is ignored), and ``unmerge`` puts the
        routing back as it was.
        """
        if not self.attached:
            raise RuntimeError("this membrane bank was detached; attach the membranes again to merge them")
        if self.merged is not None:
            raise RuntimeError("the membranes are merged already; unmerge them before merging again")
        gamma = torch.as_tensor(gamma, dtype=torch.float32)
        if gamma.shape != (self.num_membranes,):
            raise ValueError(f"merge needs one permeability per membrane ({self.num_membranes}), got {tuple(gamma.shape)}")
        slot_w = gamma[self.router.slot_owner] * self.router.slot_scale
        originals = {}
        for path, layer in self.layers.items():
            weight = layer.base_layer.weight
            originals[path] = weight.detach().clone()
            delta = layer.delta_weight(slot_w.to(layer.down.device))
            weight.add_(delta.to(weight.dtype))
        self.router.merged = True
        self.merged = MergedWeights(self, originals)
        return self.merged

    def detach(self) -> None:
        """Put the original layers back (unmerging first if merged); the bank cannot be used afterwards."""
        if not self.attached:
            return
        if self.merged is not None:
            self.merged.unmerge()
        for path, layer in self.layers.items():
            _set_submodule(self.unet, path, layer.base_layer)
        self.router.set(None)
        self.attached = False


@dataclass
class MergedWeights:
    bank: MembraneBank
    originals: dict[str, torch.Tensor]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights bit for bit; the layers apply their membranes dynamically again."""
        for path, weight in self.originals.items():
            self.bank.layers[path].base_layer.weight.copy_(weight)
        self.originals = {}
        if self.bank.merged is self:
            self.bank.merged = None
            self.bank.router.merged = False


# ---------------------------------------------------------------------------------------------
# The artifact


@dataclass
class Membrane:
    """A trained membrane: weights by kohya key and what is needed to use and trace it."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    name: str = "membrane"
    concepts: tuple[str, ...] = ()
    family: str = "unknown"
    layout: str = ""
    base_fingerprint: str = ""
    trainer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def num_parameters(self) -> int:
        return sum(d.numel() + u.numel() for d, u in self.weights.values())

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "concepts": json.dumps(list(self.concepts)),
            "family": self.family,
            "layout": self.layout,
            "base_fingerprint": self.base_fingerprint,
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "trainer": json.dumps(self.trainer, sort_keys=True),
            # read by kohya-style tools to show the network's size
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": repr(float(self.alpha)),
        }
        meta.update({k: str(v) for k, v in self.extra.items()})
        # what the official inference script reads: the erased prompts, comma-joined as it writes them
        meta["prompts"] = ",".join(self.concepts)
        return meta

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, (down, up) in sorted(self.weights.items()):
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(self.alpha))
        return tensors

    def to_bytes(self) -> bytes:
        """The safetensors file as bytes: the same weights and metadata always give the same bytes."""
        validate_weights(self.weights, self.rank, where=self.name)
        return canonical_safetensors(save_bytes(self.state_dict(), metadata=self.metadata()))

    def save(self, url) -> str:
        """Write ``url`` (a .safetensors path or fsspec URL) atomically; returns the URL."""
        data = self.to_bytes()
        with io.atomic_output(url) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
        logger.info("saved membrane %s (%d layers, %d parameters) to %s",
                    self.name, self.num_layers, self.num_parameters, url)
        return str(url)


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` with its header in one fixed order: metadata keys sorted, tensors by offset.

    safetensors writes the metadata map in an arbitrary order, so saving the same membrane twice gave
    different bytes (and sha256s), and the registry took a re-trained identical membrane for a new version.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the tensor data to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def validate_weights(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, where: str = "") -> None:
    """Shapes agree with ``rank``, every value is finite."""
    prefix = f"{where}: " if where else ""
    if not weights:
        raise MembraneFormatError(f"{prefix}membrane holds no layers")
    for key, (down, up) in weights.items():
        if (down.dim(), up.dim()) not in ((2, 2), (4, 4)):
            raise MembraneFormatError(
                f"{prefix}{key}: down {tuple(down.shape)} / up {tuple(up.shape)} are neither a Linear's "
                "(two 2-D weights) nor a convolution's (two 4-D weights)"
            )
        if down.shape[0] != rank or up.shape[1] != rank:
            raise MembraneFormatError(
                f"{prefix}{key}: down {tuple(down.shape)} / up {tuple(up.shape)} do not match rank {rank}"
            )
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise MembraneFormatError(f"{prefix}{key}: up weight must be 1x1, got {tuple(up.shape)}")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise MembraneFormatError(f"{prefix}{key}: weights contain NaN or Inf")


def load_membrane(url) -> Membrane:
    """Read and validate a membrane file. Raises ``MembraneFormatError`` naming the first problem."""
    try:
        with io.local_copy(url) as path:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise MembraneFormatError(f"membrane file not found: {url}") from None
    except MembraneFormatError:
        raise
    except Exception as exc:
        raise MembraneFormatError(f"{url} is not a readable safetensors file ({exc})") from None
    if "format" not in meta and all(k in meta for k in OFFICIAL_METADATA):
        meta = _from_official(meta, tensors, url)
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise MembraneFormatError(f"{url}: metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT_NAME:
        raise MembraneFormatError(f"{url}: format is {meta['format']!r}, expected {FORMAT_NAME!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise MembraneFormatError(f"{url}: format version {meta['format_version']} is not supported "
                                  f"(this library reads version {FORMAT_VERSION})")
    try:
        rank = int(meta["rank"])
        alpha = float(meta["alpha"])
        concepts = json.loads(meta["concepts"])
        trainer = json.loads(meta["trainer"])
    except (ValueError, TypeError) as exc:
        raise MembraneFormatError(f"{url}: malformed metadata ({exc})") from None
    if rank <= 0:
        raise MembraneFormatError(f"{url}: rank must be positive, got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise MembraneFormatError(f"{url}: alpha must be a positive finite number, got {meta['alpha']!r}")
    if not isinstance(concepts, list) or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise MembraneFormatError(f"{url}: concepts must be a JSON list of non-empty strings, "
                                  f"got {meta['concepts']!r}")
    concepts = tuple(concepts)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = set()
    for key in tensors:
        stem, sep, suffix = key.partition(".")
        if not stem.startswith(KEY_PREFIX) or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise MembraneFormatError(f"{url}: unknown key {key!r}")
        names.add(stem)
    for stem in sorted(names):
        parts = [f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"]
        absent = [p for p in parts if p not in tensors]
        if absent:
            raise MembraneFormatError(f"{url}: {stem} lacks {', '.join(absent)}")
        weights[stem] = (tensors[parts[0]].float(), tensors[parts[1]].float())
        alpha_key = f"{stem}.alpha"
        if alpha_key in tensors and not math.isclose(float(tensors[alpha_key]), alpha, rel_tol=1e-6):
            raise MembraneFormatError(f"{url}: {alpha_key} = {float(tensors[alpha_key])} differs from alpha {alpha}")
    validate_weights(weights, rank, where=str(url))
    known = set(REQUIRED_METADATA) | {"ss_network_dim", "ss_network_alpha", "prompts"}
    return Membrane(
        weights=weights, rank=rank, alpha=alpha, name=meta["name"], concepts=concepts,
        family=meta["family"], layout=meta["layout"], base_fingerprint=meta["base_fingerprint"],
        trainer=trainer, extra={k: v for k, v in meta.items() if k not in known},
    )


def _from_official(meta: dict[str, str], tensors: dict[str, torch.Tensor], url) -> dict[str, str]:
    """The metadata of a file written by the official SPM code, completed from what it does carry.

    Concepts are its comma-joined ``prompts``; the family is read from the tensors. It records no base
    fingerprint, layout id or trainer config: ``extra["source_format"]`` marks the membrane as such.
    """
    concepts = [p.strip() for p in meta["prompts"].split(",") if p.strip()]
    stem = os.path.splitext(os.path.basename(str(url)))[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("_.-") or "membrane"
    return {**meta, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name,
            "concepts": json.dumps(concepts), "family": family_from_keys(tensors), "layout": "",
            "base_fingerprint": "", "trainer": "{}", "source_format": OFFICIAL_SOURCE}


def family_from_keys(tensors: dict[str, torch.Tensor]) -> str:
    """The UNet family a membrane's tensors were trained on (``unknown`` when they do not say).

    SD 1.x projects into its transformer blocks with 1x1 convolutions, SD 2.x and SDXL with linear
    layers; only SDXL stacks several transformer blocks in one attention (2 and 10 in SDXL itself).
    """
    proj_in = [t for k, t in tensors.items() if k.endswith("_proj_in.lora_down.weight")]
    if not proj_in:
        return "unknown"
    if all(t.dim() == 4 for t in proj_in):
        return "sd1"
    if any("_transformer_blocks_1_" in k for k in tensors):
        return "sdxl"
    return "sd2"


def _check_fits(membrane: Membrane, targets: dict[str, nn.Module], by_name: dict[str, str]) -> None:
    unknown = sorted(k for k in membrane.weights if k not in by_name)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise IncompatibleMembraneError(
            f"membrane {membrane.name!r} (family {membrane.family}) has layers this UNet lacks: {shown}"
        )
    for key, (down, up) in membrane.weights.items():
        in_shape, out_features = layer_shapes(targets[by_name[key]])
        if tuple(down.shape[1:]) != in_shape or up.shape[0] != out_features:
            raise IncompatibleMembraneError(
                f"membrane {membrane.name!r} (family {membrane.family}) does not fit layer {by_name[key]}: "
                f"membrane maps {tuple(down.shape[1:])} -> {up.shape[0]}, layer maps {in_shape} -> {out_features}"
            )
