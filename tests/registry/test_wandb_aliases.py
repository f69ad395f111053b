"""Registry alias changes reach the W&B artifact of the version: offline as a run that `wandb sync`
uploads (read back here from the run's files), online through W&B's API (a stand-in records the calls)."""

import glob
import os

import pytest

from spm_train.registry import Registry

from .conftest import run_cli
from .test_publish import inspect

OFFLINE = {"wandb_run_id": "run1", "wandb_project": "test", "wandb_entity": None, "wandb_mode": "offline"}
ONLINE = {**OFFLINE, "wandb_entity": "team", "wandb_mode": "online"}


def _registry(tmp_path, membrane_file, lineage):
    root = tmp_path / "spm" / "registry"
    with Registry.open(str(root)) as reg:
        reg.register(membrane_file("snoopy", 0), concept="snoopy", lineage=lineage)
        reg.register(membrane_file("cat", 1), concept="cat", lineage={})  # never logged to W&B
    return str(root)


def _runs(tmp_path):
    return sorted(glob.glob(str(tmp_path / "spm" / "wandb" / "offline-run-*")), key=os.path.getmtime)


def _change(run_dir):
    records = inspect(run_dir)
    config = [r["run"]["config"]["update"] for r in records if r["type"] == "run"][0]
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["registry_change"] == config["registry_change"]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
    return config["registry_change"]


def test_offline_promotion_and_unalias_are_recorded_in_runs_for_wandb_sync(tmp_path, membrane_file, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = _registry(tmp_path, membrane_file, OFFLINE)
    out = run_cli("--root", root, "promote", "snoopy:v1", "production", "--force", "--reason", "signed off")
    assert out.returncode == 0, out.stderr
    runs = _runs(tmp_path)
    assert len(runs) == 1 and f"wandb sync {runs[0]}" in out.stdout
    change = _change(runs[0])
    assert {k: change[k] for k in ("action", "concept", "alias", "version", "artifact", "forced", "reason")} == {
        "action": "promote", "concept": "snoopy", "alias": "production", "version": 1,
        "artifact": "membrane-snoopy:registry-v1", "forced": True, "reason": "signed off"}

    out = run_cli("--root", root, "unalias", "snoopy", "production")
    assert out.returncode == 0, out.stderr
    runs = _runs(tmp_path)
    assert len(runs) == 2
    change = _change(runs[1])
    assert (change["action"], change["alias"], change["artifact"]) == ("unalias", "production",
                                                                       "membrane-snoopy:registry-v1")

    # nothing to carry: a version never logged to W&B, or W&B turned off
    assert run_cli("--root", root, "promote", "cat:v1", "staging").returncode == 0
    assert run_cli("--root", root, "promote", "snoopy:v1", "staging", "--wandb", "off").returncode == 0
    assert len(_runs(tmp_path)) == 2
    with Registry.open(root, create=False) as reg:  # the registry changed in every case
        assert reg.resolve("cat@staging").ref == "cat:v1" and "staging" in reg.resolve("snoopy:v1").aliases


class FakeArtifact:
    def __init__(self, aliases):
        self.aliases = list(aliases)
        self.saved = []

    def save(self):
        self.saved.append(sorted(self.aliases))


class FakeApi:
    """W&B's public API as far as alias changes use it: artifacts found by any of their aliases."""

    artifacts: dict = {}
    calls: list = []

    def __init__(self, timeout=None):
        pass

    def artifact(self, name, type=None):
        FakeApi.calls.append((name, type))
        path, _, alias = name.rpartition(":")
        for (collection, number), artifact in FakeApi.artifacts.items():
            if path == collection and alias in artifact.aliases:
                return artifact
        raise ValueError(f"Artifact {name!r} not found in response")


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    FakeApi.artifacts = {("team/test/membrane-snoopy", 1): FakeArtifact(["registry-v1", "latest", "stale"])}
    FakeApi.calls = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    return FakeApi


def test_online_promotion_and_unalias_edit_the_artifacts_aliases(tmp_path, membrane_file, fake_wandb):
    root = _registry(tmp_path, membrane_file, ONLINE)
    artifact = fake_wandb.artifacts[("team/test/membrane-snoopy", 1)]
    out = run_cli("--root", root, "promote", "snoopy:v1", "candidate")
    assert out.returncode == 0 and "W&B: team/test/membrane-snoopy:registry-v1 now has candidate" in out.stdout
    assert fake_wandb.calls == [("team/test/membrane-snoopy:registry-v1", "membrane")]
    assert artifact.saved == [["candidate", "latest", "registry-v1", "stale"]]

    out = run_cli("--root", root, "unalias", "snoopy", "candidate")
    assert out.returncode == 0 and fake_wandb.calls[-1] == ("team/test/membrane-snoopy:candidate", "membrane")
    assert artifact.saved[-1] == ["latest", "registry-v1", "stale"]
    assert _runs(tmp_path) == []  # online: no offline run

    # the registry is the source of truth: `wandb-aliases` drops what it no longer gives, keeps W&B's latest
    assert run_cli("--root", root, "promote", "snoopy:v1", "staging", "--wandb", "off").returncode == 0
    out = run_cli("--root", root, "wandb-aliases")
    assert out.returncode == 0, out.stderr
    assert artifact.aliases == ["latest", "registry-v1", "staging"]
    assert "1 version(s) logged to W&B checked" in out.stdout


def test_a_wandb_failure_leaves_the_registry_change_and_says_how_to_catch_up(tmp_path, membrane_file, fake_wandb):
    fake_wandb.artifacts = {}  # the artifact is not on the server
    root = _registry(tmp_path, membrane_file, ONLINE)
    out = run_cli("--root", root, "promote", "snoopy:v1", "candidate")
    assert out.returncode == 0
    assert "the registry changed, W&B did not" in out.stderr and "wandb-aliases" in out.stderr
    with Registry.open(root, create=False) as reg:
        assert reg.resolve("snoopy@candidate").ref == "snoopy:v1"
    out = run_cli("--root", root, "wandb-aliases")
    assert "snoopy:v1: no W&B artifact team/test/membrane-snoopy:registry-v1" in out.stdout
