"""Gated membranes: opened per prompt token in the layers that read the prompt, in generation and training."""

import pytest
import torch
from torch import nn

from spm_train import MembraneBank, MembraneLayer, membrane_targets
from spm_train.config import ConceptSpec, TrainerConfig
from spm_train.errors import ConfigError
from spm_train.membrane import Router, reads_text
from spm_train.models import ModelAdapter, tail_positions
from spm_train.transport import Calibration, GATE_KEY, apply_membranes, token_gate


def _layer(router, slots, text=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(8, 6)
    layer = MembraneLayer(base, router, num_slots=slots, text=text)
    with torch.no_grad():
        layer.down.copy_(torch.randn(layer.down.shape, generator=g))
        layer.up.copy_(torch.randn(layer.up.shape, generator=g))
    return layer


def _branch(layer, x, slot):
    return (x @ layer.down[slot:slot + 1].T) @ layer.up[:, slot:slot + 1].T


def test_kv_scope_is_the_cross_attention_keys_and_values(fresh_sd1):
    unet = fresh_sd1.unet
    width = unet.config.cross_attention_dim
    every = membrane_targets(unet, "transformer")
    cross = membrane_targets(unet, "cross_attention")
    found = membrane_targets(unet, "cross_attention_kv")
    assert sorted(found) == sorted(p for p in cross if p.endswith((".to_k", ".to_v")))
    assert len(found) == len(cross) // 2 and sum(reads_text(p) for p in every) == len(found)
    assert all(m.in_features == width for m in found.values())  # they read the text encoder's states
    bank = MembraneBank.attach(unet, scope="cross_attention_kv")
    assert bank.num_parameters() == sum(width + m.out_features for m in found.values())
    assert all(layer.reads_text for layer in bank.layers.values())


def test_token_permeability_opens_each_token_by_its_own_weight_and_other_layers_by_the_prompt():
    router = Router(torch.tensor([0, 1]), torch.tensor([1.0, 0.5]))
    text, other = _layer(router, 2, text=True), _layer(router, 2, text=False, seed=1)
    x = torch.randn(2, 3, 8)
    gamma = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.25, 0.0]],
                           [[0.0, 1.0], [0.5, 0.0], [0.0, 0.0]]])
    router.set(gamma, tokens)
    got = text(x)
    base = text.base_layer(x)
    torch.testing.assert_close(got[0, 1], base[0, 1])  # a closed token keeps its key/value exactly
    torch.testing.assert_close(got[0, 0], base[0, 0] + _branch(text, x[0, 0], 0))
    torch.testing.assert_close(got[0, 2], base[0, 2] + 0.25 * _branch(text, x[0, 2], 0))
    torch.testing.assert_close(got[1, 0], base[1, 0] + 0.5 * _branch(text, x[1, 0], 1))
    torch.testing.assert_close(got[1, 1], base[1, 1] + 0.5 * _branch(text, x[1, 1], 0))
    # a layer that does not read text uses the per-prompt permeability on every row
    want = other.base_layer(x[1]) + 0.5 * _branch(other, x[1], 0) + 0.5 * _branch(other, x[1], 1)
    torch.testing.assert_close(other(x)[1], want)
    with pytest.raises(ValueError, match="per-token permeability must have shape"):
        router.set(gamma, tokens[:, :, :1])


