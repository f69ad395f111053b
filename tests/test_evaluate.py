"""The evaluation suite's arithmetic on tiny random models: same seeds, exact baselines, CLIP scoring."""

from html.parser import HTMLParser

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


class _Page(HTMLParser):
    """The tables (cell texts by row) and the inline images of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def test_the_report_has_a_table_and_a_labelled_grid_per_concept_and_a_self_contained_html_page(clip, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from spm_train.evaluate import evaluate_set
    from spm_train.grids import GridLayout
    from spm_train.report import REPORT_COLUMNS, evaluation_report

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
    on, off, together = rows[0].images, rows[1].images, rows[3].images
    assert on.before.shape[:2] == (4, 2)  # every prompt, both samples (fewer than grid_samples' 4)
    assert off.gamma.eq(1).all() and not off.transport
    assert together.membranes == ["snoopy", "house"] and together.gamma.shape == (4, 2)
    assert on.gamma[0, 0] == pytest.approx(1.0)  # "snoopy" opens its own membrane fully
    candidates = [SNOOPY.target, *SNOOPY.nontarget]
    assert all(text in candidates for row in on.verdicts_after for text, _ in row)

    path = evaluation_report(str(tmp_path), "test report", rows)
    assert path == str(tmp_path / "report.html")
    text = (tmp_path / "report.md").read_text()
    assert text.count("| snoopy |") == 4 and "grids/snoopy.png" in text
    grid = np.asarray(Image.open(tmp_path / "grids" / "snoopy.png").convert("RGB"))
    side = on.before.shape[-1]
    layout = GridLayout(4, 5, 2, (side, side), header_lines=2, max_cell=256)  # original + 4 comparisons
    assert grid.shape[:2] == (layout.size[1], layout.size[0]) and layout.factor == 128 // side
    # column 2 is transport off: its row-3 sample-1 image, enlarged by whole pixels
    x0, y0, x1, y1 = layout.box(3, 2, 1)
    image = (off.after[3, 1].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    f = int(layout.factor)
    assert np.array_equal(grid[y0:y1, x0:x1], np.repeat(np.repeat(image, f, axis=0), f, axis=1))

    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    metrics = page.tables[0]
    assert metrics[0] == list(REPORT_COLUMNS) and len(metrics) == 1 + len(rows)
    for cells, e in zip(metrics[1:], rows):
        assert cells[:4] == [e.concept, e.equipped, "on" if e.transport else "off", "on" if e.anchoring else "off"]
        assert float(cells[4]) == pytest.approx(e.erasure_rate, abs=5e-4)
        assert float(cells[9]) == pytest.approx(e.preservation_drop, abs=5e-4)
    assert len(page.images) == 2  # snoopy's and house's grids, inline
    for src, name in zip(page.images, ("snoopy", "house")):
        assert src.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert png.format == "PNG" and png.size == Image.open(tmp_path / "grids" / f"{name}.png").size


def test_a_model_that_never_draws_the_concept_reports_no_drawable_probe(clip):
    """``drawable`` counts the probes the model draws the concept in; with none (a fine-tune that lost the
    concept), erasure is still counted on every probe, and ``drawable`` 0 says there was nothing to erase
    (the registry's transfer check reads it)."""

    class Blind:  # sees the concept in no image
        def concept_present(self, images, concept):
            return torch.zeros(images.shape[0], dtype=torch.bool)

        def prompt_accuracy(self, images, prompts):
            return clip.prompt_accuracy(images, prompts)

        def features(self, images):
            return clip.features(images)

    pipe = tiny_pipeline("sd1")
    blind = evaluate_concept(pipe, SNOOPY, [_membrane(pipe, 0.5)], Blind(), SETTINGS)
    assert (blind.drawable, blind.target_before, blind.target_drop, blind.erasure_rate) == (0, 0.0, 0.0, 1.0)
    assert blind.metrics()["drawable"] == 0
