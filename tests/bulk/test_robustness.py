"""The result store, result keys, retries and cluster set-up where a run meets the real world.

A store used from another working directory or moved to another folder, a membrane deleted by
hand, cluster settings that change the weights, a worker that dies between sub-packs, a stray
RAY_ADDRESS, and a resource request no node can meet.
"""

import json
import logging
import os
import pickle
import shutil
import threading

import pytest
import ray
import torch

from spm_train import ConceptSpec, TrainerConfig
from spm_train.bulk import runner
from spm_train.bulk.plan import _hash, expand, pack, result_key
from spm_train.bulk.runner import ClusterOptions, check_reachable, check_resources, connect, run_jobs, train_pack
from spm_train.bulk.store import ConceptResult, ResultStore
from spm_train.errors import ClusterError, ConfigError
from spm_train.membrane import Membrane
from spm_train.training import PackTrainer

from .conftest import compose

CONCEPTS = [ConceptSpec("a", "apple"), ConceptSpec("b", "banana"), ConceptSpec("c", "cherry")]
TINY = {"source": "random:sd1", "dtype": "float32"}


def _membrane(name: str) -> Membrane:
    return Membrane(weights={"lora_unet_x": (torch.ones(1, 4), torch.ones(4, 1))}, rank=1, alpha=1.0, name=name)


def _result(key: str, concept: str = "a") -> ConceptResult:
    return ConceptResult(concept=concept, key=key, point={}, point_id="default", status="trained")


# -- the result store ----------------------------------------------------------------------------


def test_a_relative_store_root_names_the_drivers_folder_on_every_worker(tmp_path, monkeypatch):
    (tmp_path / "driver").mkdir()
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    store = ResultStore("runs/store")
    assert store.root == str(tmp_path / "driver" / "runs" / "store")
    monkeypatch.chdir(tmp_path / "worker")  # a Ray worker starts elsewhere
    on_worker = pickle.loads(pickle.dumps(store))
    ResultStore(on_worker.root).put(_result("k1"), _membrane("a"))
    assert (tmp_path / "driver" / "runs" / "store" / "results" / "k1" / "membrane.safetensors").is_file()
    assert not (tmp_path / "worker" / "runs").exists()
    assert ResultStore("memory://bucket/store/").root == "memory://bucket/store"  # URLs stay as they are


def test_a_copied_or_moved_store_serves_its_own_membranes(tmp_path):
    ResultStore(tmp_path / "first").put(_result("k1"), _membrane("a"))
    with open(tmp_path / "first" / "results" / "k1" / "result.json") as fh:
        assert json.load(fh)["membrane"] == "results/k1/membrane.safetensors"  # relative to the root
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    shutil.move(str(tmp_path / "first"), str(tmp_path / "moved"))
    for folder in ("copy", "moved"):
        store = ResultStore(tmp_path / folder)
        assert store.has("k1")
        assert store.get("k1").membrane == str(tmp_path / folder / "results" / "k1" / "membrane.safetensors")


def test_results_written_by_older_stores_are_still_read(tmp_path):
    store = ResultStore(tmp_path / "store")
    store.put(_result("k1"), _membrane("a"))
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(store.membrane_url("k1"), elsewhere)
    record = tmp_path / "store" / "results" / "k1" / "result.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "membrane": str(elsewhere)}))  # an absolute path, as written before
    assert store.has("k1") and store.get("k1").membrane == str(elsewhere)
    # a path relative to the old driver's working directory: the membrane is found at its place in the store
    record.write_text(json.dumps({**data, "membrane": "runs/store/results/k1/membrane.safetensors"}))
    assert store.get("k1").membrane == store.membrane_url("k1")


