"""The bulk job's registry + W&B stage, read back from the offline W&B run."""

import json
import subprocess
import sys

import pytest

from spm_train.bulk.store import ConceptResult
from spm_train.config import ConceptSpec, TrainerConfig
from spm_train.registry import Registry, publish_results
from spm_train.tracking import open_tracker

from .test_validation import fake_evaluator  # noqa: F401 - referenced by name below

WANDB = [sys.executable, "-m", "wandb"]


def inspect(run_dir):
    """The records of an offline W&B run, via `wandb leet inspect --json`."""
    out = subprocess.run([*WANDB, "leet", "inspect", "--json", run_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _result(concept, path, point=None, point_id="default"):
    history = [{"step": s, "concept": concept, "loss": 2.0 - 0.25 * s, "erase": 1.0 - 0.1 * s, "anchor": 0.001,
                "lr": 1e-3} for s in range(4)]
    return ConceptResult(concept=concept, key=f"key-{concept}-{point_id}", point=point or {}, point_id=point_id,
                         status="trained", membrane=path, loss=history[-1]["loss"], erase=history[-1]["erase"],
                         anchor=0.001, history=history)


def test_publish_registers_validates_and_logs_to_an_offline_wandb_run(tmp_path, membrane_file, base_info):
    results = [_result("snoopy", membrane_file("snoopy", 0)), _result("cat", membrane_file("cat", 1))]
    concepts = [ConceptSpec("snoopy", "snoopy"), ConceptSpec("cat", "a photo of a cat")]
    registry = {"enabled": True, "uri": str(tmp_path / "reg"), "blobs": str(tmp_path / "reg" / "blobs"),
                "min_erasure": 0.8, "max_preservation_drop": 0.05, "gates": {"cat": {"min_erasure": 0.95}},
                "evaluator": f"{__name__}:fake_evaluator", "candidate_alias": "candidate"}
    tracking = {"backend": "wandb", "mode": "offline", "project": "test", "dir": str(tmp_path)}
    kwargs = dict(concepts=concepts, trainer=TrainerConfig(seed=7), model={"source": "random:sd1"}, family="sd1",
                  base_fingerprint=base_info["fingerprint"], registry=registry, tracking=tracking,
                  root=str(tmp_path), run_config={"concepts": {"name": "t"}}, run_dir=str(tmp_path / "run"))
    first = publish_results(results, **kwargs)
    reg = Registry.open(tmp_path / "reg")
    snoopy, cat = reg.resolve("snoopy"), reg.resolve("cat:v1")
    assert (snoopy.status, cat.status) == ("passed", "failed")  # cat's own gate: 0.9 < 0.95
    assert cat.validation["reasons"] == ["erasure_rate 0.9 < min_erasure 0.95"]
    assert snoopy.aliases == ["candidate", "latest"] and cat.aliases == []  # `latest` never names a failure
    # a failed registration is a failed result: the summary and the exit code count it
    assert results[1].status == "failed" and "cat:v1, which failed validation: erasure_rate 0.9" in results[1].error
    lineage = snoopy.lineage
    assert lineage["base_fingerprint"] == base_info["fingerprint"] and lineage["config_hash"] == "key-snoopy-default"
    assert lineage["seed"] == 0 and lineage["wandb_run_id"] == first.wandb_run_id  # seed from the file's header
    assert (lineage["wandb_project"], lineage["wandb_mode"]) == ("test", "offline")  # where alias changes go
    assert lineage["code_version"].startswith(("git:", "spm-train=="))
    assert snoopy.metrics["erasure_rate"] == pytest.approx(0.9) and snoopy.metrics["loss"] == pytest.approx(1.25)
    assert results[0].metrics["erasure_rate"] == pytest.approx(0.9)  # the summary sees the evaluation too

    # the offline run, read back
    assert first.wandb_run_dir.startswith(str(tmp_path / "wandb" / "offline-run-"))
    records = inspect(first.wandb_run_dir)
    config = [r["run"]["config"]["update"] for r in records if r["type"] == "run"][0]
    assert config["concepts"] == {"name": "t"}
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    snoopy_loss = [h["train/snoopy/loss"] for h in history if "train/snoopy/loss" in h]
    assert snoopy_loss == [2.0, 1.75, 1.5, 1.25]
    artifacts = {r["artifact"]["name"]: r["artifact"] for r in records
                 if r["type"] == "artifact" and r["artifact"]["type"] == "membrane"}
    assert set(artifacts) == {"membrane-snoopy", "membrane-cat"}
    art = artifacts["membrane-snoopy"]
    assert art["type"] == "membrane"
    assert set(art["aliases"]) == {"registry-v1", "candidate", "latest"}
    assert snoopy.sha256 in json.dumps(art)  # the metadata carries the registry hash
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["eval/snoopy/default/erasure_rate"] == pytest.approx(0.9)
    assert summary["eval/cat/default/validation_passed"] == 0.0
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]

    # the same bytes again: nothing re-registered, the same versions reported
    again = publish_results(results, **{**kwargs, "tracking": {"backend": "disabled"}})
    assert {k: v.ref for k, v in again.versions.items()} == {k: v.ref for k, v in first.versions.items()}
    assert [v.new for v in again.versions.values()] == [False, False] and again.wandb_run_dir is None
    assert len(reg.versions()) == 2
    assert len([e for e in reg.index.events() if e["action"] == "register"]) == 2


def test_the_tracker_finishes_its_run_even_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with open_tracker({"backend": "wandb", "mode": "offline", "dir": str(tmp_path)}, root=str(tmp_path)) as t:
            t.log_metrics({"x": 1.0})
            run_dir = t.run_dir
            raise RuntimeError("boom")
    records = inspect(run_dir)
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]
    with open_tracker({"backend": "disabled"}, root=str(tmp_path)) as t:
        assert t.run_id is None and t.log_history("x", [{"step": 0, "loss": 1.0}]) == 0


