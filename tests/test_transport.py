"""Facilitated transport: gamma per prompt and batch element, exact composition through a real pipeline."""

import pytest
import torch

from spm_train import MembraneBank, MembraneLayer, apply_membranes, permeability
from spm_train.models import ModelAdapter
from spm_train.transport import cosine_matrix, token_overlap


def _membrane(pipe, name, concept, seed):
    bank = MembraneBank.attach(pipe.unet, generators=[torch.Generator().manual_seed(seed)])
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.1)
    membrane = bank.export(0, name=name, concepts=(concept,), family="sd1")
    bank.detach()
    return membrane


def test_token_overlap_ignores_special_tokens_and_counts_the_concepts_share(sd1_pipe):
    model = ModelAdapter(sd1_pipe)
    concept = model.token_ids("van gogh")
    assert len(concept) == 2
    assert token_overlap(model.token_ids("a painting by van gogh"), concept) == 1.0
    assert token_overlap(model.token_ids("a van"), concept) == 0.5
    assert token_overlap(model.token_ids("a red car"), concept) == 0.0


def test_gamma_is_one_for_the_concept_and_its_paraphrases_and_lower_for_unrelated_prompts(sd1_pipe):
    model = ModelAdapter(sd1_pipe)
    prompts = ["snoopy", "a photo of snoopy", "a red car", "a house"]
    embeds = model.encode(prompts).hidden
    concept = model.encode(["snoopy"]).hidden
    ids = [model.token_ids(p) for p in prompts]
    gamma = permeability(embeds, ids, concept, [model.token_ids("snoopy")], [0], 1)
    assert gamma[0, 0] == pytest.approx(1.0, abs=1e-5)  # cos = 1
    assert gamma[1, 0] == pytest.approx(1.0)  # every concept token present
    cos = cosine_matrix(embeds[2:], concept)[:, 0]
    torch.testing.assert_close(gamma[2:, 0], cos)  # unrelated: the embedding similarity alone
    assert (gamma[2:, 0] < 1).all()
    assert permeability(embeds, ids, concept, [model.token_ids("snoopy")], [0], 1, facilitate=0.5)[1, 0] == 0.5


def test_gamma_takes_the_max_over_each_membranes_concepts(sd1_pipe):
    model = ModelAdapter(sd1_pipe)
    concepts = ["snoopy", "mickey", "van gogh"]
    prompts = ["a photo of mickey", "painting by van gogh", "a tree"]
    gamma = permeability(model.encode(prompts).hidden, [model.token_ids(p) for p in prompts],
                         model.encode(concepts).hidden, [model.token_ids(c) for c in concepts], [0, 0, 1], 2)
    assert gamma.shape == (3, 2)
    assert gamma[0, 0] == pytest.approx(1.0)  # mickey opens membrane 0 (snoopy + mickey)
    assert gamma[1, 1] == pytest.approx(1.0)  # van gogh opens membrane 1
    assert gamma[0, 1] < 1 and gamma[1, 0] < 1 and (gamma[2] < 1).all()