def test_a_result_whose_membrane_was_deleted_is_trained_again(tmp_path):
    from pipelines.bulk_train import plan_run

    store = ResultStore(tmp_path / "lone")
    store.put(_result("k1"), _membrane("a"))
    os.remove(store.membrane_url("k1"))
    assert not store.has("k1")
    with pytest.raises(FileNotFoundError, match="k1.*membrane file .*membrane.safetensors is missing"):
        store.get("k1")

    cfg = compose(tmp_path)
    plan = plan_run(cfg)
    for task in [t for job in plan.jobs for t in job.tasks]:
        plan.store.put(_result(task.key, task.concept.name), _membrane(task.concept.name))
    cached = plan_run(cfg)
    assert not cached.jobs and len(cached.cached) == 3
    gone = cached.cached[1]
    os.remove(gone.membrane)
    again = plan_run(cfg)
    assert [t.concept.name for job in again.jobs for t in job.tasks] == [gone.concept]
    assert sorted(r.concept for r in again.cached) == sorted({"cat", "snoopy", "vangogh"} - {gone.concept})


# -- result keys -----------------------------------------------------------------------------------


def test_data_parallel_and_deepspeed_settings_enter_the_result_key():
    trainer = TrainerConfig.preset("smoke")

    def keys(cluster=None):
        return [t.key for t in expand(CONCEPTS, trainer, {}, "fp", cluster=cluster)]

    plain = keys()
    # the default single-process setting keeps the keys every earlier run stored its results under
    old = [_hash({"concept": {k: v for k, v in c.to_dict().items() if k not in ("trainer", "nontarget", "probes")},
                  "trainer": trainer.fingerprint(), "base": "fp"}) for c in CONCEPTS]
    assert plain == old == keys(ClusterOptions()) == keys(ClusterOptions(cpus_per_job=4, gpus_per_job=0.5))
    assert plain == [result_key(c, trainer, "fp") for c in CONCEPTS]
    two, three = keys(ClusterOptions(workers_per_job=2)), keys(ClusterOptions(workers_per_job=3))
    zero2 = keys(ClusterOptions(deepspeed={"zero_optimization": {"stage": 2}}))
    zero3 = keys(ClusterOptions(deepspeed={"zero_optimization": {"stage": 3}}))
    both = keys(ClusterOptions(workers_per_job=2, deepspeed={"zero_optimization": {"stage": 2}}))
    variants = [plain, two, three, zero2, zero3, both]
    assert len({k for v in variants for k in v}) == len(CONCEPTS) * len(variants)
    assert keys(ClusterOptions(workers_per_job=2)) == two  # still stable


def test_a_data_parallel_run_and_a_plain_one_plan_different_results(tmp_path):
    from pipelines.bulk_train import plan_run

    plain = plan_run(compose(tmp_path))
    parallel = plan_run(compose(tmp_path, "cluster.workers_per_job=2"))
    keys = lambda plan: {t.key for j in plan.jobs for t in j.tasks}  # noqa: E731
    assert keys(plain) and not keys(plain) & keys(parallel)


# -- retried packs -----------------------------------------------------------------------------------


@pytest.fixture
def trained_packs(monkeypatch):
    """Records the concepts of every pack trained; ``fail_on`` makes a pack holding that concept die."""
    from spm_train import training

    record = {"packs": [], "fail_on": None}
    real = training.PackTrainer

    def recording(pipe, concepts, *args, **kwargs):
        names = [c.name for c in concepts]
        if record["fail_on"] in names:
            raise RuntimeError(f"worker lost while training {names}")
        record["packs"].append(names)
        return real(pipe, concepts, *args, **kwargs)

    monkeypatch.setattr(training, "PackTrainer", recording)
    return record


def _checkpoints(root) -> list[str]:
    folder = root / "checkpoints"
    return os.listdir(folder) if folder.exists() else []


def _job(**trainer):
    cfg = TrainerConfig.preset("smoke", iterations=2, **trainer)
    return pack(expand(CONCEPTS, cfg, {}, "fp"), pack_size=8)[0]


def test_a_retried_auto_pack_job_skips_the_sub_packs_it_already_stored(tmp_path, monkeypatch, trained_packs):
    from spm_train import packing

    monkeypatch.setattr(packing, "fit_pack_size", lambda pipe, trainer, limit=64: 1)  # one concept fits
    job, root = _job(), str(tmp_path / "store")
    trained_packs["fail_on"] = "b"  # the worker dies in the second sub-pack
    with pytest.raises(RuntimeError, match="worker lost"):
        train_pack(job, TINY, root, auto_pack=True)
    first = ResultStore(root).get(job.tasks[0].key)
    assert trained_packs["packs"] == [["a"]]

    trained_packs["fail_on"] = None  # Ray retries the task
    rows = train_pack(job, TINY, root, auto_pack=True)
    assert trained_packs["packs"] == [["a"], ["b"], ["c"]]
    assert [r["concept"] for r in rows] == ["a", "b", "c"] and {r["status"] for r in rows} == {"trained"}
    assert rows[0] == first.to_dict()
    assert not _checkpoints(tmp_path / "store")


