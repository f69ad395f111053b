"""The main job registers what it trained, logs the run offline, and re-registers nothing on a re-run."""

import datetime
import json
import os
import time

import ray

from pipelines.bulk_train import train
from spm_train.registry import Registry
from spm_train.tracking import WandbTracker

from ..bulk.conftest import compose
from .test_publish import inspect


def test_a_bulk_run_registers_logs_and_a_rerun_registers_nothing_new(tmp_path, ray_shutdown, monkeypatch):
    arrivals: dict[str, list[float]] = {}  # when each concept's loss rows reached the W&B run
    stream = WandbTracker.stream

    def timed(self, rows):
        for row in rows:
            arrivals.setdefault(row["label"], []).append(time.time())
        stream(self, rows)

    monkeypatch.setattr(WandbTracker, "stream", timed)
    cfg = compose(tmp_path, "cluster.num_cpus=2", "tracking=offline", "trainer.iterations=30",
                  "concepts.concepts=[{name: cat, target: a photo of a cat}, {name: snoopy, target: snoopy}]")
    first = train(cfg, run_dir=str(tmp_path / "run1"))
    assert [r.status for r in first.results] == ["trained", "trained"]
    assert first.registry == str(tmp_path / "registry")
    assert sorted(first.versions.values()) == ["cat:v1", "snoopy:v1"]
    manifest = json.load(open(first.manifest))
    assert manifest["publication"]["wandb_run_dir"] == first.wandb_run_dir
    assert {v["ref"]: v["new"] for v in manifest["publication"]["versions"].values()} == {"cat:v1": True,
                                                                                          "snoopy:v1": True}
    reg = Registry.open(first.registry)
    cat = reg.resolve("cat@candidate")  # structure passed, behaviour not evaluated (eval=none)
    assert cat.status == "not_evaluated" and cat.validation["structural"] == "passed"
    result = {r.concept: r for r in first.results}["cat"]
    assert cat.lineage["config_hash"] == result.key and cat.lineage["wandb_run_id"] in first.wandb_run_dir
    assert cat.sha256 == reg.blobs.hash_of(cat.sha256)

    records = inspect(first.wandb_run_dir)
    logged = [r["history"]["item"]["train/cat/loss"] for r in records
              if r["type"] == "history" and "train/cat/loss" in r["history"]["item"]]
    # streamed while the pack trained (the first rows before it finished), every step once
    assert logged == [row["loss"] for row in result.history] and len(logged) == 30 == len(arrivals["cat"])
    assert min(arrivals["cat"]) < result.finished and min(arrivals["snoopy"]) < result.finished
    run = [r["run"] for r in records if r["type"] == "run"][0]
    opened = datetime.datetime.fromisoformat(run["start_time"].replace("Z", "+00:00")).timestamp()
    assert opened < result.started  # the run opened when the job started, before the pack
    assert any(r["type"] == "stats" for r in records)  # system metrics, on by default
    membranes = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "membrane"]
    assert sorted(a["name"] for a in membranes) == ["membrane-cat", "membrane-snoopy"]
    assert all(set(a["aliases"]) == {"registry-v1", "candidate", "latest"} for a in membranes)

    ray.shutdown()
    again = train(cfg, run_dir=str(tmp_path / "run2"))
    assert [r.status for r in again.results] == ["cached", "cached"]
    assert again.versions == first.versions and again.wandb_run_dir != first.wandb_run_dir
    assert len(reg.versions()) == 2 and len([e for e in reg.index.events() if e["action"] == "register"]) == 2
    assert reg.verify() == []
    assert os.path.dirname(os.path.dirname(again.wandb_run_dir)) == str(tmp_path)  # <paths.root>/wandb/<run>
