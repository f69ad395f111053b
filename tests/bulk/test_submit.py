"""launch/submit.sh against a real Ray head that the test starts on this machine: the job is submitted
with `ray job submit`, runs the bulk job on the tiny model, and its result is read back from SPM_HOME,
with the submitting checkout's code version although the shipped copy has no .git."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# every port the head opens, each a free one: other Ray instances on the machine keep their defaults
PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
         "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
         "object-manager-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture
def ray_head(monkeypatch):
    """`ray start --head --block` on loopback with its own temp folder and ports; ended by its process id.

    Not `ray stop`: that ends every Ray process of the user on the machine, other programs' included.
    """
    assert importlib.util.find_spec("aiohttp"), "`ray job submit` needs ray[default]: pip install -e '.[dev]'"
    temp = tempfile.mkdtemp(prefix="spmray")  # short: Ray's socket paths under it have a length limit
    workers = _free_port()  # workers take the 50 ports from here on: the others lie outside that range
    ports = {}
    while len(ports) < len(PORTS):
        port = _free_port()
        if not workers <= port <= workers + 50 and port not in ports.values():
            ports[PORTS[len(ports)]] = port
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # Ray turns 127.0.0.1 into the machine's network address; this keeps the whole cluster on loopback
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={temp}", "--object-store-memory=100000000",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 50}",
               *[f"--{name}={port}" for name, port in ports.items()]]
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in Path(log.name).read_text():
            assert head.poll() is None, f"ray start failed:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not finish:\n{Path(log.name).read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "temp": temp}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its session still left
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_sh_runs_the_bulk_job_on_a_ray_head_and_records_the_code_version(tmp_path, ray_head):
    home = tmp_path / "home"
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["dashboard"], "SPM_HOME": str(home), "SPM_DRIVER_CPUS": "1",
           "WANDB_MODE": "disabled", "PYTHON": sys.executable}
    env.pop("SPM_CODE_VERSION", None)
    overrides = ["model=tiny_random", "concepts=smoke", "concepts.concepts=[{name: cat, target: a photo of a cat}]",
                 "trainer=smoke", "trainer.iterations=2", "eval=none", "tracking=disabled", "progress=false",
                 "cluster.cpus_per_job=1", "cluster.gpus_per_job=0"]
    out = subprocess.run(["bash", str(ROOT / "launch" / "submit.sh"), *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in out.stdout + out.stderr

    manifests = sorted(home.glob("bulk/*/manifest.json"))
    assert len(manifests) == 1, list(home.rglob("*"))[:20]
    manifest = json.loads(manifests[0].read_text())
    assert [(r["concept"], r["status"]) for r in manifest["results"]] == [("cat", "trained")]

    head = _git("rev-parse", "HEAD")
    assert head.returncode == 0, "this test reads the code version of the checkout it runs from"
    dirty = _git("diff", "--quiet", "HEAD", "--").returncode != 0
    recorded = manifest["code_version"]
    assert recorded.startswith("git:") and head.stdout.strip() in recorded, recorded
    assert recorded.endswith("-dirty") == dirty, recorded

    from spm_train.registry import Registry

    with Registry.open(str(home / "registry"), create=False) as reg:
        version = reg.resolve("cat")
    assert version.lineage["code_version"] == recorded
    assert os.path.isfile(home / "store" / "results" / manifest["results"][0]["key"] / "membrane.safetensors")


def test_the_driver_of_a_submitted_job_leaves_the_jobs_variables_to_the_job(monkeypatch):
    """Ray refuses a ray.init whose runtime env sets a variable the submitted job's runtime env sets: the
    driver passes on only the variables the job does not set (the fast check of what the test above runs)."""
    import ray

    from spm_train.bulk.runner import ClusterOptions, connect

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = {"runtime_env": {"env_vars": {"WANDB_MODE": "offline", "SPM_HOME": "/shared/spm"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    connect(ClusterOptions(address="local"))
    env_vars = seen["runtime_env"]["env_vars"]
    assert "WANDB_MODE" not in env_vars and env_vars["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    connect(ClusterOptions(address="local"))
    assert seen["runtime_env"]["env_vars"]["WANDB_MODE"] == "offline"  # outside a submitted job: passed on
