"""The erasure report's measurement: held-out phrasings, drawable prompts, intervals, exact reuse of the
base generations where no membrane opens, and the candidate selection of the registry stage."""

import json

import pytest
import torch

from spm_train import ConceptSpec, MembraneBank
from spm_train.erasure import ErasureBench, ErasureSettings, bootstrap_mean, summarise
from spm_train.prompts import PromptCorpus
from spm_train.toyworld.eval_prompts import EVAL_TEMPLATES, erasure_prompts, form_problems
from spm_train.transport import TRANSPORT_KEY, Calibration

CIRCLE = ConceptSpec("circle", "a circle", guidance_scale=16.0)
RED = ConceptSpec("red", "red", guidance_scale=16.0)


def test_evaluation_prompts_are_held_out_from_the_training_corpus():
    assert len(EVAL_TEMPLATES) >= 12
    targets, others = erasure_prompts(["circle", "red", "striped"], fills=2, seed=0)
    evaluation = {p.text for ps in targets.values() for p in ps} | {p.text for p in others}
    corpus = set(PromptCorpus.load("toyworld", size=5000).captions)  # every caption form training can see
    assert not evaluation & corpus
    assert all(p.value("colour") == "red" for p in targets["red"])
    # non-target prompts name no erased value, and every kept value of every attribute can appear
    assert not any({"circle", "red", "striped"} & {v for _, v in p.attributes} for p in others)
    with pytest.raises(ValueError, match="every style is erased"):
        erasure_prompts(["solid", "outline", "striped", "dotted"])


def test_other_sentence_forms_are_checked_and_used():
    forms = ["please draw a {colour} {shape} that is {style}", "{style}, {colour}, {shape} on {background}"]
    targets, others = erasure_prompts(["circle", "red"], fills=2, seed=0, forms=forms)
    assert len(targets["red"]) == len(others) == 4
    assert targets["red"][0].text.startswith("please draw a red ") and targets["red"][0].template == 0
    assert all(p.text.count(",") == 2 and " on " in p.text for p in others[2:])
    assert form_problems(forms) == []
    problems = form_problems(["a {colour} {shape}", "a {shape} {shape} {colour} {style}",
                              "{colour} {size} {shape} {style}", "{style} {colour} {shape}", 3])
    assert len(problems) == 5
    assert "missing or repeated ['style']" in problems[0] and "missing or repeated ['shape']" in problems[1]
    assert "unknown ['size']" in problems[2] and "training caption form" in problems[3]
    assert "not a string" in problems[4]
    assert form_problems("a {colour} {shape} {style}") == ["forms must be a non-empty list of sentence forms"]
    with pytest.raises(ValueError, match="training caption form"):
        erasure_prompts(["red"], forms=["{colour} {shape}, {style}"])


def test_the_report_takes_other_forms_and_rejects_bad_ones_before_training():
    from hydra import compose, initialize_config_dir

    import pipelines.erasure_report  # noqa: F401
    from pipelines.erasure_report import check
    from spm_train.errors import ConfigError
    from tests.bulk.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("erasure_report", overrides=["+forms=unseen", "variants=[gated]"])
        bad = compose("erasure_report", overrides=["bench.forms=['a {colour} {shape}']", "variants=[gated]"])
    _, _, settings = check(cfg)
    assert len(settings.forms) >= 12 and not set(settings.forms) & set(EVAL_TEMPLATES)
    with pytest.raises(ConfigError, match=r"bench.forms: form 'a \{colour\} \{shape\}' must name"):
        check(bad)


def test_a_concept_without_drawable_prompts_is_left_out_of_the_summary():
    """On a model that never draws a concept on these prompts (the variant's stripes on some forms), its P
    after is undefined; the worst and mean figures come from the other concepts, in any row order."""
    from spm_train.erasure import ErasureRow

    def row(concept, drawable, p_after, drop):
        nan = float("nan")
        return ErasureRow(concept, "alone", drawable, nan if not drawable else 0.9, p_after, (nan, nan), nan,
                          90.0, 90.0 - drop, drop, (drop, drop), 0.0, nan if not drawable else 10.0, 1.0, 0.0)

    rows = [row("striped", 0, float("nan"), 0.5), row("cross", 11, 0.03, 0.0), row("red", 12, 0.01, -0.2)]
    for order in (rows, rows[::-1]):
        got = summarise(order)["alone"]
        assert got["max_p_after"] == 0.03 and got["mean_p_after"] == pytest.approx(0.02)
        assert got["max_nontarget_drop"] == 0.5 and got["mean_rest_drop"] == 10.0 and got["measured"] == 2


def test_bootstrap_intervals_are_over_prompts():
    assert bootstrap_mean(torch.full((10,), 0.25), 200) == (0.25, 0.25)
    lo, hi = bootstrap_mean(torch.tensor([0.0] * 10 + [1.0] * 10), 2000)
    assert 0.2 <= lo < 0.4 and 0.6 < hi <= 0.8  # the mean of 20 fair coins: 0.5 +- 1.96 x 0.112


