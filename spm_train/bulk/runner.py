"""Run packs on a Ray cluster: submit every job, then gather; retry crashes, isolate failing concepts.

- Each pack is one Ray task with the cluster config's resources (fractional GPUs allowed, CPU-only
  allowed). ``max_retries`` covers worker and node deaths; the retried task resumes from the pack's
  last checkpoint in the shared result store.
- An exception raised by training (a diverging concept, a bad prompt) is not retried as is: a pack
  of several concepts is split into single-concept jobs so only the faulty concept fails.
- Workers post their step to a small progress actor; the driver draws live bars from it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ClusterError, first_line
from .plan import Job
from .store import ConceptResult, ResultStore

logger = logging.getLogger(__name__)

_BASE_MODELS: dict[tuple, Any] = {}  # per worker process: a base model is loaded once, reused by later packs


@dataclass
class ClusterOptions:
    """How jobs use the cluster (see conf/cluster/)."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    workers_per_job: int = 1
    deepspeed: dict[str, Any] | None = None
    # measure on the worker how many of a job's concepts fit in one pack (GPU only); else train it whole
    auto_pack: bool = False
    max_retries: int = 3
    connect_timeout_s: float = 10.0
    runtime_env: dict[str, Any] = field(default_factory=dict)


def connect(options: ClusterOptions):
    """Start a local Ray instance in-process, or join the cluster at ``options.address``."""
    import ray

    if ray.is_initialized():
        return ray
    env = dict(options.runtime_env or {})
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "WANDB_MODE", "RAY_AUTH_MODE") if k in os.environ}
    if env_vars:
        env["env_vars"] = {**env_vars, **env.get("env_vars", {})}
    kwargs: dict[str, Any] = {"runtime_env": env or None, "log_to_driver": False, "include_dashboard": False}
    if options.address in (None, "", "local"):
        kwargs.update(num_cpus=options.num_cpus, num_gpus=options.num_gpus)
        ray.init(**kwargs)
        return ray
    address = options.address
    check_reachable(options)
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises several types for the same problem
        raise ClusterError(f"cannot join the Ray cluster at {address!r}: {first_line(exc)}") from None
    return ray


def check_reachable(options: ClusterOptions) -> None:
    """Fail in seconds, with one line, when a host:port address does not answer."""
    address, timeout = options.address, options.connect_timeout_s
    if address in (None, "", "local", "auto"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cluster address {address!r} is not 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from None


def _load_base(model: dict):
    import torch

    from ..models import load_base_model

    key = (model["source"], model.get("dtype", "float32"))
    if key not in _BASE_MODELS:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        _BASE_MODELS[key] = load_base_model(model["source"], dtype=key[1], device=device)
    return _BASE_MODELS[key]


def train_pack(job: Job, model: dict, store_root: str, board=None, deepspeed: dict | None = None,
               auto_pack: bool = False) -> list[dict]:
    """The body of one Ray task: train a pack (resuming if it was checkpointed) and store its results.

    With ``auto_pack`` the job's concepts are trained in consecutive packs of the largest size that
    fits the worker's accelerator memory (measured by ``packing.fit_pack_size``).
    """
    pipe = _load_base(model)
    if auto_pack and deepspeed is None:
        from ..packing import fit_pack_size

        k = fit_pack_size(pipe, job.trainer, limit=len(job.tasks))
        if k is not None and k < len(job.tasks):
            rows = []
            for i in range(0, len(job.tasks), k):
                part = Job(job_id=f"{job.job_id}-{i // k}", trainer=job.trainer, tasks=job.tasks[i:i + k])
                rows += _train_pack(part, pipe, store_root, board, None)
            return rows
    return _train_pack(job, pipe, store_root, board, deepspeed)


def _train_pack(job: Job, pipe, store_root: str, board, deepspeed: dict | None) -> list[dict]:
    import ray

    from ..training import PackTrainer

    store = ResultStore(store_root)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def report(step: int, rows: list[dict]) -> None:
        if board is not None:
            board.update.remote(job.job_id, step, job.trainer.iterations, sum(r["loss"] for r in rows) / len(rows))

    started, start = time.time(), time.perf_counter()
    trainer = PackTrainer(pipe, job.concepts, job.trainer, checkpoint_dir=store.checkpoint_dir(job.job_id),
                          callback=report, progress=False, deepspeed=deepspeed)
    try:
        result = trainer.train()
    finally:
        trainer.close()
        if getattr(trainer, "zero_stage", 0) == 3:  # ZeRO 3 partitioned the base's weights in place
            _BASE_MODELS.clear()
    if trainer.worker_rank != 0:  # data-parallel workers hold the same membranes; rank 0 stores them
        return []
    seconds = time.perf_counter() - start
    last = result.final_losses()
    rows = []
    for task, membrane in zip(job.tasks, result.membranes):
        final = last.get(task.concept.name, {})
        membrane.extra["point"] = task.point_id
        row = ConceptResult(
            concept=task.concept.name, key=task.key, point=task.point, point_id=task.point_id, status="trained",
            loss=final.get("loss"), erase=final.get("erase"), anchor=final.get("anchor"), seconds=seconds,
            started=started, finished=time.time(), job_id=job.job_id, resumed_from=result.resumed_from, node=node,
            history=[r for r in result.history if r["concept"] == task.concept.name],
        )
        rows.append(store.put(row, membrane).to_dict())
    store.drop_checkpoint(job.job_id)
    return rows


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.jobs: dict[str, tuple[int, int, float]] = {}

        def update(self, job_id: str, step: int, total: int, loss: float) -> None:
            self.jobs[job_id] = (step, total, loss)

        def snapshot(self) -> dict:
            return dict(self.jobs)

    return ProgressBoard.remote()


class _Bars:
    """Live progress: one bar per running pack and one for the whole run (rich)."""

    def __init__(self, jobs: Sequence[Job], enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), disable=not enabled,
                                 transient=False)
        self.overall = self.progress.add_task("all packs", total=sum(j.trainer.iterations for j in jobs), loss="")
        self.bars: dict[str, int] = {}
        self.steps: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def add(self, job: Job) -> None:
        if job.job_id not in self.bars:
            label = ", ".join(job.names)
            label = label if len(label) <= 40 else label[:37] + "..."
            self.bars[job.job_id] = self.progress.add_task(f"[{job.job_id[:6]}] {label}",
                                                           total=job.trainer.iterations, loss="")

    def update(self, snapshot: dict) -> None:
        for job_id, (step, total, loss) in snapshot.items():
            if job_id in self.bars:
                self.progress.update(self.bars[job_id], completed=step, loss=f"loss {loss:.4g}")
                delta = step - self.steps.get(job_id, 0)
                self.steps[job_id] = step
                self.progress.advance(self.overall, max(delta, 0))


