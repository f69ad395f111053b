"""The pack trainer: the paper's losses, per-concept randomness, pack = separate runs, exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spm_train import ConceptSpec, ConfigError, MembraneLayer, TrainerConfig, train_membranes
from spm_train.architectures import tiny_pipeline
from spm_train.training import PackTrainer, concept_seed, sample_anchors

SMOKE = TrainerConfig.preset("smoke", iterations=3, lr=1e-2)
CAT = ConceptSpec("cat", "a photo of a cat")
DOG = ConceptSpec("dog", "dog", surrogate="cat")
VAN = ConceptSpec("vangogh", "painting by van gogh", action="erase")


def _max_diff(a, b):
    return max(max((a.weights[k][0] - b.weights[k][0]).abs().max().item(),
                   (a.weights[k][1] - b.weights[k][1]).abs().max().item()) for k in a.weights)


def test_a_pack_trains_each_membrane_as_separate_runs_would():
    """Same per-concept draws -> same weights. Trained in fp64: Adam's normalisation turns fp32 rounding in
    near-zero gradients into visible steps, which is noise, not a difference of algorithm. Membranes are
    exported in fp32, so equal fp64 weights agree to fp32 resolution."""
    pipe = tiny_pipeline("sd1").to(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=3)  # down weights first move at step 2 (up starts at 0)
    pack = train_membranes(pipe, [CAT, VAN], cfg, progress=False)
    for membrane, spec in zip(pack.membranes, [CAT, VAN]):
        alone = train_membranes(pipe, [spec], cfg, progress=False).membranes[0]
        assert membrane.name == spec.name
        assert _max_diff(membrane, alone) < 1e-6  # exported in fp32; a real difference shows at lr scale (1e-2)
        moved = max(alone.weights[k][1].abs().max().item() for k in alone.weights)
        assert moved > 1e-3  # and the membranes did train
    by_step = {(r["concept"], r["step"]): r["loss"] for r in pack.history}
    assert len(by_step) == 4


def test_micro_batches_give_the_same_weights():
    pipe = tiny_pipeline("sd1").to(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=2)
    whole = train_membranes(pipe, [CAT], cfg, progress=False)
    chunked = train_membranes(pipe, [CAT], cfg.replace(micro_batch=2), progress=False)
    assert _max_diff(whole.membranes[0], chunked.membranes[0]) < 1e-6  # fp32 export of fp64 training
    assert [r["loss"] for r in whole.history] == pytest.approx([r["loss"] for r in chunked.history], rel=1e-9)


def test_channels_last_trains_the_same_weights_and_restores_the_layout():
    """The speed knob changes the UNet's memory layout while it trains (the 1x1 projections then gather
    membranes over the innermost channel axis), never the weights it reaches."""
    pipe = tiny_pipeline("sd1").to(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=2)
    plain = train_membranes(pipe, [CAT, VAN], cfg, progress=False)
    seen = []
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    fast = train_membranes(pipe, [CAT, VAN], cfg.replace(channels_last=True), progress=False)
    hook.remove()
    assert seen and all(seen)
    assert all(p.is_contiguous() for p in pipe.unet.parameters())
    pipe.unet.to(memory_format=torch.channels_last)  # a UNet already in channels-last stays so
    train_membranes(pipe, [CAT], cfg.replace(iterations=1, channels_last=True), progress=False)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    for a, b in zip(plain.membranes, fast.membranes):
        assert _max_diff(a, b) < 1e-6
    with pytest.raises(ConfigError, match="channels_last must be true or false"):
        cfg.replace(channels_last="yes")


def test_a_compiled_unet_trains_the_same_weights(monkeypatch):
    """trainer.compile traces the UNet with its membrane layers; the traced graphs must follow every
    routing change (trajectory, membrane off, membrane on) and the batch sizes of a shrinking trajectory.
    AOTAutograd without Inductor's code generation keeps this seconds long on a CPU."""
    compiled, real_compile = [], torch.compile

    def tracing_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", tracing_compile)
    torch._dynamo.reset()
    pipe = tiny_pipeline("sd1").to(torch.float64)
    cfg = SMOKE.replace(iterations=2, max_denoising_steps=3)
    eager = train_membranes(pipe, [CAT, VAN], cfg, progress=False)
    traced = train_membranes(pipe, [CAT, VAN], cfg.replace(compile=True), progress=False)
    torch._dynamo.reset()
    assert compiled == [pipe.unet]
    for a, b in zip(eager.membranes, traced.membranes):
        assert _max_diff(a, b) < 1e-6
    assert [r["loss"] for r in traced.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-9)