def test_a_pack_that_runs_out_of_memory_shrinks_until_it_fits(tmp_path, monkeypatch, trained_packs):
    """cluster.pack_size=0: a pack of more than one concept runs out of GPU memory on its first step (a stub
    step raising what CUDA raises); accelerate retries smaller packs (10 % smaller, at least one concept fewer)
    until one fits, and every concept trains."""
    from spm_train import packing

    monkeypatch.setattr(packing, "fit_pack_size", lambda pipe, trainer, limit=64: 3)  # measured: all three
    real_step = PackTrainer._train_step

    def step(self):
        if len(self.concepts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(PackTrainer, "_train_step", step)
    job, root = _job(), str(tmp_path / "store")
    rows = train_pack(job, TINY, root, auto_pack=True)
    assert trained_packs["packs"] == [["a", "b", "c"], ["a", "b"], ["a"], ["b"], ["c"]]  # 3 -> 2 -> 1
    assert [r["concept"] for r in rows] == ["a", "b", "c"] and {r["status"] for r in rows} == {"trained"}
    assert {r["pack_concepts"] for r in rows} == {1}
    assert all(ResultStore(root).lookup(t.key) is not None for t in job.tasks)
    assert not _checkpoints(tmp_path / "store")


def test_an_error_other_than_memory_is_not_retried_smaller(tmp_path, monkeypatch, trained_packs):
    from spm_train import packing

    monkeypatch.setattr(packing, "fit_pack_size", lambda pipe, trainer, limit=64: None)  # CPU: the whole job
    monkeypatch.setattr(PackTrainer, "_train_step", lambda self: (_ for _ in ()).throw(
        RuntimeError("expected all tensors to be on the same device")))
    with pytest.raises(RuntimeError, match="same device"):
        train_pack(_job(), TINY, str(tmp_path / "store"), auto_pack=True)
    assert trained_packs["packs"] == [["a", "b", "c"]]


def test_a_retried_pack_resumes_from_its_checkpoint_and_stores_only_what_is_missing(tmp_path, monkeypatch,
                                                                                     trained_packs):
    job, root = _job(checkpoint_every=1), str(tmp_path / "store")
    real_put = ResultStore.put

    def put_then_die(self, result, membrane):
        if result.concept == "b":
            raise RuntimeError("worker lost while storing b")
        return real_put(self, result, membrane)

    monkeypatch.setattr(ResultStore, "put", put_then_die)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_pack(job, TINY, root)
    monkeypatch.setattr(ResultStore, "put", real_put)
    store = ResultStore(root)
    assert store.has(job.tasks[0].key) and not store.has(job.tasks[1].key)

    stored_a = (tmp_path / "store" / "results" / job.tasks[0].key / "result.json").read_text()
    rows = train_pack(job, TINY, root)
    assert trained_packs["packs"] == [["a", "b", "c"], ["a", "b", "c"]]  # the pack again, as a whole
    assert [r["concept"] for r in rows] == ["a", "b", "c"]
    # from the first attempt's last checkpoint (step 1 of 2: the final step writes results, not a checkpoint)
    assert [r["resumed_from"] for r in rows[1:]] == [1, 1]
    assert (tmp_path / "store" / "results" / job.tasks[0].key / "result.json").read_text() == stored_a
    assert all(store.has(t.key) for t in job.tasks)
    assert not _checkpoints(tmp_path / "store")  # the first attempt's checkpoint is gone too
    # once everything is stored a retry trains nothing (and loads no base model)
    monkeypatch.setattr(runner, "_load_base", lambda model: pytest.fail("loaded the base model"))
    assert train_pack(job, TINY, root) == rows and len(trained_packs["packs"]) == 2


# -- connecting ---------------------------------------------------------------------------------------


def test_a_local_run_starts_its_own_instance_whatever_ray_address_says(monkeypatch, ray_shutdown):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    check_reachable(ClusterOptions())  # not used by a local run
    connect(ClusterOptions(num_cpus=1))
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 1
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42


def test_ray_address_is_checked_like_cluster_address(tmp_path, monkeypatch):
    from pipelines.bulk_train import plan_run

    monkeypatch.setenv("RAY_ADDRESS", "http://localhost:8265")
    with pytest.raises(ClusterError, match="RAY_ADDRESS 'http://localhost:8265' is not .*dashboard") as err:
        check_reachable(ClusterOptions(address="auto"))
    assert "\n" not in str(err.value)
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        plan_run(compose(tmp_path, "cluster=existing"))
    assert not ray.is_initialized()
    with pytest.raises(ClusterError, match="cluster address 'http://localhost:8265' is not .*dashboard"):
        check_reachable(ClusterOptions(address="http://localhost:8265"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at '127.0.0.1:9' \(from RAY_ADDRESS"):
        check_reachable(ClusterOptions(address="auto", connect_timeout_s=2))


def test_auto_joins_only_a_cluster_started_with_ray_start(tmp_path, monkeypatch):
    """Ray's own "auto" joins any Ray running on the machine, an in-process instance of another program
    included; cluster.address=auto joins RAY_ADDRESS or what `ray start` recorded, nothing else."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records its cluster
    with pytest.raises(ClusterError, match=r"no Ray cluster was started with `ray start` .*not joined") as err:
        check_reachable(ClusterOptions(address="auto"))
    assert "\n" not in str(err.value)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at '127.0.0.1:9' \(the cluster `ray start`"):
        check_reachable(ClusterOptions(address="auto", connect_timeout_s=2))
    assert not ray.is_initialized()


# -- resources no node offers -----------------------------------------------------------------------


def _noop_pack(job, model, store_root, board=None):
    return [ConceptResult(concept=t.concept.name, key=t.key, point=t.point, point_id=t.point_id,
                          status="trained", job_id=job.job_id).to_dict() for t in job.tasks]


def _run_jobs_guarded(jobs, options, store):
    """run_jobs in a thread: a job that no node can hold would otherwise wait forever."""
    outcome = {}

    def target():
        try:
            outcome["results"] = run_jobs(jobs, {}, store, options, progress=False, train_fn=_noop_pack)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "run_jobs is still waiting for resources no node offers"
    return outcome


def test_a_request_no_node_can_meet_is_refused_on_a_local_instance(tmp_path, caplog, ray_shutdown):
    connect(ClusterOptions(num_cpus=1))
    jobs = pack(expand(CONCEPTS, TrainerConfig.preset("smoke"), {}, "fp"), pack_size=1)
    store = ResultStore(tmp_path / "store")

    outcome = _run_jobs_guarded(jobs, ClusterOptions(gpus_per_job=1), store)
    assert isinstance(outcome.get("error"), ConfigError), outcome
    message = str(outcome["error"])
    assert "cluster.gpus_per_job=1" in message and "1 node with 1 CPU, 0 GPU" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="cluster.cpus_per_job=2 asks for 2 CPU"):
        check_resources(ClusterOptions(cpus_per_job=2))
    with pytest.raises(ConfigError, match="cluster.workers_per_job=2 with cluster.cpus_per_job=1 .*hold 1 at once"):
        check_resources(ClusterOptions(workers_per_job=2, cpus_per_job=1))

    # a cluster may add such a node: a warning, not an error
    with caplog.at_level(logging.WARNING, logger="spm_train.bulk.runner"):
        check_resources(ClusterOptions(address="auto", gpus_per_job=1))
    assert "cluster.gpus_per_job=1" in caplog.text and "adds a node" in caplog.text

    # what the instance can hold runs as before
    outcome = _run_jobs_guarded(jobs, ClusterOptions(cpus_per_job=1), store)
    assert [r.status for r in outcome["results"]] == ["trained"] * 3