def run_jobs(jobs: Sequence[Job], model: dict, store: ResultStore, options: ClusterOptions, *,
             progress: bool = True, task_options: Callable[[Job], dict] | None = None,
             train_fn: Callable[..., list[dict]] | None = None) -> list[ConceptResult]:
    """Submit every job, then gather results as they finish. Never raises for a failing concept.

    ``train_fn`` replaces the pack trainer (the orchestration benchmark uses a no-op).
    """
    import ray
    from ray.exceptions import RayTaskError

    board = _progress_board()
    if options.workers_per_job > 1:
        from .distributed import train_pack_data_parallel

        # the task only drives a Ray Train worker group, which holds the resources
        remote = ray.remote(train_pack_data_parallel)
        resources = dict(num_cpus=0, num_gpus=0)
        extra = (options.workers_per_job, options.cpus_per_job, options.gpus_per_job, options.deepspeed)
    else:
        remote = ray.remote(train_fn or train_pack)
        resources = dict(num_cpus=options.cpus_per_job, num_gpus=options.gpus_per_job)
        extra = (options.deepspeed, options.auto_pack) if (options.deepspeed or options.auto_pack) else ()

    def submit(job: Job):
        opts = dict(resources, max_retries=options.max_retries, retry_exceptions=False)
        if task_options is not None:
            opts.update(task_options(job))
        return remote.options(name=f"pack-{job.job_id[:8]}", **opts).remote(job, model, store.root, board, *extra)

    pending = {submit(job): job for job in jobs}
    results: list[ConceptResult] = []
    with _Bars(jobs, progress) as bars:
        for job in jobs:
            bars.add(job)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            try:
                bars.update(ray.get(board.snapshot.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
            for ref in done:
                job = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    if len(job.tasks) > 1:
                        logger.warning("pack %s failed (%s); retrying its %d concepts one by one",
                                       job.job_id[:8], first_line(cause), len(job.tasks))
                        for single in job.split():
                            bars.add(single)
                            pending[submit(single)] = single
                        continue
                    results += _failed(job, cause)
                except Exception as exc:  # noqa: BLE001 - worker or node lost beyond its retries
                    results += _failed(job, exc)
                else:
                    results += [ConceptResult(**row) for row in rows]
    return results


def _failed(job: Job, exc: BaseException) -> list[ConceptResult]:
    message = f"{type(exc).__name__}: {first_line(exc)}"
    logger.error("job %s (%s) failed: %s", job.job_id[:8], ", ".join(job.names), message)
    return [ConceptResult(concept=t.concept.name, key=t.key, point=t.point, point_id=t.point_id, status="failed",
                          job_id=job.job_id, error=message) for t in job.tasks]