CAPTIONS = ["a cat on a white background", "a red cat", "a dog in a house", "a green tree", "a photo of a dog",
            "a red car", "a house with a tree", "a blue car on a white background", "a cat and a dog"]


def _corpus(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS))
    return str(path)


@pytest.mark.parametrize("corpus", [False, True], ids=["paper", "phrasings+prompt-anchors"])
def test_resuming_from_a_checkpoint_gives_the_same_weights(tmp_path, corpus):
    pipe = tiny_pipeline("sd1")
    cfg = SMOKE.replace(iterations=4, checkpoint_every=2)
    if corpus:
        cfg = cfg.replace(phrasings=2, prompt_anchors=2, corpus=_corpus(tmp_path))
        tmp_path = tmp_path / "run"
    straight = train_membranes(pipe, [CAT, DOG], cfg, progress=False)
    # a run that dies after its step-2 checkpoint ...
    first = PackTrainer(pipe, [CAT, DOG], cfg.replace(iterations=4), checkpoint_dir=str(tmp_path), progress=False)
    for _ in range(2):
        first._train_step()
        first.step += 1
    first.save_checkpoint()
    first.close()
    # ... and its retry
    resumed = train_membranes(pipe, [CAT, DOG], cfg, checkpoint_dir=str(tmp_path), progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    for a, b in zip(straight.membranes, resumed.membranes):
        assert _max_diff(a, b) == 0.0


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    pipe = tiny_pipeline("sd1")
    cfg = SMOKE.replace(iterations=2, checkpoint_every=1)
    train_membranes(pipe, [CAT], cfg, checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="belongs to another run"):
        train_membranes(pipe, [CAT], cfg.replace(lr=5e-3), checkpoint_dir=str(tmp_path), progress=False)


def test_training_leaves_the_pipeline_unchanged(fresh_sd1):
    unet = fresh_sd1.unet
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=ehs).sample
    unet.train()  # a UNet someone is fine-tuning: some parameters trainable, in train mode
    unet.conv_in.requires_grad_(False)
    wanted = {name for name, p in unet.named_parameters() if p.requires_grad}
    train_membranes(fresh_sd1, [CAT], SMOKE, progress=False)
    assert not any(isinstance(m, MembraneLayer) for m in unet.modules())
    assert unet.training and {name for name, p in unet.named_parameters() if p.requires_grad} == wanted
    assert "conv_in.weight" not in wanted and "conv_out.weight" in wanted
    unet.eval()
    with torch.no_grad():
        assert torch.equal(unet(x, 10, encoder_hidden_states=ehs).sample, before)


