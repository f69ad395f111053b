"""The stages after training (evaluation, registry, tracking, output folders) are checked before any
job is scheduled: one message listing every problem, nothing trained, nothing written."""

import os
import re

import pytest

from pipelines.bulk_train import plan_run
from spm_train.errors import ConfigError
from tests.bulk.conftest import compose


@pytest.mark.parametrize("overrides, message", [
    (["eval=toyworld"], "eval=toyworld scores with the ToyWorld classifier"),
    (["eval=toyworld", "model=toyworld", "concepts=smoke"], "ToyWorld concept 'cat' must name exactly one"),
    (["eval=toyworld", "model=toyworld", "concepts=toyworld", "eval.similarity=fuzzy"],
     "eval.similarity=fuzzy: one of paper, content"),
    (["eval=toyworld", "eval.kind=clip"], "eval.kind=clip needs eval.clip_path"),
    (["tracking=offline", "tracking.backend=foo"], "tracking.backend=foo: wandb or disabled"),
    (["tracking=offline", "tracking.mode=foo"], "tracking.mode=foo: offline or online"),
    (["+registry.gates={nosuch: {min_erasure: 0.9}}"], "registry.gates names concept(s) not in the concept set"),
    (["registry.candidate_alias=latest"], "registry.candidate_alias=latest"),
    (["cluster.workers_per_job=-1"], "workers_per_job must be >= 1, got -1"),
    (["registry.uri=${paths.root}/a-file/registry"], "/a-file/registry: cannot create or write this folder"),
])
def test_a_problem_of_a_later_stage_stops_the_run_before_training(tmp_path, overrides, message):
    (tmp_path / "a-file").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_run(compose(tmp_path, *overrides))
    assert not os.path.exists(tmp_path / "store")


def test_online_tracking_without_an_api_key_is_refused_up_front(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    with pytest.raises(ConfigError, match="tracking=online needs a W&B API key"):
        plan_run(compose(tmp_path, "tracking=online"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert plan_run(compose(tmp_path, "tracking=online")).jobs


def test_every_stage_problem_comes_in_one_message(tmp_path):
    with pytest.raises(ConfigError) as err:
        plan_run(compose(tmp_path, "eval=toyworld", "tracking=offline", "tracking.mode=foo",
                         "registry.candidate_alias=v3"))
    text = str(err.value)
    assert "eval=toyworld" in text and "tracking.mode=foo" in text and "candidate_alias=v3" in text


def test_a_failing_job_of_a_multirun_does_not_stop_the_sweep(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.bulk_train", "-m", "model=tiny_random", "concepts=smoke", "trainer=smoke",
         "eval=none", "tracking=disabled", f"paths.root={tmp_path}", "trainer.lr=-1,-2"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "SPM_HOME": str(tmp_path)})
    output = run.stdout + run.stderr  # Hydra's job logging goes to stdout
    errors = [line for line in output.splitlines() if "invalid bulk run" in line]
    assert len(errors) == 2, output[-2000:]  # the second job ran after the first one failed
    assert "lr must be > 0, got -1" in errors[0] and "got -2" in errors[1]
    assert run.returncode == 1 and "2 job(s) of this multirun failed" in output


def test_a_url_as_the_run_root_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("paths.root=memory://spm: run folders and the registry index")):
        plan_run(compose(tmp_path, "paths.root=memory://spm", f"paths.store={tmp_path}/store",
                         f"registry.uri={tmp_path}/registry"))

    with pytest.raises(ConfigError, match=re.escape("registry.uri=memory://reg: run folders and the registry index")):
        plan_run(compose(tmp_path, "registry.uri=memory://reg"))
