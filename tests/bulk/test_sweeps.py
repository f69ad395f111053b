"""Sweeps: the app returns the objective its config names, so Hydra's Optuna sweeper can rank runs;
multirun jobs are named by their overrides; `--help` and `--cfg job --resolve` describe the app."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from spm_train.bulk.objective import OBJECTIVES, check_objective, objective_value

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _app(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.bulk_train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_the_objective_is_the_mean_over_the_run_and_nan_when_incomplete():
    rows = [{"erasure_rate": 1.0, "preservation_drop": 0.25, "loss": 0.5},
            {"erasure_rate": 0.5, "preservation_drop": 0.0, "loss": 0.25}]
    assert objective_value("erasure_minus_drop", rows) == pytest.approx((0.75 + 0.5) / 2)
    assert objective_value("loss", rows) == pytest.approx(0.375)
    assert math.isnan(objective_value("loss", rows + [None]))  # a failed concept: the trial failed
    assert math.isnan(objective_value("erasure", [{"loss": 0.1}]))  # not evaluated
    assert {o.direction for o in OBJECTIVES.values()} == {"maximize", "minimize"}


def test_a_bad_objective_or_a_sweep_it_cannot_rank_is_refused():
    assert "objective=accuracy: one of erasure_minus_drop (maximize)" in check_objective(
        "accuracy", evaluated=True, sweeping=False)[0]
    assert check_objective("erasure", evaluated=False, sweeping=False) == []  # one run: shown as n/a
    assert "this sweep evaluates nothing" in check_objective("erasure", evaluated=False, sweeping=True)[0]
    assert check_objective("loss", evaluated=False, sweeping=True) == []


def test_a_multirun_ends_with_its_jobs_compared_best_first_and_failures_last(tmp_path):
    import json

    from pipelines.bulk_train import FAILED_MARK, OBJECTIVE_FILE, write_comparison

    for num, (point, value, failed) in enumerate([("trainer.lr=1e-4", 0.25, 0), ("trainer.lr=3e-4", 0.5, 0),
                                                    ("trainer.lr=1e-2", None, 1)]):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / OBJECTIVE_FILE).write_text(json.dumps(
            {"objective": "erasure_minus_drop", "direction": "maximize", "value": value, "point": point,
             "results": 3, "failed": failed}))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / FAILED_MARK).write_text("trainer.lr=-1\ninvalid bulk run: lr must be > 0, got -1\n")
    rows = open(write_comparison(str(tmp_path))).read().splitlines()
    assert rows[0] == "# Sweep: jobs by erasure_minus_drop (maximize)"
    assert rows[4].startswith("| 1 | trainer.lr=3e-4 | 0.5 |") and rows[5].startswith("| 0 | trainer.lr=1e-4 | 0.25 |")
    assert rows[6] == "| 2 | trainer.lr=1e-2 | n/a | 1 of 3 failed |"
    assert rows[7] == "| 3 | trainer.lr=-1 | n/a | failed: invalid bulk run: lr must be > 0, got -1 |"
    # not evaluated: the plot shows the objective per point, the best (lr=3e-4, 0.5) in red
    assert rows[-1] == "![the jobs compared](comparison.png)"
    plot = np.asarray(Image.open(tmp_path / "comparison.png").convert("RGB")).astype(int)
    red = (plot[..., 0] > 200) & (plot[..., 1] < 60) & (plot[..., 2] < 60)
    assert plot.shape == (480, 720, 3) and red.any()


def test_an_evaluated_sweep_is_plotted_as_erasure_against_non_target_drop(tmp_path, monkeypatch):
    import json

    from pipelines.bulk_train import OBJECTIVE_FILE, plot_comparison, write_comparison
    from spm_train import report

    points = {"lr=1e-4": (0.5, 0.0), "lr=3e-4": (0.9, 0.02), "lr=1e-3": (0.8, 0.05)}  # erasure, drop
    for num, (point, (erasure, drop)) in enumerate(points.items()):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / OBJECTIVE_FILE).write_text(json.dumps(
            {"objective": "erasure_minus_drop", "direction": "maximize", "value": erasure - drop, "point": point,
             "results": 2, "failed": 0, "erasure": erasure, "preservation_drop": drop}))
    assert open(write_comparison(str(tmp_path))).read().splitlines()[-1] == "![the jobs compared](comparison.png)"
    assert Image.open(tmp_path / "comparison.png").size == (720, 480)
    # what is plotted: x the non-target drop, y the share still showing the concept; lr=1e-3 is beaten by
    # lr=3e-4 on both, so the front is the other two
    plotted = {}
    monkeypatch.setattr(report, "pareto_plot", lambda pts, url, **_: plotted.update(pts) or url)
    measured = {p: (d, e, e - d) for p, (e, d) in points.items()}
    plot_comparison(measured, str(tmp_path / "p.png"), objective="erasure_minus_drop", direction="maximize")
    expected = {"lr=1e-4": (0.0, 0.5), "lr=3e-4": (0.02, 0.1), "lr=1e-3": (0.05, 0.2)}
    assert plotted.keys() == expected.keys()
    assert all(plotted[k] == pytest.approx(v) for k, v in expected.items())
    assert report.pareto_front(plotted) == ["lr=1e-4", "lr=3e-4"]
    # one job without erasure numbers: the objective per point instead; no number at all: no plot
    plotted.clear()
    assert plot_comparison({**measured, "lr=1e-2": (None, None, 0.1)}, str(tmp_path / "o.png"),
                           objective="erasure_minus_drop", direction="maximize") == str(tmp_path / "o.png")
    assert not plotted
    assert plot_comparison({"lr=1": (None, None, None)}, str(tmp_path / "n.png"), objective="loss",
                           direction="minimize") is None


def test_optuna_ranks_smoke_runs_by_the_returned_objective_on_a_quiet_console(tmp_path):
    run = _app("-m", "+experiment=optuna_smoke", f"paths.root={tmp_path}", "tracking=disabled", "progress=false")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    sweep_dir = next((tmp_path / "multirun").iterdir())
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    values, points = [], []
    for job in ("0", "1"):
        summary = (sweep_dir / job / "summary.md").read_text()
        values.append(float(re.search(r"objective loss = (\S+) \(minimize", summary).group(1)))
        points += re.findall(r"\| cat \| (trainer\.lr=[0-9.e-]+) \|", summary)
    assert len(points) == 2 and points[0] != points[1]  # each job's row names its own sweep point
    assert best["best_value"] == pytest.approx(min(values), rel=1e-3)
    assert f"trainer.lr={best['best_params']['trainer.lr']}" in points
    table = (sweep_dir / "comparison.md").read_text().splitlines()  # the jobs compared, best first
    assert table[0] == "# Sweep: jobs by loss (minimize)"
    assert f"| trainer.lr={best['best_params']['trainer.lr']} |" in table[4]
    assert (sweep_dir / "comparison.png").exists()  # and the plot beside it
    # the console: our progress, summaries and paths; library notices went to the jobs' log files
    for noise in ("torchvision", "FutureWarning", "torch_dtype", "kept in float32", "Loading pipeline components",
                  "Started a local Ray instance", "setup plugin", "Token authentication", "A new study created"):
        assert noise not in output, noise


def test_help_describes_the_app_and_lists_only_real_choices():
    run = _app("--help", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bulk_train: erase concepts from a text-to-image diffusion model" in run.stdout
    groups = run.stdout.split("== Config groups")[1].split("== Config (")[0]
    assert "trainer: fast, paper, smoke, *toyworld" in groups
    assert "experiment: optuna_smoke, optuna_toyworld" in groups
    assert "schema" not in groups


def test_cfg_job_resolve_prints_the_resolved_config():
    run = _app("--cfg", "job", "--resolve", "trainer=smoke", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    config = yaml.safe_load(run.stdout)
    assert config["trainer"]["iterations"] == 4 and config["objective"] == "erasure_minus_drop"
    assert config["paths"]["store"].endswith("/store") and config["paths"]["run_dir"] is None