def test_first_step_losses_are_the_papers(fresh_sd1):
    """At step 0 (up = 0) the membrane is closed in effect, so
    L_erase = MSE(eps(target), eps(neutral) - g (eps(positive) - eps(neutral))) with eps off, and L_anchor = 0."""
    spec = ConceptSpec("cat", "a photo of a cat", guidance_scale=2.0, surrogate="dog")
    trainer = PackTrainer(fresh_sd1, [spec], SMOKE, progress=False)
    captured = {}
    predict = trainer.model.predict

    def spy(latents, t, embeds, resolution=None):
        out = predict(latents, t, embeds, resolution)
        if torch.is_grad_enabled():
            captured["on"] = (latents, t, embeds, out)
        return out

    trainer.model.predict = spy
    losses = trainer._train_step()
    trainer.close()
    latents, t, embeds, on = captured["on"]
    c = trainer.concepts[0]
    with torch.no_grad():
        pos = predict(latents[:1], t[:1], c.positive)
        neu = predict(latents[:1], t[:1], c.neutral)
        tgt = predict(latents[:1], t[:1], c.target)
    expected = F.mse_loss(tgt, neu - 2.0 * (pos - neu))
    loss, erase, anchor, tail = losses[0].tolist()
    assert erase == pytest.approx(expected.item(), rel=1e-5)
    assert anchor == pytest.approx(0.0, abs=1e-12)
    assert tail == 0.0  # no tail_penalty
    assert loss == pytest.approx(erase + SMOKE.la_strength * anchor)
    assert on.shape[0] == 1 + SMOKE.anchors_per_step
    # the latent sits at the 1000-step timestep matching its trajectory step
    assert 0 <= int(t[0]) < 1000 and len(set(t.tolist())) == 1


def test_plain_erase_uses_no_anchors(fresh_sd1):
    result = train_membranes(fresh_sd1, [VAN], SMOKE, progress=False)
    assert all(r["anchor"] == 0 and r["loss"] == r["erase"] for r in result.history)


def test_anchor_sampling_follows_the_paper():
    target = torch.randn(16, 32)
    g = torch.Generator().manual_seed(0)
    anchors = sample_anchors(target, 64, g, (0.8, 1.2))
    assert anchors.shape == (64, 16, 32)
    ratio = anchors.flatten(1).norm(dim=1) / target.norm()
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6
    assert ratio.std() > 0.05  # scales are drawn, not fixed
    cos = F.cosine_similarity(anchors.flatten(1), target.flatten().unsqueeze(0))
    assert cos.abs().max() < 0.2  # random directions in 512 dimensions
    again = sample_anchors(target, 64, torch.Generator().manual_seed(0), (0.8, 1.2))
    assert torch.equal(anchors, again)


def test_anchor_acceptance_rejects_noise_aligned_with_the_target():
    """Acceptance probability 1 - cos: a candidate equal to the target (cos 1) is never kept."""
    target = torch.ones(1, 4)
    g = torch.Generator().manual_seed(0)
    kept = sample_anchors(target, 2000, g, (1.0, 1.0), pool=4)
    cos = F.cosine_similarity(kept.flatten(1), target.flatten().unsqueeze(0))
    # in 4 dimensions the accepted set must be biased away from the target direction
    assert cos.mean() < -0.05


def test_concept_seeds_depend_on_name_and_seed_only():
    assert concept_seed(0, "cat") == concept_seed(0, "cat")
    assert len({concept_seed(0, "cat"), concept_seed(1, "cat"), concept_seed(0, "dog")}) == 3


def test_bad_pack_input_is_refused(fresh_sd1):
    with pytest.raises(ConfigError, match="concept list is empty"):
        train_membranes(fresh_sd1, [], SMOKE, progress=False)
    with pytest.raises(ConfigError, match="unique"):
        train_membranes(fresh_sd1, [CAT, CAT], SMOKE, progress=False)


def test_a_bf16_base_trains_fp32_membranes_close_to_the_fp32_base():
    """A bf16 base without autocast: the membrane branch runs in bf16 on casts of the fp32 weights."""
    cfg = SMOKE.replace(iterations=1)
    full = PackTrainer(tiny_pipeline("sd1"), [CAT, VAN], cfg, progress=False)
    reference = full._train_step()
    full.close()
    half = PackTrainer(tiny_pipeline("sd1").to(torch.bfloat16), [CAT, VAN], cfg, progress=False)
    try:
        assert {p.dtype for p in half.bank.parameters()} == {torch.float32}
        losses = half._train_step()
        torch.testing.assert_close(losses, reference, rtol=5e-2, atol=1e-5)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in half.bank.parameters())
        moved = max(layer.up.abs().max().item() for layer in half.bank.layers.values())
        assert moved > 0  # the fp32 weights took the bf16 branch's gradients
    finally:
        half.close()


