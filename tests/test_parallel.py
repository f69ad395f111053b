"""The trainer's accelerate layer: a pack's precision and processes, refused when they cannot work."""

import pytest
import torch

from spm_train import ConfigError, train_membranes
from spm_train.config import ConceptSpec, TrainerConfig
from spm_train import parallel


def test_each_pack_gets_its_own_precision_in_one_process():
    """accelerate keeps one state per process; a worker trains packs of different precisions in turn."""
    cpu = torch.device("cpu")
    bf16 = parallel.pack_accelerator(cpu, "bf16")
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fp32 = parallel.pack_accelerator(cpu, "fp32")
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert fp32.num_processes == 1 and fp32.scaler is None


def test_fp16_on_the_cpu_is_refused_rather_than_run_in_fp32(sd1_pipe):
    with pytest.raises(ConfigError, match="precision=fp16 needs a GPU"):
        train_membranes(sd1_pipe, [ConceptSpec("cat", "a cat")], TrainerConfig.preset("smoke", precision="fp16"),
                        progress=False)
    assert not any("membrane" in type(m).__name__.lower() for m in sd1_pipe.unet.modules())


def test_a_process_group_accelerate_cannot_see_is_refused(monkeypatch):
    """A group started by hand without RANK / WORLD_SIZE: each process would train alone and the workers'
    membranes drift apart silently."""
    monkeypatch.setattr(parallel, "_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="torch.distributed has 2 processes but accelerate sees 1"):
        parallel.pack_accelerator(torch.device("cpu"), "fp32")


def test_a_deepspeed_config_without_deepspeed_is_refused_before_any_work(sd1_pipe, monkeypatch):
    from spm_train import training

    monkeypatch.setattr(training, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match="DeepSpeed is not installed; it is an optional extra"):
        train_membranes(sd1_pipe, [ConceptSpec("cat", "a cat")], TrainerConfig.preset("smoke"), progress=False,
                        deepspeed={"zero_optimization": {"stage": 2}})


def test_the_fp16_loss_scale_resumes_with_the_checkpoint(tmp_path, sd1_pipe):
    """fp16 on a GPU trains with accelerate's loss scaler; its scale decides which later steps are skipped,
    so an exact resume needs it (a CPU scaler stands in for the GPU's here)."""
    from spm_train.training import PackTrainer

    cfg = TrainerConfig.preset("smoke", iterations=2, checkpoint_every=1)
    concepts = [ConceptSpec("cat", "a cat")]
    state = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 7}  # after a skipped step and 7 good ones
    first = PackTrainer(sd1_pipe, concepts, cfg, checkpoint_dir=str(tmp_path), progress=False)
    try:
        first.accelerator.scaler = torch.amp.GradScaler("cpu")
        first.accelerator.scaler.load_state_dict(state)
        first.step = 1
        first.save_checkpoint()
    finally:
        first.close()
    again = PackTrainer(sd1_pipe, concepts, cfg, checkpoint_dir=str(tmp_path), progress=False)
    try:
        again.accelerator.scaler = torch.amp.GradScaler("cpu")
        assert again.load_checkpoint() == 1
        assert again.accelerator.scaler.state_dict() == state
    finally:
        again.close()
