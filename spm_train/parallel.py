"""The pack trainer's processes, devices and precision, through accelerate.

A pack runs in one process, or in several data-parallel ones (Ray Train workers, ``torchrun``,
``accelerate launch``): accelerate reads which from the environment those launchers set, gives the
trainer its rank, the mixed-precision context and loss scaling, and the collective operations.

The membranes of a pack are a few hundred thousand parameters spread over hundreds of small tensors:
one flat all-reduce of their gradients per step (``average_gradients``) is all data parallelism needs.
DistributedDataParallel would wrap the whole UNet, sync on every micro-batch's backward unless told
otherwise, and bucket tensors that fit one message anyway.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# DeepSpeed is an optional extra, built against the installed torch (docs/bulk-and-clusters.md: when it helps)
DEEPSPEED_MISSING = ("DeepSpeed is not installed; it is an optional extra: `make deepspeed`, or "
                     "`DS_BUILD_OPS=0 pip install --no-build-isolation 'spm-train[deepspeed]'`")


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def pack_accelerator(device: torch.device, precision: str):
    """An ``Accelerator`` for one pack on ``device`` (the pipeline's: the caller decides devices).

    accelerate keeps one state per process and refuses a second ``Accelerator`` with another precision;
    a Ray worker trains many packs in turn, each with its own trainer config, so every pack starts from a
    fresh state (accelerate's ``_reset_state``, which its own test utilities use). One pack trains at a
    time in a process.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if precision == "fp16" and device.type == "cpu":
        # accelerate has no fp16 autocast on CPU and would train in fp32 without saying so
        raise ConfigError("trainer config", ["precision=fp16 needs a GPU; use bf16 or fp32 on the CPU"])
    world = _world_size()
    partial = PartialState._shared_state
    kind = getattr(partial.get("device"), "type", None)
    if partial and (partial.get("num_processes") != world or kind != device.type):
        PartialState._reset_state()  # a process group came or went since the last pack, or the device kind
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=_MIXED[precision],
                              device_placement=False)
    if accelerator.num_processes != world:
        # accelerate reads the ranks from RANK / WORLD_SIZE / LOCAL_RANK; without them each process would
        # train alone and the workers' membranes would drift apart
        raise ConfigError("data-parallel setup", [
            f"torch.distributed has {world} processes but accelerate sees {accelerator.num_processes}: start the "
            "workers with Ray Train, torchrun or accelerate launch (they set RANK, WORLD_SIZE and LOCAL_RANK)"])
    return accelerator


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def average_gradients(accelerator, params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the processes: one all-reduce of one flat tensor."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
