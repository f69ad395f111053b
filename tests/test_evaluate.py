"""The evaluation suite's arithmetic on tiny random models: same seeds, exact baselines, CLIP scoring."""

import pytest
import torch

from spm_train import ConceptSpec, MembraneBank
from spm_train.architectures import tiny_pipeline
from spm_train.evaluate import ClipScorer, EvalSettings, evaluate_concept, generate

SETTINGS = EvalSettings(samples_per_prompt=2, steps=2, guidance_scale=3.0, batch_size=3)
SNOOPY = ConceptSpec("snoopy", "snoopy", probes=["snoopy", "a photo of snoopy"], nontarget=["a red car", "a house"])


@pytest.fixture(scope="module")
def clip():
    from tests.conftest import tiny_clip

    model, tok = tiny_clip()
    return ClipScorer(model=model, tokenizer=tok)


def _membrane(pipe, scale):
    bank = MembraneBank.attach(pipe.unet, generators=[torch.Generator().manual_seed(0)])
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.up.normal_(0, scale, generator=torch.Generator().manual_seed(1)) if scale else layer.up.zero_()
    membrane = bank.export(0, name="snoopy", concepts=("snoopy",), family="sd1")
    bank.detach()
    return membrane


def test_an_image_depends_on_its_prompt_and_seed_not_on_its_batch():
    pipe = tiny_pipeline("sd1")
    together, flat = generate(pipe, ["snoopy", "a house"], SETTINGS)
    alone, _ = generate(pipe, ["a house"], SETTINGS)
    assert flat == ["snoopy", "snoopy", "a house", "a house"]
    torch.testing.assert_close(together[2:], alone, rtol=1e-4, atol=1e-4)
    assert together.min() >= 0 and together.max() <= 1


def test_a_closed_membrane_changes_nothing_and_an_open_one_does(clip):
    pipe = tiny_pipeline("sd1")
    cache = {}
    idle = evaluate_concept(pipe, SNOOPY, [_membrane(pipe, 0.0)], clip, SETTINGS, baseline=cache)
    assert idle.target_pixel_mse == 0 and idle.nontarget_pixel_mse == 0
    assert idle.target_after == idle.target_before and idle.preservation_drop == 0
    assert idle.erasure_rate == pytest.approx(1 - idle.target_before)
    assert idle.gamma_target == pytest.approx(1.0)  # every probe names snoopy
    assert idle.gamma_nontarget < 1
    strong = evaluate_concept(pipe, SNOOPY, [_membrane(pipe, 0.5)], clip, SETTINGS, baseline=cache)
    assert strong.target_pixel_mse > 1e-4
    # facilitated transport: non-target prompts open the membrane less, so they change less
    assert strong.nontarget_pixel_mse < strong.target_pixel_mse
    off = evaluate_concept(pipe, SNOOPY, [_membrane(pipe, 0.5)], clip,
                           EvalSettings(**{**SETTINGS.__dict__, "transport": False}), baseline=cache)
    assert off.gamma_nontarget == pytest.approx(1.0)
    assert off.nontarget_pixel_mse > strong.nontarget_pixel_mse


def test_clip_scores_are_cosines_and_accuracies_are_shares(clip):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    score = clip.clip_score(images, ["snoopy"] * 4)
    assert score.shape == (4,) and (score >= 0).all() and (score <= 100).all()
    acc = clip.prompt_accuracy(images, ["snoopy", "a house", "snoopy", "a house"])
    assert set(acc.tolist()) <= {0.0, 1.0}
    present = clip.concept_present(images, SNOOPY)
    assert present.dtype == torch.bool and present.shape == (4,)


def test_the_report_has_a_table_and_a_grid_per_membrane(clip, tmp_path):
    from PIL import Image

    from spm_train.evaluate import evaluate_set
    from spm_train.report import evaluation_report

    pipe = tiny_pipeline("sd1")
    other = ConceptSpec("house", "a house", nontarget=["a red car"])
    membranes = {"snoopy": _membrane(pipe, 0.3), "house": _membrane(pipe, 0.2)}
    membranes["house"].name = "house"
    rows = evaluate_set(pipe, [SNOOPY, other], membranes, clip, SETTINGS, ablations={"snoopy": _membrane(pipe, 0.1)})
    # snoopy: transport on, off, no anchoring, together; house: on, off, together
    assert [(e.concept, e.equipped, e.transport, e.anchoring) for e in rows] == [
        ("snoopy", "alone", True, True), ("snoopy", "alone", False, True), ("snoopy", "alone", True, False),
        ("snoopy", "all together", True, True), ("house", "alone", True, True), ("house", "alone", False, True),
        ("house", "all together", True, True)]
    path = evaluation_report(str(tmp_path), "test report", rows)
    text = open(path).read()
    assert text.count("| snoopy |") == 4 and "grids/snoopy.png" in text
    grid = Image.open(tmp_path / "grids" / "snoopy.png")
    assert grid.size == (200 + 3 * 96, 18 + 4 * 96)  # 4 prompts; original | membrane | all membranes
    assert (tmp_path / "report.html").exists()
