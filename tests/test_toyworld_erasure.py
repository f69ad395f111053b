"""End to end on the shipped ToyWorld model: membranes erase what they should and keep the rest.

Thresholds are the measured figures of the `toyworld` trainer preset with a small margin for sampling
noise (docs/evaluation-and-toyworld.md, "Erasure on ToyWorld"); the evaluation uses fixed seeds, so a
run repeats exactly on one machine.
"""

import pytest
import torch

from spm_train import TrainerConfig, train_membranes
from spm_train.evaluate import EvalSettings, ToyWorldScorer, evaluate_concept
from spm_train.models import load_base_model
from spm_train.toyworld.search import concept_for

SETTINGS = EvalSettings(samples_per_prompt=6, steps=20, guidance_scale=3.0, seed=0)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    pipe = load_base_model("toyworld")
    circle, red = concept_for("circle"), concept_for("red")
    result = train_membranes(pipe, [circle, red], TrainerConfig.preset("toyworld"), progress=False)
    membranes = {m.name: m for m in result.membranes}
    return pipe, ToyWorldScorer(), circle, red, membranes


def test_the_toyworld_preset_is_the_shipped_hydra_preset():
    from hydra import compose, initialize_config_dir

    import pipelines.bulk_train  # noqa: F401
    from pipelines.bulk_train import _setup_trainer
    from tests.bulk.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["trainer=toyworld"])
    assert _setup_trainer(cfg).fingerprint() == TrainerConfig.preset("toyworld").fingerprint()


# Measured on the shipped model with the `toyworld` preset and this evaluation
# (docs/evaluation-and-toyworld.md, "Erasure on ToyWorld"): red 1.00 -> 0.25 with non-target accuracy 0.94 -> 0.94; circle 0.88 -> 0.00 with non-target
# shape accuracy 0.88 -> 0.71; both equipped: circle 0.04, red 0.04, and red's non-target prompts (which
# name circles) lose 0.25; circle on the variant 0.75 -> 0.00.
MARGIN = 0.1


def test_a_colour_membrane_erases_and_preserves(world):
    pipe, scorer, circle, red, membranes = world
    ev = evaluate_concept(pipe, red, [membranes["red"]], scorer, SETTINGS)
    assert ev.target_before >= 0.9
    assert ev.target_after <= 0.25 + MARGIN
    assert ev.preservation_drop <= 0.0 + MARGIN
    assert ev.gamma_target == pytest.approx(1.0) and ev.gamma_nontarget < 0.75


def test_a_shape_membrane_erases_at_the_measured_cost(world):
    pipe, scorer, circle, red, membranes = world
    ev = evaluate_concept(pipe, circle, [membranes["circle"]], scorer, SETTINGS)
    assert ev.target_before >= 0.75
    assert ev.target_after <= 0.0 + MARGIN
    assert ev.preservation_drop <= 0.17 + MARGIN


def test_two_membranes_equipped_together_keep_both_erasures(world):
    pipe, scorer, circle, red, membranes = world
    both = [membranes["circle"], membranes["red"]]
    for concept, measured in ((circle, 0.04), (red, 0.04)):
        ev = evaluate_concept(pipe, concept, both, scorer, SETTINGS)
        assert ev.target_after <= measured + MARGIN, concept.name
    red_both = evaluate_concept(pipe, red, both, scorer, SETTINGS)
    # red's non-target prompts ("a green circle", ...) name circles, which the circle membrane erases
    assert red_both.preservation_drop <= 0.25 + MARGIN


def test_the_shape_membrane_transfers_to_the_variant_model(world):
    """The "community fine-tune" shares the architecture: measured 0.75 -> 0.00 there."""
    _, scorer, circle, _, membranes = world
    variant = load_base_model("toyworld:variant")
    ev = evaluate_concept(variant, circle, [membranes["circle"]], scorer, SETTINGS)
    assert ev.target_before >= 0.7
    assert ev.target_after <= 0.0 + MARGIN