_TRANSFER_CALLS = []


def pipe_counting_evaluator(pipe, membrane, concept_spec):
    """Erasure 0.9 on the first pipeline it sees (the base), 0.5 on any other."""
    if not _TRANSFER_CALLS:
        _TRANSFER_CALLS.append(pipe)
    return {"erasure_rate": 0.9 if pipe is _TRANSFER_CALLS[0] else 0.5, "preservation_drop": 0.0}


def test_publish_validates_on_each_transfer_model_and_fails_a_membrane_that_does_not_hold_there(
        tmp_path, membrane_file, base_info):
    results = [_result("snoopy", membrane_file("snoopy", 0)), _result("cat", membrane_file("cat", 1))]
    concepts = [ConceptSpec("snoopy", "snoopy"), ConceptSpec("cat", "a photo of a cat")]
    registry = {"enabled": True, "uri": str(tmp_path / "reg"), "blobs": str(tmp_path / "reg" / "blobs"),
                "min_erasure": 0.8, "max_preservation_drop": 0.05, "gates": {"cat": {"min_erasure": 0.4}},
                "evaluator": f"{__name__}:pipe_counting_evaluator", "transfer_models": ["random:sd1"]}
    _TRANSFER_CALLS.clear()
    publish_results(results, concepts=concepts, trainer=TrainerConfig(), model={"source": "random:sd1"},
                    family="sd1", base_fingerprint=base_info["fingerprint"], registry=registry,
                    tracking={"backend": "disabled"}, root=str(tmp_path))
    reg = Registry.open(tmp_path / "reg")
    snoopy, cat = reg.resolve("snoopy:v1"), reg.resolve("cat:v1")
    assert snoopy.status == "failed" and snoopy.validation["transfer"] == {"random:sd1": "failed"}
    assert snoopy.validation["reasons"] == ["on random:sd1: erasure_rate 0.5 < min_erasure 0.8"]
    assert cat.status == "passed" and cat.validation["transfer"] == {"random:sd1": "passed"}  # its gate: 0.4
    assert cat.metrics["erasure_rate"] == 0.9 and cat.metrics["transfer/random:sd1/erasure_rate"] == 0.5
    assert results[0].status == "failed" and results[1].status != "failed"
