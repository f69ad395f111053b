"""The library on a CUDA device: same algorithm as on the CPU, the fast path's promises kept.

Skipped where no CUDA device is present (marker ``gpu``); ``launch/gpu_checks.sh`` runs them with the
benchmark on a GPU node.
"""

import pytest
import torch

from spm_train import ConceptSpec, TrainerConfig, train_membranes
from spm_train.architectures import tiny_pipeline
from spm_train.training import PackTrainer

pytestmark = pytest.mark.gpu

SMOKE = TrainerConfig.preset("smoke", iterations=3, lr=1e-2)
CAT = ConceptSpec("cat", "a photo of a cat")
VAN = ConceptSpec("vangogh", "painting by van gogh", action="erase")


def _max_diff(a, b):
    return max(max((a.weights[k][0] - b.weights[k][0]).abs().max().item(),
                   (a.weights[k][1] - b.weights[k][1]).abs().max().item()) for k in a.weights)


def _cuda_pipe(dtype=torch.float32):
    return tiny_pipeline("sd1").to("cuda", dtype)


def test_a_pack_on_cuda_trains_each_membrane_as_separate_runs_would():
    pipe = _cuda_pipe(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=3)
    pack = train_membranes(pipe, [CAT, VAN], cfg, progress=False)
    for membrane, spec in zip(pack.membranes, [CAT, VAN]):
        alone = train_membranes(pipe, [spec], cfg, progress=False).membranes[0]
        assert _max_diff(membrane, alone) < 1e-6
        assert max(alone.weights[k][1].abs().max().item() for k in alone.weights) > 1e-3


def test_speed_knobs_on_cuda_train_the_same_weights():
    """channels_last (cuDNN's preferred layout, the 1x1 projections then gather membranes over the channel
    axis) and a compiled UNet reach the weights of the plain pack (fp64)."""
    pipe = _cuda_pipe(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=3)
    plain = train_membranes(pipe, [CAT, VAN], cfg, progress=False).membranes
    for knob in ({"channels_last": True}, {"compile": True}):
        fast = train_membranes(pipe, [CAT, VAN], cfg.replace(**knob), progress=False).membranes
        for a, b in zip(plain, fast):
            assert _max_diff(a, b) < 1e-6, knob
    assert all(p.is_contiguous() for p in pipe.unet.parameters())


def test_an_iteration_never_waits_on_the_host():
    """No .item(), no blocking copy, no host-side decision on device values inside ``_train_step``."""
    pipe = _cuda_pipe()
    pack = PackTrainer(pipe, [CAT, VAN], SMOKE.replace(precision="bf16", micro_batch=3), progress=False)
    try:
        pack._train_step()  # the first call initialises kernels and handles, which may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                losses = pack._train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert losses.device.type == "cuda" and torch.isfinite(losses).all()
    finally:
        pack.close()


def test_bf16_autocast_keeps_fp32_membranes_and_the_fp32_losses():
    pipe = _cuda_pipe()
    cfg = SMOKE.replace(iterations=1)
    full = PackTrainer(pipe, [CAT, VAN], cfg, progress=False)
    reference = full._train_step()
    full.close()
    fast = PackTrainer(pipe, [CAT, VAN], cfg.replace(precision="bf16"), progress=False)
    try:
        assert {p.dtype for p in fast.bank.parameters()} == {torch.float32}
        losses = fast._train_step()  # the same draws: the difference is bf16 rounding alone
        torch.testing.assert_close(losses, reference, rtol=5e-2, atol=1e-5)
        assert {p.dtype for p in fast.optimizer.state[fast.bank.parameters()[0]].values()
                if p.dim() > 0} == {torch.float32}
    finally:
        fast.close()


def test_fitted_pack_size_trains_without_running_out_of_memory():
    from spm_train.packing import fit_pack_size

    pipe = _cuda_pipe()
    cfg = SMOKE.replace(iterations=1, precision="bf16")
    k = fit_pack_size(pipe, cfg, limit=16)
    assert 1 <= k <= 16
    concepts = [ConceptSpec(f"c{i}", f"a photo of concept {i}") for i in range(k)]
    result = train_membranes(pipe, concepts, cfg, progress=False)
    assert len(result.membranes) == k


def test_membranes_from_cuda_generate_with_transport_on_cuda():
    from spm_train import apply_membranes

    pipe = _cuda_pipe()
    membrane = train_membranes(pipe, [CAT], SMOKE, progress=False).membranes[0]
    assert membrane.weights[next(iter(membrane.weights))][0].device.type == "cpu"
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "a red car"]
    gen = [torch.Generator("cuda").manual_seed(0) for _ in prompts]
    before = pipe(prompts, num_inference_steps=3, output_type="pt", generator=gen).images
    with apply_membranes(pipe, [membrane]) as handle:
        gen = [torch.Generator("cuda").manual_seed(0) for _ in prompts]
        after = pipe(prompts, num_inference_steps=3, output_type="pt", generator=gen).images
        gamma = handle.last_permeability[-2:, 0]
    assert gamma[0].item() == pytest.approx(1.0) and gamma[1].item() < 1.0
    assert (after[0] - before[0]).abs().max() > 1e-4  # the concept's image changed


def test_bf16_packed_toyworld_membrane_erases_on_cuda():
    """The fast path on a GPU (bf16 autocast, a pack of two) erases as on the CPU. On this base the CPU gives
    P(red) 1.00 -> 0.25 (fp32, seed 0; 0.17 and 0.00 at seeds 1-2) and 0.25 in a bf16 pack of three (0.33
    before packs gathered each sample's membrane rows); CUDA draws differ from CPU draws, so the bound is
    the top of what the CPU has shown, with the suite's margin. (On the
    previous base an H100 measured 0.46 against the CPU's 0.17.)"""
    from spm_train.evaluate import EvalSettings, ToyWorldScorer, evaluate_concept
    from spm_train.models import load_base_model
    from spm_train.toyworld.search import concept_for

    pipe = load_base_model("toyworld", device="cuda")
    circle, red = concept_for("circle"), concept_for("red")
    trainer = TrainerConfig.preset("toyworld").replace(precision="bf16")
    membranes = {m.name: m for m in train_membranes(pipe, [circle, red], trainer, progress=False).membranes}
    settings = EvalSettings(samples_per_prompt=6, steps=20, guidance_scale=3.0, seed=0)
    ev = evaluate_concept(pipe, red, [membranes["red"]], ToyWorldScorer(), settings)
    assert ev.target_before >= 0.9
    assert ev.target_after <= 0.33 + 0.1
    assert ev.preservation_drop <= 0.1
