"""The "lexical" similarity: per-token transport on the text encoder's input token embeddings."""

import dataclasses
import json
import logging

import pytest
import torch

from spm_train.config import ConceptSpec, TrainerConfig
from spm_train.errors import ConfigError
from spm_train.models import ModelAdapter
from spm_train.transport import (TRANSPORT_KEY, Calibration, apply_membranes, calibrate_transport, concept_reference,
                                 prompt_gates, token_similarity)


@pytest.fixture(scope="module")
def toyworld():
    from spm_train.toyworld import load_pipeline

    return load_pipeline("base")


@pytest.fixture(scope="module")
def corpus():
    from spm_train.prompts import PromptCorpus

    return PromptCorpus.load("toyworld", size=600)


def _position(pipe, prompt: str, word: str) -> int:
    tok = pipe.tokenizer
    return ModelAdapter(pipe).padded_ids(prompt).tolist().index(tok.convert_tokens_to_ids(word + "</w>"))


def test_lexical_rows_are_the_centred_input_embeddings_whatever_the_context(toyworld):
    model = ModelAdapter(toyworld)
    prompts = ["red", "a red square", "a square, red"]
    lexical = model.lexical_of(prompts)
    table = toyworld.text_encoder.get_input_embeddings().weight.float()
    red = toyworld.tokenizer.convert_tokens_to_ids("red</w>")
    assert lexical.shape == (3, toyworld.tokenizer.model_max_length, table.shape[1])
    rows = [lexical[i, _position(toyworld, p, "red")] for i, p in enumerate(prompts)]
    torch.testing.assert_close(rows[0], table[red] - table.mean(0))
    assert all(torch.equal(rows[0], r) for r in rows[1:])  # the same word, the same row: no context
    # the contextual output of the same word differs with its neighbours
    hidden = model.encode(prompts).hidden
    assert not torch.allclose(hidden[0, _position(toyworld, prompts[0], "red")],
                              hidden[1, _position(toyworld, prompts[1], "red")])


def test_lexical_calibration_closes_unrelated_captions_and_gates_the_concept_token(toyworld, corpus):
    cal = calibrate_transport(toyworld, ["red"], corpus, similarity="lexical")
    assert cal.similarity == "lexical" and cal.zero < cal.one <= 1.0
    assert json.loads(cal.to_header())["similarity"] == "lexical"
    model = ModelAdapter(toyworld)
    unrelated = corpus.unrelated(["red"])
    raw = token_similarity(model.lexical_of(unrelated), [model.content_mask(p) for p in unrelated],
                           model.lexical_of(["red"]), [model.content_mask("red")])[:, 0]
    assert (raw <= cal.zero).float().mean() >= 0.99
    prompts = ["a red square", "a square, red", "a green circle"]
    gate = prompt_gates(model, prompts, model.encode(prompts).hidden, "red", cal)
    for row, prompt in enumerate(prompts[:2]):
        red = _position(toyworld, prompt, "red")
        eos = model.padded_ids(prompt).tolist().index(toyworld.tokenizer.eos_token_id)
        assert gate[row, red] == 1 and bool((gate[row, eos:] == 1).all())
        assert gate[row, :red].sum() == 0 and gate[row, red + 1:eos].sum() == 0
    assert gate[2].sum() == 0
    # embeddings that are no prompt hold no token: a lexical membrane stays closed on them
    hidden = model.encode(prompts).hidden
    assert prompt_gates(model, None, hidden, "red", cal).abs().sum() == 0
    ref = concept_reference(model, "red", "lexical")
    torch.testing.assert_close(prompt_gates(model, prompts, hidden, "red", cal, ref), gate)


def test_calibration_headers_name_their_similarity(caplog):
    from spm_train.membrane import Membrane

    def membrane(raw):
        return Membrane(name="m", concepts=("red",), family="sd1", rank=1, alpha=1.0, weights={},
                        extra={TRANSPORT_KEY: raw})

    default = Calibration()
    lexical = Calibration(0.4, 0.95, "lexical")
    assert Calibration.from_membrane(membrane(lexical.to_header()), default) == lexical
    older = json.dumps({"zero": 0.9, "one": 1.0})  # headers written before the similarity was recorded
    assert Calibration.from_membrane(membrane(older), default) == Calibration(0.9, 1.0, "token")
    with caplog.at_level(logging.WARNING, logger="spm_train.transport"):
        bad = json.dumps({"similarity": "pixel", "zero": 0.4, "one": 1.0})
        assert Calibration.from_membrane(membrane(bad), default) == default
    assert "unreadable transport calibration" in caplog.text


def test_similarity_is_a_checked_trainer_option_and_keeps_old_keys():
    with pytest.raises(ConfigError, match="similarity 'pixel' is not one of"):
        TrainerConfig(similarity="pixel")
    assert TrainerConfig().fingerprint() == TrainerConfig(similarity="token").fingerprint()
    assert TrainerConfig().fingerprint() != TrainerConfig(similarity="lexical").fingerprint()


def _train_red(pipe, **options):
    from spm_train.training import train_membranes

    spec = ConceptSpec(name="red", target="red", guidance_scale=16.0)
    trainer = TrainerConfig.preset("toyworld", scope="cross_attention_kv", iterations=6, phrasings=1,
                                   prompt_anchors=2, checkpoint_every=0, corpus_size=600, **options)
    return train_membranes(pipe, [spec], trainer, progress=False).membranes[0]


def test_a_lexical_membrane_opens_as_it_was_trained_beside_a_contextual_one(toyworld):
    lexical = _train_red(toyworld, similarity="lexical")
    header = json.loads(lexical.extra[TRANSPORT_KEY])
    assert header["similarity"] == "lexical" and header["zero"] < 0.9
    contextual = dataclasses.replace(_train_red(toyworld, similarity="token"), name="red_token")
    assert json.loads(contextual.extra[TRANSPORT_KEY])["similarity"] == "token"
    prompts = ["a red square", "a square, red", "a green circle", "a blue triangle"]
    with apply_membranes(toyworld, [lexical]) as handle:  # the default reads the header
        assert handle.spaces == ["lexical"]
        alone = handle.prompt_permeability(prompts)[:, 0]
    assert alone[:2].tolist() == [1.0, 1.0] and alone[2:].tolist() == [0.0, 0.0]
    with apply_membranes(toyworld, [contextual]) as handle:
        other = handle.prompt_permeability(prompts)[:, 0]
    with apply_membranes(toyworld, [lexical, contextual]) as handle:
        assert handle.spaces == ["lexical", "token"]
        both = handle.prompt_permeability(prompts)
    torch.testing.assert_close(both, torch.stack([alone, other], dim=1))  # each scored in its own similarity
    # similarity="lexical" scores every membrane on the input embeddings, a contextual one from `threshold`
    with apply_membranes(toyworld, [contextual], similarity="lexical", threshold=0.5) as handle:
        assert handle.spaces == ["lexical"] and handle.calibration == [Calibration(0.5, 1.0, "lexical")]
        assert handle.prompt_permeability(prompts)[:2, 0].tolist() == [1.0, 1.0]
