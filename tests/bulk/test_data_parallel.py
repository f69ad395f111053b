"""A pack on two gloo workers (Ray Train TorchTrainer): the workers stay in sync and results are stored once."""

import contextlib
import glob
import json
import os
import threading
import time

import torch

from pipelines.bulk_train import plan_run, train
from spm_train import load_membrane, train_membranes
from spm_train.models import load_base_model

from .conftest import compose


def test_two_workers_train_one_pack_data_parallel(tmp_path, ray_shutdown, monkeypatch):
    """Ray Train runs the pack on two gloo workers; one worker is killed after the first checkpoint, Ray
    Train restarts the group (FailureConfig from cluster.max_retries) and the pack resumes from it.

    Two restarts are allowed and worker start-up gets time: beside other tests on two cores, a restarted
    group importing torch and diffusers was once torn down before it trained."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    cfg = compose(tmp_path, "cluster.num_cpus=3", "cluster.workers_per_job=2", "cluster.pack_size=3",
                  "cluster.max_retries=2", "trainer.iterations=8", "trainer.checkpoint_every=2")
    plan = plan_run(cfg)  # the pack, before the run stores its results
    killer = threading.Thread(target=_kill_a_train_worker_after_a_checkpoint, args=(tmp_path,), daemon=True)
    killer.start()
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    killer.join(timeout=5)
    assert [r.status for r in summary.results] == ["trained"] * 3, [r.error for r in summary.results]
    assert len(glob.glob(str(tmp_path / "store/results/*/result.json"))) == 3
    assert all(r.resumed_from > 0 and r.resumed_from % 2 == 0 for r in summary.results), \
        [r.resumed_from for r in summary.results]
    # rank 0 handed its checkpoint folder to Ray Train, which keeps a copy in its run folder
    assert glob.glob(str(tmp_path / "store/ray_train/**/checkpoint.safetensors"), recursive=True)
    assert not glob.glob(str(tmp_path / "store/checkpoints/*/checkpoint.safetensors"))  # the store's is dropped
    # the same pack in one process sees half the trajectories, so its membranes differ
    single = train_membranes(load_base_model(plan.model["source"]), plan.jobs[0].concepts, plan.jobs[0].trainer,
                             progress=False).membranes
    for a, mb in zip(summary.results, single):
        ma = load_membrane(a.membrane)
        assert ma.name == mb.name
        diff = max((ma.weights[k][1] - mb.weights[k][1]).abs().max().item() for k in ma.weights)
        assert diff > 1e-6


def _kill_a_train_worker_after_a_checkpoint(tmp_path, timeout: float = 240.0) -> None:
    """SIGKILL one Ray Train worker of this test's own Ray instance once the pack has a checkpoint."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and not glob.glob(str(tmp_path / "store/checkpoints/*/checkpoint.safetensors")):
        time.sleep(0.05)
    for proc in psutil.Process(os.getpid()).children(recursive=True):  # only processes this test started
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                proc.kill()
                return


def test_gradients_are_averaged_over_ranks(tmp_path):
    """Two gloo ranks started as torchrun would: accelerate reads the ranks from the environment, averages
    the gradients, and both ranks hold identical membranes, which moved; each rank logs the same losses."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    m0, m1 = load_membrane(tmp_path / "rank0.safetensors"), load_membrane(tmp_path / "rank1.safetensors")
    for key in m0.weights:
        assert torch.equal(m0.weights[key][0], m1.weights[key][0])
        assert torch.equal(m0.weights[key][1], m1.weights[key][1])
    assert max(m0.weights[k][1].abs().max().item() for k in m0.weights) > 0
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0]["world"] == losses[1]["world"] == 2 and losses[0]["losses"] == losses[1]["losses"]


def _rank_main(rank, world, out):
    import torch.distributed as dist

    from spm_train import ConceptSpec, TrainerConfig, train_membranes
    from spm_train.architectures import tiny_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pipe = tiny_pipeline("sd1")
        cfg = TrainerConfig.preset("smoke", iterations=3, lr=1e-2)
        result = train_membranes(pipe, [ConceptSpec("cat", "a photo of a cat")], cfg, progress=False)
        result.membranes[0].save(f"{out}/rank{rank}.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump({"world": dist.get_world_size(),
                       "losses": [r["loss"] for r in result.history]}, fh)
    finally:
        dist.destroy_process_group()
