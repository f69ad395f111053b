"""One pack over several workers: Ray Train's TorchTrainer, data-parallel over trajectories and anchors.

Ray Train starts the workers, their process group (gloo on CPU, NCCL on GPUs) and the environment
accelerate reads (RANK, WORLD_SIZE, LOCAL_RANK); the pack trainer takes its rank and collectives from
accelerate (``spm_train.parallel``). Each worker draws its own trajectories and anchors (its rank is
folded into the concepts' seeds), the membranes' gradients are averaged with one all-reduce per step,
so every worker holds the same membranes; rank 0 writes checkpoints and results to the shared store.
With a DeepSpeed config the workers train under a ZeRO engine instead (stage 3 shards the frozen base
across them).

Each checkpoint is reported to Ray Train (``ray.train.report``: the losses, and the checkpoint folder from
rank 0), and so is the end of training. A worker that dies or raises makes Ray Train restart the group
up to ``max_failures`` times (``FailureConfig``, the cluster's ``max_retries``); the restarted workers
resume from the pack's checkpoint in the store, the folder Ray Train was handed.
"""

from __future__ import annotations

import logging
import os

from .plan import Job
from .store import ResultStore

logger = logging.getLogger(__name__)


class RayTrainReporter:
    """Tells Ray Train of a pack's checkpoints and its end. Every rank reports the same number of times
    (``ray.train.report`` is a barrier); only rank 0 hands over the checkpoint, the others pass None."""

    def checkpoint(self, step: int, url: str, history: list[dict]) -> None:
        import ray.train

        folder = os.path.dirname(url) if url else ""
        metrics = _metrics(step, history)
        checkpoint = None
        if folder and "://" not in folder:
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        elif folder:  # Ray copies local folders; an object-store checkpoint is named, not copied
            metrics["checkpoint"] = url
        # the store keeps its checkpoint: the pack resumes from it, and drops it once its results are stored
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)

    def finished(self, step: int, history: list[dict]) -> None:
        import ray.train

        ray.train.report(_metrics(step, history))


def _metrics(step: int, history: list[dict]) -> dict:
    """The pack's losses at ``step``'s last logged row of each concept: their mean and each concept's."""
    last: dict[str, float] = {}
    for row in history:
        last[row["concept"]] = row["loss"]
    metrics = {"step": step, "loss": sum(last.values()) / len(last) if last else float("nan")}
    metrics.update({f"loss/{name}": value for name, value in last.items()})
    return metrics


def _worker_loop(config: dict) -> None:
    import ray.train

    from .runner import train_pack

    previous = ray.train.get_checkpoint()
    if previous is not None:
        logger.info("pack %s: Ray Train restarted the workers; resuming from the store's checkpoint",
                    config["job"].job_id[:8])
    # the driving task holds the pack's claims: the workers of one pack must not wait for each other
    train_pack(config["job"], config["model"], config["store_root"], config.get("board"), config.get("deepspeed"),
               claim=False, reporter=RayTrainReporter())


def train_pack_data_parallel(job: Job, model: dict, store_root: str, board=None, num_workers: int = 2,
                             cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                             deepspeed: dict | None = None, max_failures: int = 0) -> list[dict]:
    """Train ``job`` on ``num_workers`` Ray Train workers; returns the stored results like ``train_pack``."""
    store = ResultStore(store_root)
    with store.claim([t.key for t in job.tasks]):
        stored = [store.lookup(t.key) for t in job.tasks]
        if all(r is not None for r in stored):  # a retry, or another run, stored every result
            return [r.to_dict() for r in stored]
        _fit(job, model, store, board, num_workers, cpus_per_worker, gpus_per_worker, deepspeed, max_failures)
    return [store.get(t.key).to_dict() for t in job.tasks]


def _fit(job: Job, model: dict, store: ResultStore, board, num_workers: int, cpus_per_worker: float,
         gpus_per_worker: float, deepspeed: dict | None, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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
        run_config=RunConfig(name=f"pack-{job.job_id}", storage_path=f"{store.root}/ray_train",
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    logger.info("pack %s: Ray Train reported step %s, mean loss %.4g", job.job_id[:8],
                result.metrics.get("step"), result.metrics.get("loss", float("nan")))
    return result