def test_pipeline_applies_gamma_per_batch_element_and_removal_restores_it(fresh_sd1):
    pipe = fresh_sd1
    m = _membrane(pipe, "snoopy", "snoopy", 1)
    prompts = ["a photo of snoopy", "a red car"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def generate(prompt, rows=slice(0, 2)):
        return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                    latents=latents[rows]).images

    base = generate(prompts)
    with apply_membranes(pipe, [m], transport=True) as handle:
        equipped = generate(prompts)
        gamma = handle.last_permeability
        # CFG batch [uncond x2, cond x2]: each uncond row follows its prompt
        assert gamma.shape == (4, 1)
        torch.testing.assert_close(gamma[:2], gamma[2:])
        assert gamma[2, 0] == pytest.approx(1.0) and gamma[3, 0] < 1
        # each element equals generating it alone with its own gamma
        alone = [generate([p], slice(i, i + 1)) for i, p in enumerate(prompts)]
    torch.testing.assert_close(equipped, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert (equipped[0] - base[0]).abs().max() > 1e-3
    assert not any(isinstance(mod, MembraneLayer) for mod in pipe.unet.modules())
    torch.testing.assert_close(generate(prompts), base)


def test_two_membranes_compose_as_the_sum_of_their_deltas(fresh_sd1):
    """UNet(both at gamma) - base == (UNet(A) - base) + (UNet(B) - base) to first order, and exactly
    per layer; here checked on a single membrane layer output through the pipeline's UNet."""
    pipe = fresh_sd1
    a, b = _membrane(pipe, "snoopy", "snoopy", 1), _membrane(pipe, "mickey", "mickey", 2)
    with apply_membranes(pipe, [a, b], transport=False, scales=[0.6, 0.3]) as handle:
        layer = next(iter(handle.bank.layers.values()))
        x = torch.randn(2, *layer.down.shape[1:2], 4, 4) if layer.is_conv else torch.randn(2, layer.down.shape[1])
        both = layer(x) - layer.base_layer(x)
        parts = []
        for gamma in ([0.6, 0.0], [0.0, 0.3]):
            with handle.bank.permeability(torch.tensor(gamma)):
                parts.append(layer(x) - layer.base_layer(x))
    torch.testing.assert_close(both, parts[0] + parts[1], rtol=1e-5, atol=1e-6)


def test_without_transport_every_prompt_gets_the_full_membrane(fresh_sd1):
    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    with apply_membranes(fresh_sd1, [m], transport=False, scales=[0.8]) as handle:
        fresh_sd1(["a red car", "snoopy"], num_inference_steps=2, output_type="pt")
        assert handle.last_permeability.tolist() == [[pytest.approx(0.8)]]


def test_content_similarity_removes_the_padding_floor(sd1_pipe):
    """The paper's cosine is high for any two padded prompts; the calibrated one maps unrelated ones to 0."""
    from spm_train.transport import content_cosine

    model = ModelAdapter(sd1_pipe)
    prompts = ["snoopy", "a red car", "a house"]
    embeds = model.encode(prompts).hidden
    concept = model.encode(["snoopy"]).hidden
    masks = [model.content_mask(p) for p in prompts]
    assert [int(m.sum()) for m in masks] == [1, 2, 1]  # "a" names nothing
    calibrated = content_cosine(embeds, masks, concept, [model.content_mask("snoopy")], threshold=0.7)[:, 0]
    paper = cosine_matrix(embeds, concept)[:, 0]
    assert calibrated[0] == pytest.approx(1.0, abs=1e-5)
    assert (calibrated[1:] < paper[1:]).all()
    unknown = content_cosine(embeds, [None] * 3, concept, [model.content_mask("snoopy")], threshold=0.7)[:, 0]
    torch.testing.assert_close(unknown, paper)  # without token masks: the paper's similarity


def test_pipeline_transport_with_content_similarity(fresh_sd1):
    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    with apply_membranes(fresh_sd1, [m], similarity="content") as handle:
        fresh_sd1(["snoopy", "a red car"], num_inference_steps=2, output_type="pt")
        gamma = handle.last_permeability[2:, 0]
    with apply_membranes(fresh_sd1, [m], similarity="paper") as handle:
        fresh_sd1(["snoopy", "a red car"], num_inference_steps=2, output_type="pt")
        paper = handle.last_permeability[2:, 0]
    assert gamma[0] == pytest.approx(1.0) and paper[0] == pytest.approx(1.0)
    assert gamma[1] < paper[1]
    with pytest.raises(ValueError, match="similarity 'fuzzy'"):
        apply_membranes(fresh_sd1, [m], similarity="fuzzy")


def test_guidance_pairs_are_read_from_the_batch_not_from_the_last_pipeline_call(fresh_sd1):
    """After a guided call, a guidance-1 batch from another pipeline on the same UNet (or a direct UNet
    call) scores every row by its own prompt; a guided batch pairs each negative row with its prompt."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = fresh_sd1
    m = _membrane(pipe, "snoopy", "snoopy", 1)
    with apply_membranes(pipe, [m]) as handle:
        pipe(["a red car"], num_inference_steps=2, guidance_scale=7.5, output_type="pt")
        guided = handle.last_permeability[:, 0]
        assert guided.shape == (2,) and guided[0] == guided[1] < 1  # the negative row follows "a red car"
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        image = torch.rand(2, 3, 32, 32)
        img2img(["snoopy", "a red car"], image=image, num_inference_steps=2, strength=1.0,
                guidance_scale=1.0, output_type="pt")
        gamma = handle.last_permeability[:, 0]
        assert gamma[0] == pytest.approx(1.0) and gamma[1] < 1
        # a direct UNet call on embeddings of one encoder call: no pairs either
        hidden, _ = pipe.encode_prompt(["a red car", "snoopy"], "cpu", 1, False)
        pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), encoder_hidden_states=hidden)
        gamma = handle.last_permeability[:, 0]
        assert gamma[1] == pytest.approx(1.0) and gamma[0] < 1


def test_a_failed_set_up_leaves_the_pipeline_as_it_was(fresh_sd1, monkeypatch):
    from spm_train.transport import MembraneHandle

    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)

    def broken(self):
        raise RuntimeError("tokenizer failed")

    monkeypatch.setattr(MembraneHandle, "_setup_concepts", broken)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        apply_membranes(fresh_sd1, [m])
    assert not any(isinstance(mod, MembraneLayer) for mod in fresh_sd1.unet.modules())
    monkeypatch.undo()
    with apply_membranes(fresh_sd1, [m]) as handle:  # the pipeline takes membranes again
        assert handle.bank.num_layers > 0


def test_embeddings_from_elsewhere_are_scored_by_the_paper_cosine_with_a_warning(fresh_sd1, caplog):
    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    hidden, _ = fresh_sd1.encode_prompt(["a red car"], "cpu", 1, False)
    with apply_membranes(fresh_sd1, [m]) as handle, caplog.at_level("WARNING", logger="spm_train.transport"):
        reweighted = hidden * 1.0001  # what prompt-weighting tools hand the pipeline
        fresh_sd1.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=reweighted)
        gamma = handle.last_permeability[0, 0]
    torch.testing.assert_close(gamma, cosine_matrix(reweighted, handle.concept_embeds)[0, 0])
    assert "did not come from this pipeline's text encoder" in caplog.text


def test_fused_projections_and_lora_wrapped_layers_are_refused_by_name(fresh_sd1):
    from spm_train.errors import IncompatibleMembraneError

    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    fresh_sd1.unet.fuse_qkv_projections()
    try:
        with pytest.raises(IncompatibleMembraneError, match="fused"):
            apply_membranes(fresh_sd1, [m])
    finally:
        fresh_sd1.unet.unfuse_qkv_projections()
    path, linear = next((p, mod) for p, mod in fresh_sd1.unet.named_modules() if p.endswith("attn2.to_k"))
    wrapper = torch.nn.Module()
    wrapper.base_layer = linear
    parent, _, child = path.rpartition(".")
    setattr(fresh_sd1.unet.get_submodule(parent), child, wrapper)
    try:
        with pytest.raises(IncompatibleMembraneError, match="LoRA adapters"):
            apply_membranes(fresh_sd1, [m])
    finally:
        setattr(fresh_sd1.unet.get_submodule(parent), child, linear)
    assert not any(isinstance(mod, MembraneLayer) for mod in fresh_sd1.unet.modules())


def test_guided_batches_pair_rows_whatever_the_prompts_repeat(fresh_sd1):
    """An empty prompt, a prompt equal to another row's negative, or negatives encoded before the prompts
    still pair each negative row with its prompt."""
    pipe = fresh_sd1
    m = _membrane(pipe, "snoopy", "snoopy", 1)
    with apply_membranes(pipe, [m]) as handle:
        pipe(["snoopy", ""], num_inference_steps=1, guidance_scale=7.5, output_type="pt")
        gamma = handle.last_permeability[:, 0]
        torch.testing.assert_close(gamma[:2], gamma[2:])
        assert gamma[2] == pytest.approx(1.0)
        pipe(["snoopy", "a red car"], negative_prompt=["a red car", "x"], num_inference_steps=1,
             guidance_scale=7.5, output_type="pt")
        gamma = handle.last_permeability[:, 0]
        torch.testing.assert_close(gamma[:2], gamma[2:])
        assert gamma[2] == pytest.approx(1.0) and gamma[3] < 1
        negative, _ = pipe.encode_prompt(["a red car"], "cpu", 1, False)  # cached before the prompt
        prompt, _ = pipe.encode_prompt(["snoopy"], "cpu", 1, False)
        pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=1, guidance_scale=7.5,
             output_type="pt")
        gamma = handle.last_permeability[:, 0]
        assert gamma[0] == gamma[1] == pytest.approx(1.0)


def test_function_words_never_open_a_membrane_outside_the_papers_similarity(fresh_sd1):
    """The paper's overlap counts "a": every prompt with "a" opened the "a circle" membrane to >= 0.5, and
    "circle" alone only to 0.5. Content tokens only: "a square" shares nothing, "circle" everything."""
    m = _membrane(fresh_sd1, "circle", "a circle", 1)
    prompts = ["a square", "circle", "a photo of a circle"]
    with apply_membranes(fresh_sd1, [m], similarity="paper") as handle:
        paper = handle.prompt_permeability(prompts)[:, 0]
    with apply_membranes(fresh_sd1, [m], similarity="token", threshold=0.999) as handle:
        token = handle.prompt_permeability(prompts)[:, 0]
    assert paper[0] >= 0.5  # "a" shared
    assert token[0] == 0.0
    assert token[1] == 1.0 and token[2] == 1.0


def test_a_membranes_calibration_travels_in_its_header(fresh_sd1, tmp_path):
    from spm_train.membrane import load_membrane
    from spm_train.transport import TRANSPORT_KEY, Calibration, calibrated, token_similarity

    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    m.extra[TRANSPORT_KEY] = Calibration(0.2, 0.6).to_header()
    loaded = load_membrane(m.save(str(tmp_path / "snoopy.safetensors")))
    prompts = ["a red car", "a house", "a tree"]
    with apply_membranes(fresh_sd1, [loaded]) as handle:  # "token" is the default similarity
        assert handle.calibration == [Calibration(0.2, 0.6)]
        gamma = handle.prompt_permeability(prompts)[:, 0]
    model = ModelAdapter(fresh_sd1)
    raw = token_similarity(model.encode(prompts).hidden, [model.content_mask(p) for p in prompts],
                           model.encode(["snoopy"]).hidden, [model.content_mask("snoopy")])[:, 0]
    torch.testing.assert_close(gamma, calibrated(raw, torch.tensor(0.2), torch.tensor(0.6)))
    m.extra[TRANSPORT_KEY] = "{not json"
    with apply_membranes(fresh_sd1, [m], threshold=0.5) as handle:  # unreadable: the caller's default
        assert handle.calibration == [Calibration(0.5, 1.0)]


def test_official_scaling_applies_gamma_squared_and_prompt_permeability_matches_the_pipeline(fresh_sd1):
    m = _membrane(fresh_sd1, "snoopy", "snoopy", 1)
    prompts = ["a photo of snoopy", "a red car"]
    with apply_membranes(fresh_sd1, [m], similarity="paper") as handle:
        linear = handle.prompt_permeability(prompts)
        fresh_sd1(prompts, num_inference_steps=2, output_type="pt")
        torch.testing.assert_close(handle.last_permeability[2:], linear)  # the conditional rows
    with apply_membranes(fresh_sd1, [m], similarity="paper", scaling="official") as handle:
        torch.testing.assert_close(handle.prompt_permeability(prompts), linear.pow(2))
    assert 0 < linear[1, 0] < 1  # so the square is a different number
    with pytest.raises(ValueError, match="scaling 'cubic'"):
        apply_membranes(fresh_sd1, [m], scaling="cubic")


def test_calibration_on_toyworld_closes_unrelated_captions_and_opens_phrasings():
    from spm_train.prompts import PromptCorpus
    from spm_train.toyworld import load_pipeline
    from spm_train.transport import calibrate_transport, token_similarity

    pipe = load_pipeline()
    corpus = PromptCorpus.load("toyworld", size=600)
    cal = calibrate_transport(pipe, ["red"], corpus)
    model = ModelAdapter(pipe)
    unrelated = corpus.unrelated(["red"])
    raw = token_similarity(model.encode(unrelated).hidden, [model.content_mask(p) for p in unrelated],
                           model.encode(["red"]).hidden, [model.content_mask("red")])[:, 0]
    assert (raw <= cal.zero).float().mean() >= 0.99  # unrelated captions stay closed
    assert cal.zero < cal.one <= 1.0
