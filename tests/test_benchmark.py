"""The benchmark is a tool, not a test: here it only has to run on a tiny model and report sane figures."""

import json

import pytest
from hydra import compose, initialize_config_dir

from tests.bulk.conftest import CONF


def _cfg(tmp_path, *overrides):
    import pipelines.benchmark  # noqa: F401 - registers the schema

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("benchmark", overrides=[f"out={tmp_path}/bench.json", *overrides])


def test_training_benchmark_reports_every_path_on_the_same_lengths(tmp_path):
    from pipelines.benchmark import main

    cfg = _cfg(tmp_path, "model.source=random:sd1", "packs=[1,2]", "concept_iterations=2", "warmup=0",
               "trainer.max_denoising_steps=4", "flops=true", "profile=true")
    main.__wrapped__(cfg)
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert [(r["name"], r["pack_size"], r["precision"], r["iterations"]) for r in rows] == [
        ("paper loop", 1, "fp32", 2), ("paper loop", 1, "bf16", 2), ("packed", 1, "fp32", 2),
        ("packed", 2, "fp32", 1)]
    # 2 concept-iterations per path, and 2 divides by every K: every row trained on the same two lengths
    assert len(report["lengths"]) == 2 and all(1 <= t < 4 for t in report["lengths"])
    assert {r["mean_t_to"] for r in rows} == {sum(report["lengths"]) / 2}
    assert rows[0]["speedup"] == pytest.approx(1.0)
    for r in rows:
        assert r["seconds_per_iteration"] > 0 and r["flops_per_iteration"] > 0 and r["tflops"] > 0
        assert r["concepts_per_hour"] == pytest.approx(3600 / (r["seconds_per_concept_iteration"] * 3000))
    # on the same draws the paper loop spends more FLOPs per concept-iteration (CFG halves of guidance-1
    # predictions); the count covers one iteration, the first of each path, with the same length
    assert rows[0]["flops_per_iteration"] > rows[2]["flops_per_iteration"]
    assert rows[0]["flops_per_iteration"] == rows[1]["flops_per_iteration"]  # autocast changes no FLOP count
    gains = report["gains"]
    assert gains["packs_precision"] == "fp32" and set(gains["precision"]) == {"bf16"}
    assert gains["vs_paper_fp32"] == pytest.approx(gains["fast_path"] * gains["packing"])
    # one profiled iteration per pack: the iteration's phases, then operators by self time
    assert rows[0]["profile"] is None and rows[3]["profile"] == str(tmp_path / "profile_packed_K2.txt")
    text = (tmp_path / "profile_packed_K2.txt").read_text()
    phases = text.split("\n\n")[0]
    for phase in ("spm.draw", "spm.trajectory", "spm.membrane_off", "spm.membrane_on", "spm.update"):
        assert phase in phases
    assert "aten::bmm" in text.split("\n\n", 1)[1]  # the membranes' gathered branches


# a parameter id "gpu" would count as the gpu marker and skip the test where there is no CUDA device
@pytest.mark.parametrize("preset", ["none", "gpu"], ids=["default", "quick-gpu-preset"])
def test_the_shipped_settings_give_every_row_the_same_lengths(tmp_path, preset):
    """The default and the GPU preset time a number of concept-iterations that every pack size divides."""
    from pipelines.benchmark import setting_problems

    cfg = _cfg(tmp_path, f"preset={preset}")
    assert setting_problems(cfg) == []
    assert all(cfg.concept_iterations % k == 0 for k in cfg.packs)
    assert list(cfg.baseline_precisions) == ["fp32", "bf16"]
    if preset == "gpu":
        assert (cfg.model.source, cfg.trainer.resolution, cfg.flops) == ("arch:sd15", 512, True)


def test_paired_lengths_are_stratified_reproducible_and_read_from_the_start():
    from spm_train.benchmark import PairedLengths

    # a block as long as the range holds every length once, in shuffled order: its mean is exactly T / 2
    one = PairedLengths(30, 29, seed=0)
    block = one.lengths(29)
    assert sorted(block) == list(range(1, 30)) and block != sorted(block)
    assert sorted(one.lengths(58)[29:]) == list(range(1, 30))  # the sequence goes on in blocks
    # a short block stays near T / 2: one draw per slice of the range, never six draws bunched high
    for seed in range(200):
        short = PairedLengths(30, 6, seed=seed).lengths(6)
        assert all(1 <= t <= 29 for t in short)
        assert abs(sum(short) / 6 - 15) < 0.5 + 29 / 12
    # the same settings give the same lengths (separate processes pair up); every path reads from the start
    again = PairedLengths(30, 29, seed=0)
    assert again.lengths(40) == one.lengths(40)
    assert [again() for _ in range(3)] == block[:3]
    again.rewind()
    assert [again() for _ in range(2)] == block[:2] and again.taken == block[:2]
    assert PairedLengths(30, 29, seed=1).lengths(29) != block


