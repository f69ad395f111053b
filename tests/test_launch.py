"""The launch files parse and agree with each other: the KubeRay manifests have what KubeRay needs, the
driver never lands on the head, and the image installs what the Makefile pins."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _load(name):
    return yaml.safe_load((LAUNCH / name).read_text())


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def test_the_rayjob_manifest_has_what_kuberay_needs_and_runs_the_driver_on_a_worker():
    job = _load("kuberay-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m pipelines.bulk_train cluster=existing ")
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["SPM_HOME"] in spec["entrypoint"]  # paths.root is the shared folder the pods mount
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and spec["entrypointNumCpus"] > 0
    groups = cluster["workerGroupSpecs"]
    assert groups and all({"groupName", "template", "maxReplicas"} <= set(g) for g in groups)
    pods = [head["template"], *(g["template"] for g in groups)]
    images = {c["image"] for pod in pods for c in _containers(pod)}
    assert len(images) == 1  # one image, launch/Dockerfile's, for the head, the workers and the submitter
    for pod in pods:
        claims = {v["name"] for v in pod["spec"].get("volumes", [])}
        mounts = {m["name"] for c in _containers(pod) for m in c.get("volumeMounts", [])}
        assert mounts and mounts <= claims


def test_the_raycluster_and_the_cluster_launcher_keep_the_head_free_and_ship_no_local_state():
    cluster = _load("kuberay.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    launcher = _load("cluster.yaml")
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert {"**/.venv", "**/runs", "**/wandb"} <= set(launcher["rsync_exclude"])
    assert any("'.[cluster]'" in c for c in launcher["setup_commands"])
    # with no CPU on the head, a driver that reserved none would run there: submit.sh reserves some
    assert re.search(r"--entrypoint-num-cpus \"\$SPM_DRIVER_CPUS\"", (LAUNCH / "submit.sh").read_text())


def test_the_image_pins_the_makefiles_torch_first_and_installs_the_cluster_extra():
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.M)
    assert runs[0].startswith('pip install "torch==${TORCH_VERSION}"')
    assert runs[-1] == 'pip install -e ".[cluster]"'
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("ray[default]") for r in extras["cluster"])
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    assert {"spm_train", "pipelines", "conf"} <= copied  # Hydra's conf/ beside the editable install
    assert "ENV" in dockerfile and "SPM_CODE_VERSION=${SPM_CODE_VERSION}" in dockerfile


def test_the_code_version_a_launcher_sends_wins_over_the_nodes_own_checkout(monkeypatch):
    import subprocess

    from spm_train.registry import code_version

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        monkeypatch.delenv("SPM_CODE_VERSION", raising=False)
        code_version.cache_clear()
        here = code_version()
        assert here.startswith("git:") and head and head in here  # the full hash, not an abbreviation
        monkeypatch.setenv("SPM_CODE_VERSION", "git:0123abcd-dirty")
        code_version.cache_clear()
        assert code_version() == "git:0123abcd-dirty"
    finally:
        code_version.cache_clear()
