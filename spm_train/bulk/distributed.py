"""One pack over several workers: Ray Train's TorchTrainer, data-parallel over trajectories and anchors.

Each worker draws its own trajectories and anchors (its rank is folded into the concepts' seeds),
the membranes' gradients are averaged with one all-reduce per step, so every worker holds the same
membranes; rank 0 writes checkpoints and results to the shared store. With a DeepSpeed config the
workers train under a ZeRO engine instead (stage 3 shards the frozen base across them). On CPU the process group uses
gloo, on GPUs NCCL (Ray Train picks the backend and sets the device of each worker).
"""

from __future__ import annotations

from .plan import Job
from .store import ResultStore


def _worker_loop(config: dict) -> None:
    from .runner import train_pack

    # the driving task holds the pack's claims: the workers of one pack must not wait for each other
    train_pack(config["job"], config["model"], config["store_root"], config.get("board"), config.get("deepspeed"),
               claim=False)


def train_pack_data_parallel(job: Job, model: dict, store_root: str, board=None, num_workers: int = 2,
                             cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                             deepspeed: dict | None = None) -> list[dict]:
    """Train ``job`` on ``num_workers`` Ray Train workers; returns the stored results like ``train_pack``."""
    store = ResultStore(store_root)
    with store.claim([t.key for t in job.tasks]):
        stored = [store.lookup(t.key) for t in job.tasks]
        if all(r is not None for r in stored):  # a retry, or another run, stored every result
            return [r.to_dict() for r in stored]
        _fit(job, model, store, board, num_workers, cpus_per_worker, gpus_per_worker, deepspeed)
    return [store.get(t.key).to_dict() for t in job.tasks]


def _fit(job: Job, model: dict, store: ResultStore, board, num_workers: int, cpus_per_worker: float,
         gpus_per_worker: float, deepspeed: dict | None) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "model": model, "store_root": store.root, "board": board,
                           "deepspeed": deepspeed},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"pack-{job.job_id}", storage_path=f"{store.root}/ray_train"),
    )
    trainer.fit()