@pytest.fixture(scope="module")
def bench():
    from spm_train.toyworld import load_pipeline

    settings = ErasureSettings(samples=2, fills=1, templates=2, steps=8, bootstrap=100)
    return ErasureBench(load_pipeline(), [CIRCLE, RED], settings, progress=False)


def _zero_membrane(pipe, name, concept):
    bank = MembraneBank.attach(pipe.unet, generators=[torch.Generator().manual_seed(0)])
    membrane = bank.export(0, name=name, concepts=(concept,), family="sd1")  # up weights start at zero
    bank.detach()
    return membrane


def test_a_membrane_that_changes_nothing_measures_as_nothing_and_is_pictured_as_such(bench, tmp_path):
    membranes = {"circle": _zero_membrane(bench.pipe, "circle", "a circle"),
                 "red": _zero_membrane(bench.pipe, "red", "red")}
    snapshots = {}
    rows = bench.measure(membranes, snapshots=snapshots)
    assert [(r.concept, r.equipped) for r in rows] == [
        ("circle", "alone"), ("red", "alone"), ("circle", "together"), ("red", "together")]
    for r in rows:
        assert r.p_after == pytest.approx(r.p_before) and r.nontarget_drop == pytest.approx(0.0)
        assert r.pixel_mse == pytest.approx(0.0, abs=1e-10)
        assert r.p_before >= 0.5 or r.drawable == 0  # only drawable prompts count
    alone = {r.concept: r for r in rows if r.equipped == "alone"}
    assert alone["circle"].gamma_target == 1.0 and alone["circle"].gamma_nontarget < 0.5
    assert summarise(rows)["together"]["max_p_after"] == max(r.p_after for r in rows if r.equipped == "together")
    _check_pictures(bench, snapshots, tmp_path)