def test_phrasings_and_prompt_anchors_leave_the_papers_draws_as_they_were(tmp_path):
    """The paper's draws (trajectory length, noise, sampled anchors) are the same with the new options, so
    variants compare on equal trajectories; phrasings are erased towards themselves without the concept."""
    from spm_train.models import ModelAdapter
    from spm_train.prompts import replace_concept

    pipe = tiny_pipeline("sd1")
    plain = PackTrainer(pipe, [CAT, DOG], SMOKE, progress=False)
    plain_draws = [plain._draw() for _ in range(3)]
    plain.close()
    cfg = SMOKE.replace(phrasings=3, prompt_anchors=2, corpus=_corpus(tmp_path))
    rich = PackTrainer(pipe, [CAT, DOG], cfg, progress=False)
    for before in plain_draws:
        after = rich._draw()
        for (t0, n0, a0, _), (t1, n1, a1, phrasings) in zip(before, after):
            assert t0 == t1 and torch.equal(n0, n1)
            assert torch.equal(a1.hidden[:len(a0)], a0.hidden)  # the sampled anchors first, unchanged
            assert len(a1) == len(a0) + 2 and len(phrasings[0]) == 3
    rich.close()
    # a surrogate written as a prompt ("a cat") stands in with its own words
    rich = PackTrainer(pipe, [CAT, ConceptSpec("dog", "dog", surrogate="a cat")], cfg, progress=False)
    cat, dog = rich.concepts
    model = ModelAdapter(pipe)
    dog_phrasings = ["a dog in a house", "a photo of a dog", "a cat and a dog"]
    assert torch.equal(dog.phrasing_pos.hidden, model.encode(dog_phrasings).hidden)
    # dog's surrogate is "cat": each phrasing is pushed towards itself with a cat in the dog's place
    neutral = [replace_concept(p, "dog", "cat") for p in dog_phrasings]
    assert neutral == ["a cat in a house", "a photo of a cat", "a cat and a cat"]
    assert torch.equal(dog.phrasing_neu.hidden, model.encode(neutral).hidden)
    # prompt anchors name no concept of the pack
    unrelated = ["a green tree", "a red car", "a house with a tree", "a blue car on a white background"]
    assert torch.equal(cat.anchor_pool.hidden, model.encode(unrelated).hidden)
    # erase rows: the target and its 3 phrasings, each weighted a quarter of the target alone
    layout = rich.sample_layout
    numel = math.prod(rich.latent_shape)
    erase = layout["weight"][(layout["owner"] == 0) & (layout["slot"] % 2 == 0)]
    assert erase.numel() == 4 and torch.allclose(erase, torch.full((4,), 1 / (4 * numel)))
    rich.close()


def test_the_official_anchor_batch_anchors_every_other_row_to_the_empty_prompt():
    pipe = tiny_pipeline("sd1")
    ours = PackTrainer(pipe, [CAT], SMOKE.replace(anchors_per_step=4), progress=False)
    mine = ours._draw()[0][2].hidden
    ours.close()
    official = PackTrainer(pipe, [CAT], SMOKE.replace(anchors_per_step=4, anchor_batch="official"), progress=False)
    theirs = official._draw()[0][2].hidden
    uncond = official.uncond.hidden[0]
    official.close()
    assert all(torch.equal(theirs[i], uncond) for i in (0, 2))
    assert torch.equal(theirs[1::2], mine[1::2]) and not torch.equal(mine[0], uncond)


def test_the_paper_preset_does_not_clip_and_new_options_need_a_corpus():
    assert TrainerConfig.preset("paper").max_grad_norm == 0.0  # the paper and the official code do not clip
    assert TrainerConfig.preset("paper").anchor_batch == "project"
    with pytest.raises(ConfigError) as err:
        TrainerConfig(phrasings=2, calibrate=True, anchor_batch="theirs", corpus_size=0)
    message = str(err.value)
    assert "phrasings, calibrate need corpus" in message and "anchor_batch 'theirs'" in message
    assert "corpus_size must be >= 1" in message