def test_a_trainer_given_lengths_trains_on_them():
    from spm_train import TrainerConfig
    from spm_train.architectures import tiny_pipeline
    from spm_train.config import ConceptSpec
    from spm_train.reference import PaperLoop
    from spm_train.training import PackTrainer

    pipe = tiny_pipeline("sd1")
    trainer = TrainerConfig.preset("smoke", max_denoising_steps=30)
    pack = PackTrainer(pipe, [ConceptSpec("a", "a photo of a"), ConceptSpec("b", "a photo of b")], trainer,
                       progress=False)
    try:
        given = iter([3, 27])
        pack.trajectory_lengths = lambda: next(given)
        assert [draw[0] for draw in pack._draw()] == [3, 27]
    finally:
        pack.close()
    loop = PaperLoop(pipe, ConceptSpec("a", "a photo of a"), trainer)
    try:
        calls = []
        loop.trajectory_lengths = lambda: calls.append(2) or 2
        loop.step()
        assert calls == [2]  # the loop took its length from the source, not from its own generator
    finally:
        loop.close()


def test_the_paper_loop_in_bf16_runs_under_autocast_on_the_same_draws():
    """Precision's gain is timed on the paper loop itself: bf16 autocast changes the arithmetic (a loss
    that differs in rounding) and nothing else (the same draws, the same loss within bf16's precision)."""
    from spm_train import TrainerConfig
    from spm_train.architectures import tiny_pipeline
    from spm_train.config import ConceptSpec
    from spm_train.reference import PaperLoop

    pipe = tiny_pipeline("sd1")
    losses = {}
    for precision in ("fp32", "bf16"):
        loop = PaperLoop(pipe, ConceptSpec("a", "a photo of a"), TrainerConfig.preset(
            "smoke", max_denoising_steps=6, precision=precision))
        loop.trajectory_lengths = lambda: 3
        try:
            losses[precision] = loop.step()
        finally:
            loop.close()
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2)


def test_the_headline_states_packing_and_precision_apart():
    from spm_train.benchmark import Measurement, gains

    def row(name, k, precision, per_concept):
        return Measurement(name, k, precision, per_concept * k, per_concept, 3600 / (per_concept * 3000),
                           None, None, None, iterations=4, mean_t_to=15.0)

    rows = [row("paper loop", 1, "fp32", 2.0), row("paper loop", 1, "bf16", 1.6),
            row("packed", 1, "bf16", 1.0), row("packed", 8, "bf16", 0.25), row("packed", 32, "bf16", 0.2)]
    g = gains(rows)
    assert g.best_pack_size == 32 and g.packs_precision == "bf16"
    assert g.packing == pytest.approx(5.0) and g.fast_path == pytest.approx(1.6)
    assert g.precision == {"bf16": pytest.approx(1.25)}
    assert g.vs_paper_fp32 == pytest.approx(10.0) and g.vs_paper_same_precision == pytest.approx(8.0)
    assert g.vs_paper_fp32 == pytest.approx(g.precision["bf16"] * g.fast_path * g.packing)
    assert g.text() == ("K = 32 in bf16: 10.00x the fp32 paper loop = precision 1.25x (the paper loop in bf16 "
                        "over fp32) * fast path 1.60x (K = 1 over the paper loop, both bf16) * packing 5.00x "
                        "(K = 32 over K = 1); 8.00x the paper loop in bf16")
    # packs in fp32 (a CPU): precision's gain stands apart from the product
    fp32_packs = [rows[0], rows[1], row("packed", 1, "fp32", 1.6), row("packed", 4, "fp32", 0.8)]
    assert gains(fp32_packs).text() == (
        "K = 4 in fp32: 2.50x the fp32 paper loop = fast path 1.25x (K = 1 over the paper loop, both fp32) * "
        "packing 2.00x (K = 4 over K = 1); precision apart: the paper loop in bf16 runs 1.25x its fp32 speed")
    # packs in a precision the paper loop did not run in: no same-precision factors, nothing made up
    g = gains([rows[0], row("packed", 1, "fp16", 1.0), row("packed", 4, "fp16", 0.5)])
    assert g.fast_path is None and g.vs_paper_same_precision is None and g.packing == pytest.approx(2.0)
    assert g.text() == "K = 4 in fp16: 4.00x the fp32 paper loop; packing 2.00x (K = 4 over K = 1)"
    assert gains(rows[2:]).text() == (  # no paper loop at all (a variant run)
        "K = 32 in bf16: packing 5.00x (K = 32 over K = 1) (no fp32 paper loop in this run)")


