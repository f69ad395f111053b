"""Transport checks that need the wide ToyWorld's text encoder (synonyms). The world is read once, at
import, so ``test_wide_world.py`` runs this file in a ``SPM_TOYWORLD=wide`` process."""

import pytest
import torch

from spm_train.models import ModelAdapter
from spm_train.prompts import PromptCorpus
from spm_train.toyworld import load_pipeline
from spm_train.toyworld.render import WORLD
from spm_train.transport import calibrate_transport, calibrated, token_similarity


@pytest.fixture(scope="module")
def wide():
    if not WORLD.synonyms:
        pytest.skip("needs SPM_TOYWORLD=wide (tests/toyworld/test_wide_world.py runs it so)")
    return load_pipeline(), PromptCorpus.load("toyworld")


def test_lexical_transport_opens_on_every_synonym_and_on_no_other_value(wide):
    """Each value's lexical calibration (from the corpus alone) opens its membrane on the value's synonym
    (the 20 pairs measured 0.85-0.97) and leaves every other value of every attribute closed."""
    pipe, corpus = wide
    model = ModelAdapter(pipe)
    values = list(WORLD.shapes) + list(WORLD.colours) + list(WORLD.styles)
    opened, leaked = {}, {}
    for word, synonym in WORLD.synonyms:
        cal = calibrate_transport(pipe, [word], corpus, similarity="lexical")
        prompts = [synonym] + [v for v in values if v != word]
        raw = token_similarity(model.lexical_of(prompts), [model.content_mask(p) for p in prompts],
                               model.lexical_of([word]), [model.content_mask(word)])[:, 0]
        gamma = calibrated(raw, torch.tensor(cal.zero), torch.tensor(cal.one))
        opened[word] = float(gamma[0])
        leaked[word] = max(zip(gamma[1:].tolist(), prompts[1:]))
    assert min(opened.values()) >= 0.75, opened
    assert max(g for g, _ in leaked.values()) == 0.0, leaked


def test_the_contextual_calibration_saturates_where_the_lexical_one_separates(wide):
    """Why the wide world needs "lexical": every caption's contextual output sits near every concept's, so
    the calibrated zero point of "token" comes out at 0.99 and leaves a sliver for synonyms."""
    pipe, corpus = wide
    for concept in ("red", "a heart", "striped"):
        token = calibrate_transport(pipe, [concept], corpus)
        lexical = calibrate_transport(pipe, [concept], corpus, similarity="lexical")
        assert token.zero >= 0.95 and lexical.zero <= 0.65, (concept, token, lexical)