def test_calibrated_training_writes_the_transport_into_the_header(tmp_path):
    from spm_train.membrane import load_membrane
    from spm_train.transport import TRANSPORT_KEY, Calibration

    pipe = tiny_pipeline("sd1")
    cfg = SMOKE.replace(iterations=1, calibrate=True, corpus=_corpus(tmp_path))
    membrane = train_membranes(pipe, [CAT], cfg, progress=False).membranes[0]
    loaded = load_membrane(membrane.save(str(tmp_path / "cat.safetensors")))
    cal = Calibration.from_membrane(loaded, Calibration(-2.0, 2.0))
    assert -1.0 <= cal.zero < cal.one <= 1.0 and json.loads(loaded.extra[TRANSPORT_KEY])["similarity"] == "token"


def test_phrasings_can_be_erased_at_their_own_guidance(tmp_path):
    """The target's rows keep the concept's guidance_scale; with ``phrasing_guidance`` the phrasing rows use
    it instead (0: each phrasing's goal is the prediction of the same sentence with the surrogate)."""
    pipe = tiny_pipeline("sd1")
    spec = ConceptSpec("dog", "dog", surrogate="a cat", guidance_scale=4.0)
    cfg = SMOKE.replace(phrasings=3, corpus=_corpus(tmp_path), batch_size=2)
    same = PackTrainer(pipe, [spec], cfg, progress=False)
    rows = torch.zeros(2 * 4, 4, 8, 8)
    assert same._erase_guidance(same.concepts[0], rows) == 4.0
    same.close()
    own = PackTrainer(pipe, [spec], cfg.replace(phrasing_guidance=0.0), progress=False)
    g = own._erase_guidance(own.concepts[0], rows)
    assert g.shape == (8, 1, 1, 1) and g.flatten().tolist() == [4.0, 4.0] + [0.0] * 6
    own.close()
    assert cfg.fingerprint() != cfg.replace(phrasing_guidance=0.0).fingerprint()
    assert cfg.fingerprint() == cfg.replace(phrasing_guidance=None).fingerprint()
    with pytest.raises(ValueError, match="phrasing_guidance must be >= 0"):
        cfg.replace(phrasing_guidance=-1.0)


def test_weight_noise_trains_on_perturbed_bases_and_restores_the_base_exactly():
    """``weight_noise`` redraws Gaussian noise of that relative size on every frozen UNet tensor each
    iteration (never on the membranes), from the seed and the step, and puts the base back bit for bit."""
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = SMOKE.replace(weight_noise=0.1)
    seen = []
    trainer = PackTrainer(pipe, [CAT], cfg, progress=False)
    step = trainer._train_step

    def spy():
        w = pipe.unet.conv_in.weight
        seen.append(((w - before["conv_in.weight"]).pow(2).mean().sqrt() / before["conv_in.weight"].pow(2).mean().sqrt()).item())
        layer = next(iter(trainer.bank.layers.values()))
        seen.append(layer.up.detach().clone())
        return step()

    trainer._train_step = spy
    noisy = trainer.train().membranes[0]
    trainer.close()
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rel = seen[0::2]
    assert all(0.07 < r < 0.13 for r in rel) and len(set(rel)) == len(rel)  # about 10 %, a new draw each step
    assert not seen[1].any()  # the membrane itself is not perturbed (its up factor starts at zero)
    again = train_membranes(pipe, [CAT], cfg, progress=False).membranes[0]
    clean = train_membranes(pipe, [CAT], SMOKE, progress=False).membranes[0]
    assert _max_diff(noisy, again) == 0.0 and _max_diff(noisy, clean) > 1e-4
    assert SMOKE.fingerprint() == SMOKE.replace(weight_noise=0.0).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="weight_noise must be >= 0"):
        SMOKE.replace(weight_noise=-0.1)