def _check_pictures(bench, snapshots, tmp_path):
    """The same prompts in every setting, the verdicts and gamma, and the drawn picture's cells."""
    import numpy as np
    from PIL import Image

    from spm_train.erasure import write_pictures
    from spm_train.grids import GridLayout

    assert set(snapshots) == {("circle", "alone"), ("red", "alone"), ("circle", "together"), ("red", "together")}
    base, alone = bench.snapshot("circle"), snapshots[("circle", "alone")]
    assert alone.prompts == base.prompts and alone.targets >= 1
    assert all("circle" in p for p in base.prompts[:base.targets])
    assert not any("circle" in p for p in base.prompts[base.targets:])
    assert torch.equal(alone.images, base.images)  # a membrane with zero up-weights changes nothing
    assert alone.captions[0] == "gamma 1.00" and base.captions[0] == ""  # "circle" opens its membrane
    # the verdict: "circle" in the text exactly when the concept is flagged as seen
    assert all((" circle" in " " + text) == seen for row in alone.verdicts for text, seen in row)
    path = write_pictures(str(tmp_path / "circle.png"), "circle", [("base", base), ("calibrated", alone)])
    picture = np.asarray(Image.open(path).convert("RGB"))
    layout = GridLayout(2, len(base.prompts), base.images.shape[1], tuple(base.images.shape[-2:]), header_lines=2,
                        label_width=150)
    assert picture.shape[:2] == (layout.size[1], layout.size[0])
    x0, y0, x1, y1 = layout.box(1, 0, 1)
    image = (alone.images[0, 1].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    f = int(layout.factor)
    assert np.array_equal(picture[y0:y1, x0:x1], np.repeat(np.repeat(image, f, axis=0), f, axis=1))


def test_only_prompts_that_open_a_membrane_are_rendered_again(bench, monkeypatch):
    rendered = []
    original = bench._render
    monkeypatch.setattr(bench, "_render", lambda which, desc: rendered.append(list(which)) or original(which, desc))
    membrane = _zero_membrane(bench.pipe, "red", "red")
    membrane.extra[TRANSPORT_KEY] = Calibration(0.99, 1.0).to_header()  # as calibrate_transport finds for red
    images, _, gamma = bench.generations([membrane])
    opened = [i for i, p in enumerate(bench.prompts) if p.value("colour") == "red"]
    assert rendered == [opened] and (gamma[opened] == 1).all()
    closed = [i for i in range(len(bench.prompts)) if i not in opened]
    assert torch.equal(images[closed], bench.base[closed]) and (gamma[closed] == 0).all()


def test_select_best_keeps_one_candidate_per_concept():
    from spm_train.bulk.store import ConceptResult
    from spm_train.registry.publish import select_best
    from spm_train.registry.validate import ValidationReport

    def candidate(concept, point, status, target_drop, preservation_drop):
        r = ConceptResult(concept=concept, key=f"{concept}-{point}", point={"la_strength": point},
                          point_id=f"p{point}", status="trained", membrane="unused")
        report = ValidationReport(behavioural=status,
                                  metrics={"target_drop": target_drop, "preservation_drop": preservation_drop})
        return r, (None, None, report)

    entries = [candidate("cat", 0, "failed", 0.95, 0.0), candidate("cat", 1, "passed", 0.6, 0.3),
               candidate("cat", 2, "passed", 0.6, 0.1), candidate("dog", 0, "failed", 0.2, 0.5)]
    dropped = select_best([r for r, _ in entries], {r.key: c for r, c in entries})
    assert sorted(dropped) == ["cat-0", "cat-1"]  # the passing point with the best net drop wins
    assert "p2 scored better than p0" in dropped["cat-0"]


def test_the_erasure_report_is_written_as_markdown_and_a_self_contained_html_page(tmp_path):
    import base64
    import io

    from PIL import Image

    from pipelines.erasure_report import ROW_HEADER, _write_report
    from tests.test_evaluate import _Page

    def row(concept, equipped, p_after):
        return {"concept": concept, "equipped": equipped, "drawable": 3, "p_before": 0.9, "p_after": p_after,
                "p_after_ci": (0.0, 0.2), "nontarget_drop": 1.5, "nontarget_drop_ci": (0.5, 2.5),
                "pixel_mse": 1e-3, "rest_drop": 0.4, "gamma_target": 1.0, "gamma_nontarget": 0.05}

    summary = {"alone": {"max_p_after": 0.1, "mean_p_after": 0.05, "max_nontarget_drop": 1.5,
                         "mean_nontarget_drop": 1.5, "mean_pixel_mse": 1e-3, "mean_rest_drop": 0.4}}
    Image.new("RGB", (60, 40), "red").save(tmp_path / "pareto.png")
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "pictures" / "circle.png")
    report = {"concepts": ["circle"], "settings": {"draw_threshold": 0.5, "samples": 4},
              "bar": {"alone": {"max_p_after": 0.05, "max_nontarget_drop": 2.0},
                      "together": {"max_p_after": 0.1, "max_nontarget_drop": 5.0}},
              "variants": {"calibrated": {"rows": [row("circle", "alone", 0.05)], "summary": summary,
                                          "concepts": {"circle": {"surrogate": "a square",
                                                                  "guidance_scale": 4.0}}},
                           "paper": {"rows": [row("circle", "alone", 0.5)], "summary": summary}},
              "best": "calibrated", "best_extra": {"transport_off": {"rows": [row("circle", "alone", 0.75)]}},
              "command": "python -m pipelines.erasure_report", "pictures": {"circle": "pictures/circle.png"}}
    path = _write_report(report, str(tmp_path))
    assert path == str(tmp_path / "report.html")
    markdown = (tmp_path / "report.md").read_text()
    assert "| calibrated | alone | surrogates, g 4 | 0.10 |" in markdown
    assert "## Transport off" in markdown and "](pictures/circle.png)" in markdown and "](pareto.png)" in markdown
    page = _Page()
    page.feed(open(path, encoding="utf-8").read())
    # variants summary, best, transport off, the other variant: P after read back from each table
    assert [t[0] for t in page.tables[1:]] == [ROW_HEADER] * 3
    assert [t[1][4] for t in page.tables[1:]] == ["0.05", "0.75", "0.50"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size for src in page.images]
    assert sizes == [(60, 40), (30, 20)]  # the Pareto plot and the picture, inline


def test_the_report_reuses_membranes_whose_recorded_trainer_trains_the_same_weights():
    """A report resumes from its own membranes: a header written before an option existed (here ``gate``)
    or with other logging cadence still matches; any weight-changing setting does not."""
    from pipelines.erasure_report import _same_training
    from spm_train.config import TrainerConfig

    trainer = TrainerConfig.preset("toyworld").replace(gate="none")  # as trained before gates existed
    stored = trainer.to_dict()
    del stored["gate"]
    assert _same_training(stored, trainer)
    assert _same_training({**stored, "log_every": 1, "checkpoint_every": 0}, trainer)
    assert not _same_training({**stored, "lr": 1e-3}, trainer)
    assert not _same_training({**stored, "gate": "token"}, trainer)
    assert not _same_training({**stored, "unknown_option": 1}, trainer)


