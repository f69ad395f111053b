"""The build's UNet stage resumes exactly: a long CPU build may be killed and continued in another session."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from spm_train.toyworld import build as tw_build
from spm_train.toyworld.render import make_batch


class _Killed(Exception):
    pass


def _run(cfg, work, kill_after_first_checkpoint=False, monkeypatch=None):
    _, _, scenes = make_batch(16, seed=0)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 4, 8, 8, generator=gen), torch.rand(16, 4, 8, 8, generator=gen) * 0.1
    tokenizer = tw_build.make_tokenizer(work / "tokenizer")
    if kill_after_first_checkpoint:
        real = tw_build._save_tensors

        def save_then_die(tensors, path, **meta):
            real(tensors, path, **meta)
            raise _Killed

        monkeypatch.setattr(tw_build, "_save_tensors", save_then_die)
    return tw_build._stage_unet(cfg, mean, std, scenes, tokenizer, work)


def test_killed_unet_stage_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = tw_build.BuildConfig(steps=6, unet_minutes=0, batch=4, warmup=2, checkpoint_every=3)
    straight = tmp_path / "straight"
    straight.mkdir()
    unet_a, text_a = _run(cfg, straight)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    with pytest.raises(_Killed):
        _run(cfg, resumed, kill_after_first_checkpoint=True, monkeypatch=monkeypatch)
    monkeypatch.undo()
    ckpt = load_file(str(resumed / "unet_ckpt.safetensors"))
    assert any(k.startswith("opt/") and k.endswith("/exp_avg_sq") for k in ckpt)  # optimizer moments saved
    assert not (resumed / "unet_ema.safetensors").exists()
    _measurable_while_running(cfg, resumed, ckpt)
    unet_b, text_b = _run(cfg, resumed)

    for a, b in ((unet_a, unet_b), (text_a, text_b)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    raw_a = load_file(str(straight / "unet_raw.safetensors"))
    raw_b = load_file(str(resumed / "unet_raw.safetensors"))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    # the run did train: the resumed weights are not the initial ones
    init = tw_build.make_unet(cfg.seed).state_dict()
    assert any(not torch.equal(init[k], raw_b[k]) for k in init)
    for work in (straight, resumed):  # one plan, however often the build stopped
        assert json.loads(tw_build._read_tensors(work / "unet_ema.safetensors")[1]["plans"]) == [[0, 6]]


def test_a_resume_with_another_plan_is_recorded(tmp_path, monkeypatch, caplog):
    """A build resumed under another ``--steps`` follows the new learning-rate plan from the checkpoint on,
    and its weights say so: the plans are kept in the checkpoint and the stage's final file."""
    cfg = tw_build.BuildConfig(steps=6, unet_minutes=0, batch=4, warmup=2, checkpoint_every=3)
    with pytest.raises(_Killed):
        _run(cfg, tmp_path, kill_after_first_checkpoint=True, monkeypatch=monkeypatch)
    monkeypatch.undo()
    assert json.loads(tw_build._read_tensors(tmp_path / "unet_ckpt.safetensors")[1]["plans"]) == [[0, 6]]
    with caplog.at_level("WARNING", logger=tw_build.log.name):
        _run(dataclasses.replace(cfg, steps=4), tmp_path)
    assert "plan changes from 6 to 4 steps at step 3" in caplog.text
    assert json.loads(tw_build._read_tensors(tmp_path / "unet_ema.safetensors")[1]["plans"]) == [[0, 6], [3, 4]]


def _measurable_while_running(cfg, work, ckpt):
    """``--measure-checkpoint`` reads the latest checkpoint's EMA weights beside a running (here: killed)
    build."""
    cfg = dataclasses.replace(cfg, work_dir=str(work))
    with pytest.raises(FileNotFoundError, match="vae.safetensors missing"):
        tw_build.checkpoint_pipeline(cfg)
    tw_build._save_state(tw_build.make_vae(0), work / "vae.safetensors", scaling_factor=0.5)
    pipe, step = tw_build.checkpoint_pipeline(cfg)
    assert step == 3
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, ckpt[f"unet_ema/{key}"]), key
    for key, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(value, ckpt[f"text_ema/{key}"]), key
    assert pipe.vae.config.scaling_factor == 0.5
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)