def test_routed_token_gate_equals_the_dense_per_token_mixture_with_gradients():
    """Training routes each sample through its own membrane with a [batch, tokens] gate; outputs and
    gradients equal the dense per-token permeabilities, and a gated-off token gets no gradient."""
    router = Router(torch.tensor([0, 1]), torch.tensor([2.0, 2.0]))
    layer = _layer(router, 2).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    owners = torch.tensor([1, 0, -1])
    gate = torch.rand(3, 4, dtype=torch.float64)
    gate[0, 2] = 0.0

    def run(setup):
        layer.zero_grad()
        setup()
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        return out.detach(), layer.down.grad.clone(), layer.up.grad.clone()

    routed = run(lambda: router.route(owners, gate))
    assert router.owners is not None  # the gathering path ran
    hit = (owners.unsqueeze(1) == torch.arange(2)).double()
    dense = run(lambda: router.set(hit, hit.unsqueeze(1) * gate.unsqueeze(2)))
    for a, b in zip(routed, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(routed[0][0, 2], layer.base_layer(x[0, 2]).detach())
    with pytest.raises(ValueError, match="token gate must have shape"):
        router.route(owners, gate[:2])


def test_token_gate_opens_content_tokens_by_similarity_and_the_tail_by_the_prompt():
    concept = torch.zeros(1, 4, 3)
    concept[0, 1] = torch.tensor([1.0, 0, 0])
    prompt = torch.tensor([[[0.0, 0, 1], [0, 1, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]]]).float()
    content = torch.tensor([[False, True, True, True, False]])
    tail = torch.tensor([[False, False, False, False, True]])
    gate = token_gate(prompt, content, tail, torch.tensor([[0.7]]), concept, [torch.tensor([0, 1, 0, 0]).bool()],
                      [Calibration(zero=0.5, one=0.9)])
    # start closed; an unrelated token closed; the concept's token open; cos 0.6 -> (0.6-0.5)/0.4; tail at gamma
    torch.testing.assert_close(gate[0, :, 0], torch.tensor([0.0, 0.0, 1.0, 0.25, 0.7]))
    # the concept's own token id opens its position whatever its context made of the embedding
    ids = torch.tensor([[1, 7, 9, 8, 2]])
    gate = token_gate(prompt, content, tail, torch.tensor([[0.7]]), concept, [torch.tensor([0, 1, 0, 0]).bool()],
                      [Calibration(zero=0.5, one=0.9)], ids, [{7}])
    torch.testing.assert_close(gate[0, :, 0], torch.tensor([0.0, 1.0, 1.0, 0.25, 0.7]))


def test_training_gates_open_the_concept_token_after_any_context_and_close_unrelated_prompts(toyworld):
    from spm_train.transport import prompt_gates

    model = ModelAdapter(toyworld)
    prompts = ["red", "a red square", "a square, red", "a green circle"]
    hidden = model.encode(prompts).hidden
    gate = prompt_gates(model, prompts, hidden, "red", Calibration(zero=0.98, one=0.99))
    tok = toyworld.tokenizer
    for row, prompt in enumerate(prompts[:3]):
        ids = model.padded_ids(prompt).tolist()
        red, eos = ids.index(tok.convert_tokens_to_ids("red</w>")), ids.index(tok.eos_token_id)
        assert gate[row, red] == 1 and bool((gate[row, eos:] == 1).all())
        assert gate[row, :red].sum() == 0 and gate[row, red + 1:eos].sum() == 0
    assert gate[3].sum() == 0
    # gate="word": the same concept tokens, the summary positions closed
    word = prompt_gates(model, prompts, hidden, "red", Calibration(zero=0.98, one=0.99),
                        open_tail=False)
    torch.testing.assert_close(word, gate * ~torch.stack([model.tail_mask(p) for p in prompts]))
    assert word[:3].sum() == 3
    sampled = prompt_gates(model, None, torch.randn_like(hidden[:2]) * hidden[:2].norm(dim=-1, keepdim=True),
                           "red", Calibration(zero=0.98, one=0.99))
    assert sampled.shape == hidden[:2].shape[:2] and sampled.max() == 0  # random anchors sit far from "red"


def test_causal_gates_open_every_position_after_the_concept_and_nothing_before(toyworld):
    from spm_train.transport import prompt_gates

    concept = torch.zeros(1, 4, 3)
    concept[0, 1] = torch.tensor([1.0, 0, 0])
    prompt = torch.tensor([[[0.0, 0, 1], [0.6, 0.8, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]]).float()
    content = torch.tensor([[False, True, True, True, False, False]])
    tail = torch.tensor([[False, False, False, False, False, True]])
    args = (prompt, content, tail, torch.tensor([[0.7]]), concept, [torch.tensor([0, 1, 0, 0]).bool()],
            [Calibration(zero=0.5, one=0.9)])
    torch.testing.assert_close(token_gate(*args)[0, :, 0], torch.tensor([0.0, 0.25, 0.0, 1.0, 0.0, 0.7]))
    # each position at least as open as the most open one before it (a function word after it too)
    torch.testing.assert_close(token_gate(*args, spread=[True])[0, :, 0],
                               torch.tensor([0.0, 0.25, 0.25, 1.0, 1.0, 0.7]))
    model = ModelAdapter(toyworld)
    prompts = ["a square, red and striped", "a red square", "a green circle"]
    cal = Calibration(zero=0.98, one=0.99)
    hidden = model.encode(prompts).hidden
    token = prompt_gates(model, prompts, hidden, "red", cal)
    causal = prompt_gates(model, prompts, hidden, "red", cal, spread=True)
    for row, prompt in enumerate(prompts[:2]):
        ids = model.padded_ids(prompt).tolist()
        red = ids.index(toyworld.tokenizer.convert_tokens_to_ids("red</w>"))
        assert causal[row, :red].sum() == 0 and bool((causal[row, red:] == 1).all())
        assert token[row, red + 1:ids.index(toyworld.tokenizer.eos_token_id)].sum() == 0
    assert causal[2].sum() == 0
    with pytest.raises(ConfigError, match="tail_penalty acts on"):
        TrainerConfig(gate="word", tail_penalty=0.1)
    assert TrainerConfig(gate="causal", tail_penalty=0.1).gate == "causal"


def test_tail_positions_start_at_the_first_end_of_text():
    ids = torch.tensor([[49406, 5, 6, 49407, 49407], [49406, 49407, 49407, 49407, 49407]])
    assert tail_positions(ids, 49407).tolist() == [[False, False, False, True, True],
                                                   [False, True, True, True, True]]
    assert not tail_positions(ids, None).any()


def test_gate_is_a_checked_trainer_option_and_keeps_old_keys():
    with pytest.raises(ConfigError, match="gate 'pixel' is not one of"):
        TrainerConfig(gate="pixel")
    assert TrainerConfig().fingerprint() == TrainerConfig(gate="none").fingerprint()
    assert TrainerConfig().fingerprint() != TrainerConfig(gate="token").fingerprint()
    assert "gate" not in TrainerConfig().to_dict() or TrainerConfig().gate == "none"
    assert TrainerConfig(gate="word").fingerprint() != TrainerConfig(gate="token").fingerprint()


@pytest.fixture(scope="module")
def toyworld():
    from spm_train.toyworld import load_pipeline

    return load_pipeline("base")


def _train_red_run(pipe, gate, **options):
    from spm_train.training import train_membranes

    spec = ConceptSpec(name="red", target="red", guidance_scale=16.0)
    trainer = TrainerConfig.preset("toyworld", scope="cross_attention_kv", gate=gate, iterations=6,
                                   phrasings=1, prompt_anchors=2, checkpoint_every=0, **options)
    return train_membranes(pipe, [spec], trainer, progress=False)


def _train_red(pipe, gate, **options):
    return _train_red_run(pipe, gate, **options).membranes[0]


@pytest.fixture(scope="module")
def gated_red(toyworld):
    return _train_red(toyworld, "token")


def _kv_outputs(pipe, prompts, membranes=None):
    """Outputs of every cross-attention key/value layer for ``prompts`` (one step, no guidance)."""
    seen = []
    handle = apply_membranes(pipe, membranes) if membranes else None
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
             for p, m in pipe.unet.named_modules() if reads_text(p)]
    try:
        pipe(list(prompts), num_inference_steps=1, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
        if handle is not None:
            handle.remove()
    return seen


def test_a_gated_membrane_changes_only_the_concept_token_and_the_tail(toyworld, gated_red):
    assert gated_red.extra[GATE_KEY] == "token" and "transport" in gated_red.extra
    assert gated_red.num_layers == 2 * sum(1 for p, _ in toyworld.unet.named_modules() if p.endswith(".attn2"))
    prompts = ["a red square", "a green circle"]
    base = _kv_outputs(toyworld, prompts)
    gated = _kv_outputs(toyworld, prompts, [gated_red])
    assert len(base) == len(gated) == gated_red.num_layers
    tok = toyworld.tokenizer
    ids = tok(prompts[0], padding="max_length", max_length=tok.model_max_length).input_ids
    red, square = (ids.index(tok.convert_tokens_to_ids(w + "</w>")) for w in ("red", "square"))
    eos = ids.index(tok.eos_token_id)
    changed = [(g - b).abs().amax(dim=-1) for g, b in zip(gated, base)]  # [batch, tokens] per layer
    assert min(c[0, red] for c in changed) > 1e-5  # the concept's token: every key and value moves
    assert min(c[0, eos:].min() for c in changed) > 1e-5  # the tail follows the prompt, which names red
    assert all(c[0, square] == 0 and c[0, 0] == 0 and c[0, 1] == 0 for c in changed)  # square, start, "a"
    assert all(c[1].max() == 0 for c in changed)  # a prompt far from red: every key and value as the base's


def test_a_word_gated_membrane_changes_only_the_concept_token(toyworld):
    """gate="word" trains and applies the membrane on the concept's tokens alone: the end-of-text and padding
    positions, where the text encoder sums up the whole prompt, keep the base's keys and values."""
    word_red = _train_red(toyworld, "word")
    assert word_red.extra[GATE_KEY] == "word"
    prompts = ["a red square", "a green circle"]
    base = _kv_outputs(toyworld, prompts)
    gated = _kv_outputs(toyworld, prompts, [word_red])
    tok = toyworld.tokenizer
    ids = tok(prompts[0], padding="max_length", max_length=tok.model_max_length).input_ids
    red = ids.index(tok.convert_tokens_to_ids("red</w>"))
    changed = [(g - b).abs().amax(dim=-1) for g, b in zip(gated, base)]
    assert min(c[0, red] for c in changed) > 1e-5
    opened = torch.zeros(tok.model_max_length, dtype=torch.bool)
    opened[red] = True
    assert all(c[0, ~opened].max() == 0 for c in changed)  # every other position, the tail included
    assert all(c[1].max() == 0 for c in changed)


def _tokens_seen(pipe, membranes, prompts, **transport):
    """The per-token permeabilities the membranes' layers receive for ``prompts`` (one step, no guidance)."""
    handle = apply_membranes(pipe, membranes, **transport)
    seen = []
    set_permeability = handle.bank.set_permeability

    def spy(gamma, tokens=None):
        if tokens is not None:
            seen.append(tokens.detach().clone())
        return set_permeability(gamma, tokens)

    handle.bank.set_permeability = spy
    try:
        pipe(list(prompts), num_inference_steps=1, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return seen[-1]


def test_shared_scaling_splits_the_tail_among_the_membranes_open_on_a_prompt(toyworld, gated_red):
    import dataclasses

    twin = dataclasses.replace(gated_red, name="red-twin")
    prompts = ["a red square", "a green circle"]
    tok = toyworld.tokenizer
    ids = tok(prompts[0], padding="max_length", max_length=tok.model_max_length).input_ids
    red, eos = ids.index(tok.convert_tokens_to_ids("red</w>")), ids.index(tok.eos_token_id)
    linear = _tokens_seen(toyworld, [gated_red, twin], prompts, facilitate=2.0)
    shared = _tokens_seen(toyworld, [gated_red, twin], prompts, facilitate=2.0, scaling="shared")
    # the concept's token: each membrane at f = 2 either way
    assert linear[0, red].tolist() == shared[0, red].tolist() == [2.0, 2.0]
    # the tail: each membrane at f gamma when linear (2 each here, the prompt names red); shared, the two
    # split one opening of f
    assert torch.allclose(linear[0, eos:], torch.full_like(linear[0, eos:], 2.0))
    assert torch.allclose(shared[0, eos:], torch.full_like(shared[0, eos:], 1.0))
    assert torch.all(shared[1] == 0) and torch.all(linear[1] == 0)  # a prompt that opens neither
    # a membrane open alone on its prompt keeps its whole opening
    alone = _tokens_seen(toyworld, [gated_red], prompts, facilitate=2.0, scaling="shared")
    assert torch.allclose(alone[0, eos:], torch.full_like(alone[0, eos:], 2.0))
    assert alone[0, red].item() == 2.0


def test_a_causal_membrane_is_trained_and_opened_from_its_concept_on(toyworld, gated_red):
    causal = _train_red(toyworld, "causal")
    assert causal.extra[GATE_KEY] == "causal"
    prompts = ["a square, red and striped", "a green circle"]
    ids = ModelAdapter(toyworld).padded_ids(prompts[0]).tolist()
    red = ids.index(toyworld.tokenizer.convert_tokens_to_ids("red</w>"))
    seen = _tokens_seen(toyworld, [causal, gated_red], prompts)  # [prompts, tokens, membranes]
    assert seen[0, :red].sum() == 0 and bool((seen[0, red:, 0] == 1).all())
    eos = ids.index(toyworld.tokenizer.eos_token_id)
    assert seen[0, red + 1:eos, 1].sum() == 0  # beside it, a "token" membrane keeps the other words closed
    assert seen[1].sum() == 0


def _tail_energy(pipe, membrane, prompt="a red square") -> float:
    """Relative energy of the membrane's key/value edit at the end-of-text and padding positions."""
    base, edited = _kv_outputs(pipe, [prompt]), _kv_outputs(pipe, [prompt], [membrane])
    tok = pipe.tokenizer
    eos = tok(prompt, padding="max_length", max_length=tok.model_max_length).input_ids.index(tok.eos_token_id)
    return sum(float((e - b)[0, eos:].pow(2).sum() / b[0, eos:].pow(2).sum()) for e, b in zip(edited, base)) / len(base)


def test_tail_penalty_shrinks_the_edit_at_the_summary_positions(toyworld, gated_red):
    """``tail_penalty`` adds the relative energy of the key/value edit at the end-of-text and padding
    positions of the erase rows to the loss: the membrane trained with it edits them far less."""
    free = _tail_energy(toyworld, gated_red)
    assert free > 0
    run = _train_red_run(toyworld, "token", tail_penalty=1000.0)
    penalised = run.membranes[0]
    assert _tail_energy(toyworld, penalised) < 0.5 * free
    assert penalised.trainer["tail_penalty"] == 1000.0
    # the history keeps the latent error ("erase") apart from the penalty ("tail"); "loss" is their sum
    # with the weighted anchors, what was minimised
    la = penalised.trainer["la_strength"]
    assert all(r["tail"] > 0 for r in run.history)
    for r in run.history:
        assert r["loss"] == pytest.approx(r["erase"] + la * r["anchor"] + r["tail"], rel=1e-5)


def test_tail_energy_is_the_relative_edit_at_the_marked_positions():
    from spm_train.architectures import tiny_pipeline
    from spm_train.membrane import MembraneBank
    from spm_train.training import _TailEnergy

    unet = tiny_pipeline("sd1").unet
    bank = MembraneBank.attach(unet, count=2, rank=1, scope="cross_attention_kv")
    path, layer = next((p, m) for p, m in bank.layers.items() if m.reads_text)
    with torch.no_grad():
        layer.up.normal_()
    x = torch.randn(2, 5, layer.base_layer.in_features)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with _TailEnergy(bank, mask) as energy:
        bank.route(torch.tensor([0, 1]), torch.ones(2, 5))
        energy.rows(0, 2)
        out = layer(x)
        got = energy.collect()
    base = layer.base_layer(x)
    want = (out - base)[0, 3:].pow(2).sum() / base[0, 3:].pow(2).sum()
    assert want > 1e-3
    torch.testing.assert_close(got.detach(), torch.stack([want, torch.tensor(0.0)]).detach(), rtol=1e-5, atol=1e-7)
    assert got.grad_fn is not None  # the penalty trains the membrane
    assert not layer._forward_hooks and not layer.base_layer._forward_hooks  # hooks go with the context


def test_tail_penalty_is_checked_and_keeps_old_keys():
    with pytest.raises(ConfigError, match="tail_penalty acts on the end-of-text positions"):
        TrainerConfig(tail_penalty=0.1)
    with pytest.raises(ConfigError, match="tail_penalty must be >= 0"):
        TrainerConfig(gate="token", tail_penalty=-1.0)
    assert TrainerConfig(gate="token").fingerprint() == TrainerConfig(gate="token", tail_penalty=0.0).fingerprint()
    assert TrainerConfig(gate="token").fingerprint() != TrainerConfig(gate="token", tail_penalty=0.1).fingerprint()