def test_a_catalog_entry_can_set_what_every_concept_is_erased_towards(bench, tmp_path):
    """A variant's ``concept`` entry replaces the erase loss's fields of every concept (here: back to the
    paper's empty neutral at guidance 16); the concept set's own fields hold elsewhere, and a stored
    membrane trained towards another neutral is not reused."""
    from hydra import compose, initialize_config_dir

    import pipelines.erasure_report  # noqa: F401
    from pipelines.erasure_report import _stored, check
    from spm_train.config import TrainerConfig
    from spm_train.errors import ConfigError
    from tests.bulk.conftest import CONF

    overrides = ["variants=[gated,no_surrogate]", "+catalog.no_surrogate.trainer.gate=token",
                 "+catalog.no_surrogate.concept={surrogate: null, guidance_scale: 16.0}",
                 "concepts.concepts=[{name: circle, target: a circle, surrogate: a square, "
                 "guidance_scale: 4.0}]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("erasure_report", overrides=overrides)
        bad = compose("erasure_report", overrides=overrides + ["+catalog.gated.concept={target: a star}"])
    concepts, variants, _ = check(cfg)
    assert [(c.surrogate, c.guidance_scale) for c in variants["gated"][2]] == [("a square", 4.0)]
    assert [(c.surrogate, c.neutral_prompt, c.guidance_scale) for c in variants["no_surrogate"][2]] == [
        (None, "", 16.0)]
    assert concepts[0].surrogate == "a square"  # the bench measures the concept set as given
    with pytest.raises(ConfigError, match=r"catalog.gated.concept: only guidance_scale, neutral"):
        check(bad)

    trainer = TrainerConfig.preset("smoke")
    membrane = _zero_membrane(bench.pipe, "circle", "a circle")
    membrane.trainer = trainer.to_dict()
    membrane.extra["concept"] = json.dumps(ConceptSpec("circle", "a circle", surrogate="a square").to_dict())
    membrane.save(str(tmp_path / "v" / "circle.safetensors"))
    assert _stored(str(tmp_path), "v", [ConceptSpec("circle", "a circle", surrogate="a square")], trainer)
    assert _stored(str(tmp_path), "v", [ConceptSpec("circle", "a circle")], trainer) is None


def test_synonym_wording_keeps_the_prompts_and_needs_a_world_that_has_synonyms(monkeypatch):
    import numpy as np

    from spm_train.toyworld import eval_prompts
    from spm_train.toyworld.render import WIDE

    with pytest.raises(ValueError, match="ToyWorld 'classic' has no synonyms"):
        erasure_prompts(["red"], synonyms=0.5)
    with pytest.raises(ValueError, match=r"share in \[0, 1\]"):
        erasure_prompts(["red"], synonyms=1.5)
    monkeypatch.setattr(eval_prompts, "WORLD", WIDE)
    plain_t, plain_o = erasure_prompts(["red", "circle"], fills=2, seed=0)
    worded_t, worded_o = erasure_prompts(["red", "circle"], fills=2, seed=0, synonyms=1.0)
    plain = plain_t["red"] + plain_t["circle"] + plain_o
    worded = worded_t["red"] + worded_t["circle"] + worded_o
    # the same scenes are asked for, in other words
    assert [p.attributes for p in plain] == [p.attributes for p in worded]
    assert all("crimson" in p.text.split() or "crimson," in p.text.split() for p in worded_t["red"])
    changed = np.mean([a.text != b.text for a, b in zip(plain, worded)])
    assert changed > 0.9  # only prompts whose every value lacks a synonym (square, striped, ...) stay


def test_the_report_checks_synonym_wording_before_training():
    from hydra import compose, initialize_config_dir

    import pipelines.erasure_report  # noqa: F401
    from pipelines.erasure_report import check
    from spm_train.errors import ConfigError
    from tests.bulk.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        classic = compose("erasure_report", overrides=["bench.synonyms=0.5", "variants=[gated]"])
        wrong = compose("erasure_report", overrides=["bench.synonyms=2", "variants=[gated]"])
    with pytest.raises(ConfigError, match=r"bench.synonyms=0.5: ToyWorld 'classic' has no synonyms"):
        check(classic)
    with pytest.raises(ConfigError, match=r"bench.synonyms is a share in \[0, 1\], got 2"):
        check(wrong)


def test_the_three_prompt_sets_are_disjoint_and_each_usable():
    from hydra import compose, initialize_config_dir

    import pipelines.erasure_report  # noqa: F401
    from pipelines.erasure_report import check
    from tests.bulk.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        unseen = check(compose("erasure_report", overrides=["+forms=unseen", "variants=[gated]"]))[2].forms
        wild = check(compose("erasure_report", overrides=["+forms=wild", "variants=[gated]"]))[2].forms
    assert len(wild) >= 12 and form_problems(wild) == []
    assert not set(wild) & set(unseen) and not set(wild) & set(EVAL_TEMPLATES)
    # the wild forms reach the tokenizer with what makes them wild: brackets, bars, capitals, plurals
    targets, _ = erasure_prompts(["red", "circle"], fills=1, forms=wild)
    texts = [p.text for p in targets["red"]]
    assert texts[0].startswith("((red)) ") and "|" in texts[4] and texts[2].startswith("A ")