def test_orchestration_benchmark_collects_every_job(tmp_path):
    from pipelines.benchmark import main

    main.__wrapped__(_cfg(tmp_path, "mode=orchestration", "jobs=20"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["jobs"] == 20 and report["succeeded"] == 20


def test_flop_count_of_sd15_forward_and_of_a_packs_membranes(tmp_path):
    """Counted on the meta device: SD 1.5 at 512 px costs 0.80 TFLOP per sample-forward (the figure the issue's cost model uses);
    masking all K branches costs exactly K times the FLOPs of gathering each sample's own branch."""
    from pipelines.benchmark import main

    main.__wrapped__(_cfg(tmp_path, "mode=flops", "model.source=arch:sd15", "packs=[1,32]",
                          "trainer.resolution=512"))
    report = json.loads((tmp_path / "bench.json").read_text())
    one, pack = report["rows"]
    assert one["base_tflop_per_sample"] == pytest.approx(0.8033, abs=5e-4)
    assert one["masked_overhead"] == one["gathered_overhead"] == pack["gathered_overhead"]
    assert pack["masked_overhead"] == pytest.approx(32 * pack["gathered_overhead"], rel=1e-9)
    assert 0 < pack["gathered_overhead"] < 0.001 < pack["masked_overhead"] < 0.05


def test_packs_can_train_on_a_bf16_copy_while_the_paper_loop_keeps_fp32():
    import torch

    from spm_train import MembraneLayer, TrainerConfig
    from spm_train.architectures import tiny_pipeline
    from spm_train.benchmark import run_benchmark

    pipe = tiny_pipeline("sd1")
    trainer = TrainerConfig.preset("smoke", max_denoising_steps=3)
    rows = run_benchmark(pipe, trainer, packs=[2], concept_iterations=2, warmup=0,
                         baseline_precisions=["fp32"], fast_precision="fp32", fast_base_dtype=torch.bfloat16)
    assert [(r.name, r.precision) for r in rows] == [("paper loop", "fp32"),
                                                      ("packed", "bfloat16 base, no autocast")]
    assert pipe.unet.dtype == torch.float32
    assert not any(isinstance(m, MembraneLayer) for m in pipe.unet.modules())


def test_a_bad_benchmark_setting_is_one_clear_message(tmp_path, caplog):
    from pipelines.benchmark import main

    with pytest.raises(SystemExit) as exit_info:
        main.__wrapped__(_cfg(tmp_path, "model.source=random:sd1", "fast_base_dtype=bfloat17"))
    assert exit_info.value.code == 2
    assert "fast_base_dtype 'bfloat17' is not one of" in caplog.text
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["concept_iterations=0"], "concept_iterations=0: at least 1"),
    (["baseline_precisions=[fp32,fp64]"], "precision(s) ['fp64'] not among"),
    (["fast_precision=half"], "precision(s) ['half'] not among"),
    (["fit_pack_limit=0", "warmup=-1"], "warmup=-1: at least 0; fit_pack_limit=0: at least 1"),
    (["packs=[]"], "packs=[]: one or more pack sizes >= 1"),
    (["mode=flops", "packs=[-1]"], "packs=[-1]: one or more pack sizes >= 1"),
])
def test_pack_sizes_and_iteration_counts_are_checked_before_any_work(tmp_path, caplog, overrides, message):
    from pipelines.benchmark import main

    with pytest.raises(SystemExit) as exit_info:
        main.__wrapped__(_cfg(tmp_path, "model.source=random:sd1", *overrides))
    assert exit_info.value.code == 2 and message in caplog.text
    assert not (tmp_path / "bench.json").exists()
