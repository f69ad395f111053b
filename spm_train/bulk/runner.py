"""Run packs on a Ray cluster: submit every job, then gather; retry crashes, isolate failing concepts.

- Each pack is one Ray task with the cluster config's resources (fractional GPUs allowed, CPU-only
  allowed). ``max_retries`` covers worker and node deaths; the retried task resumes from the pack's
  last checkpoint in the shared result store.
- An exception raised by training (a diverging concept, a bad prompt) is not retried as is: a pack
  of several concepts is split into single-concept jobs so only the faulty concept fails.
- Workers post their step to a small progress actor; the driver draws live bars from it.
- A retried task trains only the concepts whose results are not in the store yet.
- A job no node could ever hold is refused before it is submitted (local instance) or announced
  (a cluster, which may still add such a node).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ClusterError, ConfigError, first_line
from .plan import Job
from .store import ConceptResult, ResultStore

logger = logging.getLogger(__name__)

_BASE_MODELS: dict[tuple, Any] = {}  # per worker process: a base model is loaded once, reused by later packs
_LOCAL = (None, "", "local")  # cluster.address values that start a Ray instance in-process


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


# Ray puts Unix sockets under its session folder (about 67 more characters); a socket path has 107 at most
_RAY_TEMP_MAX = 40


def connect(options: ClusterOptions, temp_dir: str | None = None):
    """Start a local Ray instance in-process, or join the cluster at ``options.address``.

    A local run always starts its own instance: it joins neither the cluster ``RAY_ADDRESS`` names
    nor one started earlier on this machine with ``ray start``. Its session folder (logs, sockets)
    goes to ``temp_dir`` when given and short enough for Ray's socket paths, else Ray's default.
    """
    import ray

    if ray.is_initialized():
        return ray
    env = dict(options.runtime_env or {})
    job_set = _submitted_job_env_vars()
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "WANDB_MODE", "RAY_AUTH_MODE")
                if k in os.environ and k not in job_set}
    if env_vars:
        env["env_vars"] = {**env_vars, **env.get("env_vars", {})}
    kwargs: dict[str, Any] = {"runtime_env": env or None, "log_to_driver": False, "include_dashboard": False}
    if options.address in _LOCAL:
        kwargs.update(address="local", num_cpus=options.num_cpus, num_gpus=options.num_gpus)
        if temp_dir:
            temp_dir = os.path.abspath(temp_dir)
            if len(temp_dir) <= _RAY_TEMP_MAX:
                kwargs["_temp_dir"] = temp_dir
            else:
                logger.info("Ray's session folder stays in its default place: %s is longer than the %d "
                            "characters its socket paths allow", temp_dir, _RAY_TEMP_MAX)
        ray.init(**kwargs)
        return ray
    address = options.address
    check_reachable(options)
    target, source = _target(options)
    try:
        # the resolved address, never "auto": Ray's own "auto" also joins any Ray it finds running here,
        # including an instance another program started in-process
        ray.init(address=target or address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises several types for the same problem
        where = f"{target!r}{source}" if target else repr(address)
        raise ClusterError(f"cannot join the Ray cluster at {where}: {first_line(exc)}") from None
    return ray


def _submitted_job_env_vars() -> set[str]:
    """The variables the runtime env of a submitted Ray job sets (``ray job submit``, launch/submit.sh).

    Ray hands the job's config to its driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and refuses a ``ray.init``
    whose runtime env sets any of those variables again; the job's tasks get them from the job anyway.
    """
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def _target(options: ClusterOptions) -> tuple[str | None, str]:
    """The address to join, and a note when it does not come from the config itself; None: local.

    ``auto`` means the address in ``RAY_ADDRESS`` when there is one (users export it for job submission;
    a submitted job's driver gets it from Ray), else the cluster ``ray start`` started on this machine,
    as recorded in Ray's temp folder. Nothing else: a Ray instance another program started in-process
    is not a cluster to join (its owner holds its resources, and it ends with that program).
    """
    address = options.address
    if address in _LOCAL:
        return None, ""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if address not in ("", "auto", "local"):
            return address, " (from RAY_ADDRESS, with cluster.address=auto)"
        started = _started_by_ray_start()
        if not started:
            raise ClusterError("cluster.address=auto: no Ray cluster was started with `ray start` on this machine "
                               "(a Ray instance another program started in-process is not joined); run "
                               "`ray start --head`, or name the cluster: cluster.address=host:6379 or RAY_ADDRESS")
        return started, " (the cluster `ray start` started here, with cluster.address=auto)"
    return address, ""


def _started_by_ray_start() -> str | None:
    """The GCS address of the last cluster ``ray start`` started on this machine (only it records one)."""
    from ray._private.utils import read_ray_address  # the file `ray start` writes, honouring RAY_TMPDIR

    return read_ray_address() or None


def check_reachable(options: ClusterOptions) -> None:
    """Fail in seconds, with one line, when the address Ray would join is malformed or does not answer."""
    address, source = _target(options)
    if address is None:
        return
    name = "RAY_ADDRESS" if source else "cluster address"
    scheme, sep, hostport = address.rpartition("://")
    host, _, port = hostport.rpartition(":")
    if (sep and scheme != "ray") or not host or not port.isdigit():
        hint = ""
        if scheme in ("http", "https"):
            hint = (" (an http address is the dashboard's, for job submission; Ray joins the head's "
                    "GCS port, host:6379, or its client port, ray://host:10001)")
        raise ClusterError(f"{name} {address!r} is not 'auto', 'host:port' or 'ray://host:port'{hint}")
    try:
        with socket.create_connection((host, int(port)), timeout=options.connect_timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}{source}: {reason}") from None


def check_resources(options: ClusterOptions) -> None:
    """Compare what one job asks for with what the connected cluster's nodes hold.

    A job that no node can hold waits forever at 0/N. On a local instance that is a config error;
    a cluster may add such a node (autoscaling), so there it is a warning.
    """
    import ray

    asks = (("CPU", options.cpus_per_job), ("GPU", options.gpus_per_job))
    request = {name: float(amount) for name, amount in asks if amount}
    if not request:
        return
    nodes = [node.get("Resources") or {} for node in ray.nodes() if node.get("Alive")]
    workers = max(1, options.workers_per_job)
    # how many of the job's workers (one for a single-process job) the nodes hold at once
    fits = sum(min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in request.items())
               for node in nodes)
    if fits >= workers:
        return
    settings = {"CPU": "cpus_per_job", "GPU": "gpus_per_job"}
    short = [name for name in request if all(node.get(name, 0.0) < request[name] for node in nodes)]
    short = short or list(request)  # each is offered somewhere, never together
    asked = ", ".join(f"cluster.{settings[name]}={request[name]:g}" for name in short)
    verb = "asks" if len(short) == 1 else "ask"
    each = " and ".join(f"{amount:g} {name}" for name, amount in request.items())
    if workers > 1 and fits:
        problem = (f"cluster.workers_per_job={workers} with {asked} {verb} for {workers} workers of {each} "
                   f"each, but the nodes hold {fits} at once; {_offers(nodes)}")
    else:
        per = "each data-parallel worker" if workers > 1 else "each job"
        problem = f"{asked} {verb} for {each} for {per}, but no node offers that; {_offers(nodes)}"
    if options.address in _LOCAL:
        raise ConfigError("cluster config", [problem])
    logger.warning("%s; the jobs wait until the cluster adds a node that can hold them", problem)


def _offers(nodes: list[dict[str, float]]) -> str:
    """What the nodes hold, e.g. 'the Ray cluster has 1 node with 2 CPU, 0 GPU'."""
    if not nodes:
        return "the Ray cluster has no live node"
    kinds: dict[tuple[float, float], int] = {}
    for node in nodes:
        kind = (node.get("CPU", 0.0), node.get("GPU", 0.0))
        kinds[kind] = kinds.get(kind, 0) + 1
    shown = [f"{n} node{'s' if n > 1 else ''} with {cpu:g} CPU, {gpu:g} GPU"
             for (cpu, gpu), n in sorted(kinds.items())]
    more = f" and {len(shown) - 4} other kinds" if len(shown) > 4 else ""
    return "the Ray cluster has " + "; ".join(shown[:4]) + more


def _load_base(model: dict):
    import torch

    from ..models import load_base_model

    key = (model["source"], model.get("dtype", "float32"))
    if key not in _BASE_MODELS:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        _BASE_MODELS[key] = load_base_model(model["source"], dtype=key[1], device=device)
    return _BASE_MODELS[key]


def train_pack(job: Job, model: dict, store_root: str, board=None, deepspeed: dict | None = None,
               auto_pack: bool = False, claim: bool = True, reporter=None) -> list[dict]:
    """The body of one Ray task: train a pack (resuming if it was checkpointed) and store its results.

    With ``auto_pack`` the job's concepts are trained in consecutive packs of the largest size that
    fits the worker's accelerator memory (measured by ``packing.fit_pack_size``). Concepts whose
    results are already in the store are returned as stored: a task retried after its worker died
    finishes what the first attempt did not. A pack trains its concepts together, so a plain pack
    with some results stored resumes as a whole from its checkpoint and stores only the missing ones;
    auto-packed sub-packs that were stored are skipped.

    With ``claim`` the pack's results are claimed in the store first: while another run trains them,
    this one waits and then returns that run's results (data-parallel workers are claimed for by
    the task that drives them). A failure carries the last lines of this worker's log. ``reporter``
    (``distributed.RayTrainReporter`` on Ray Train workers) hears of each checkpoint and of the end.
    """
    store = ResultStore(store_root)
    with _LogTail() as tail:
        try:
            with store.claim([t.key for t in job.tasks]) if claim else contextlib.nullcontext():
                return _train_missing(job, model, store, board, deepspeed, auto_pack, reporter)
        except Exception as exc:
            tail.attach(exc)
            raise


def _train_missing(job: Job, model: dict, store: ResultStore, board, deepspeed: dict | None,
                   auto_pack: bool, reporter=None) -> list[dict]:
    found = {t.key: store.lookup(t.key) for t in job.tasks}
    stored = {key: result.to_dict() for key, result in found.items() if result is not None}
    todo = [t for t in job.tasks if t.key not in stored]
    if stored:
        logger.info("pack %s: %d of %d concept(s) already in the store, %d to train", job.job_id[:8],
                    len(stored), len(job.tasks), len(todo))
    trained: dict[str, dict] = {}
    if todo:
        splits = auto_pack and deepspeed is None
        rest = job if len(todo) == len(job.tasks) or not splits else job.part(todo)
        for row in _train_parts(rest, _load_base(model), store, board, deepspeed, auto_pack, skip=set(stored),
                                reporter=reporter):
            trained[row["key"]] = row
    if stored and len(stored) + len(trained) == len(job.tasks):
        store.drop_checkpoint(job.job_id)  # the whole pack's, if the first attempt left one
    return [row for row in (stored.get(t.key) or trained.get(t.key) for t in job.tasks) if row]


def _train_parts(job: Job, pipe, store: ResultStore, board, deepspeed: dict | None,
                 auto_pack: bool, skip: set[str] = frozenset(), reporter=None) -> list[dict]:
    """Train ``job`` as one pack, or (``auto_pack``) as consecutive packs that fit the accelerator.

    The first pack size is measured (``packing.fit_pack_size``, GPU only; the whole job elsewhere); when a
    pack still runs out of memory, accelerate's ``find_executable_batch_size`` retries the concepts not yet
    trained in packs 10 % smaller (at least one concept fewer), keeping the packs already trained.
    """
    if not auto_pack or deepspeed is not None:
        return _train_pack(job, pipe, store, board, deepspeed, skip, reporter)
    from accelerate.utils import find_executable_batch_size

    from ..packing import fit_pack_size

    done: dict[str, dict] = {}

    @find_executable_batch_size(starting_batch_size=fit_pack_size(pipe, job.trainer, limit=len(job.tasks))
                                or len(job.tasks))
    def train_in_packs(size: int) -> None:
        rest = [t for t in job.tasks if t.key not in done]
        if size >= len(job.tasks):  # the whole job: its own checkpoint folder, and what an earlier attempt stored
            done.update((row["key"], row) for row in _train_pack(job, pipe, store, board, None, skip))
            return
        logger.info("pack %s: training its %d concept(s) in packs of %d", job.job_id[:8], len(rest), size)
        for i in range(0, len(rest), size):
            done.update((row["key"], row) for row in _train_pack(job.part(rest[i:i + size]), pipe, store, board, None))

    train_in_packs()
    return [done[t.key] for t in job.tasks if t.key in done]


def _train_pack(job: Job, pipe, store: ResultStore, board, deepspeed: dict | None,
                skip: set[str] = frozenset(), reporter=None) -> list[dict]:
    """Train ``job`` as one pack and store the results of its concepts, except those in ``skip``."""
    import ray

    from ..training import PackTrainer

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    labels = {t.concept.name: t.concept.name if not t.point else f"{t.concept.name}/{t.point_id}" for t in job.tasks}

    def report(step: int, rows: list[dict]) -> None:
        if board is not None:
            # data-parallel workers report the same averaged losses; rank 0's rows go to the tracker
            rows_out = [{**r, "label": labels[r["concept"]]} for r in rows] if trainer.worker_rank == 0 else []
            board.update.remote(job.job_id, step, job.trainer.iterations, sum(r["loss"] for r in rows) / len(rows),
                                rows_out)

    started, start = time.time(), time.perf_counter()
    def checkpointed(step: int, url: str) -> None:
        reporter.checkpoint(step, url, trainer.history)

    trainer = PackTrainer(pipe, job.concepts, job.trainer, checkpoint_dir=store.checkpoint_dir(job.job_id),
                          callback=report, progress=False, deepspeed=deepspeed,
                          on_checkpoint=checkpointed if reporter is not None else None)
    try:
        result = trainer.train()
        if reporter is not None:
            reporter.finished(result.steps, result.history)
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
        if task.key in skip:  # stored by an earlier attempt
            continue
        final = last.get(task.concept.name, {})
        membrane.extra["point"] = task.point_id
        row = ConceptResult(
            concept=task.concept.name, key=task.key, point=task.point, point_id=task.point_id, status="trained",
            loss=final.get("loss"), erase=final.get("erase"), anchor=final.get("anchor"), seconds=seconds,
            pack_concepts=len(job.tasks),
            started=started, finished=time.time(), job_id=job.job_id, resumed_from=result.resumed_from, node=node,
            history=[r for r in result.history if r["concept"] == task.concept.name],
        )
        rows.append(store.put(row, membrane).to_dict())
    store.drop_checkpoint(job.job_id)
    return rows


class _LogTail(logging.Handler):
    """The last lines this process logged while a pack trained: Ray workers log to files of their own,
    so a failure shown on the driver would otherwise hide them."""

    LINES = 20

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=self.LINES)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.extend(self.format(record).splitlines())

    def __enter__(self) -> "_LogTail":
        # this library's progress lines (INFO) are part of the story; other libraries log as configured
        ours = logging.getLogger("spm_train")
        self._level = ours.level
        if ours.getEffectiveLevel() > logging.INFO:
            ours.setLevel(logging.INFO)
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
        logging.getLogger("spm_train").setLevel(self._level)

    def attach(self, exc: BaseException) -> None:
        """Put the lines on the exception (``worker_log``); the driver shows them with the failure."""
        with contextlib.suppress(Exception):
            exc.worker_log = list(self.lines)


def worker_log(exc: BaseException | None) -> list[str]:
    """The worker's last log lines a failed pack's exception carries (empty when there are none)."""
    lines = getattr(exc, "worker_log", None) or getattr(getattr(exc, "cause", None), "worker_log", None)
    return list(lines or [])


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.jobs: dict[str, tuple[int, int, float]] = {}
            self.rows: list[dict] = []  # per-concept loss rows not yet taken by the driver

        def update(self, job_id: str, step: int, total: int, loss: float, rows: list | None = None) -> None:
            self.jobs[job_id] = (step, total, loss)
            self.rows += rows or []

        def snapshot(self) -> dict:
            return dict(self.jobs)

        def take_rows(self) -> list[dict]:
            rows, self.rows = self.rows, []
            return rows

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
             train_fn: Callable[..., list[dict]] | None = None,
             on_rows: Callable[[list[dict]], None] | None = None) -> list[ConceptResult]:
    """Submit every job, then gather results as they finish. Never raises for a failing concept.

    ``train_fn`` replaces the pack trainer (the orchestration benchmark uses a no-op). ``on_rows`` gets
    the packs' per-concept loss rows (with a ``label``: concept, or concept/sweep point) while they train.
    """
    import ray
    from ray.exceptions import RayTaskError

    check_resources(options)
    board = _progress_board()
    if options.workers_per_job > 1:
        from .distributed import train_pack_data_parallel

        # the task only drives a Ray Train worker group, which holds the resources
        remote = ray.remote(train_pack_data_parallel)
        resources = dict(num_cpus=0, num_gpus=0)
        # Ray Train restarts a worker group that lost a worker, as Ray retries a single-process task
        extra = (options.workers_per_job, options.cpus_per_job, options.gpus_per_job, options.deepspeed,
                 options.max_retries)
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
                if on_rows is not None:
                    on_rows(ray.get(board.take_rows.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - progress is best effort
                logger.debug("progress board unavailable", exc_info=True)
            for ref in done:
                job = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    if len(job.tasks) > 1:
                        logger.warning("pack %s failed (%s); retrying its %d concepts one by one%s",
                                       job.job_id[:8], first_line(cause), len(job.tasks), _log_text(cause))
                        for single in job.split():
                            bars.add(single)
                            pending[submit(single)] = single
                        continue
                    results += _failed(job, cause)
                except Exception as exc:  # noqa: BLE001 - worker or node lost beyond its retries
                    results += _failed(job, exc)
                else:
                    results += [ConceptResult(**row) for row in rows]
        if on_rows is not None:  # what the last packs reported after the final poll
            try:
                on_rows(ray.get(board.take_rows.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - progress is best effort
                logger.debug("progress board unavailable", exc_info=True)
    return results


def _log_text(exc: BaseException) -> str:
    lines = worker_log(exc)
    return "; the worker's last log lines:\n  " + "\n  ".join(lines) if lines else ""


def _failed(job: Job, exc: BaseException) -> list[ConceptResult]:
    message = f"{type(exc).__name__}: {first_line(exc)}"
    logger.error("job %s (%s) failed: %s%s", job.job_id[:8], ", ".join(job.names), message, _log_text(exc))
    return [ConceptResult(concept=t.concept.name, key=t.key, point=t.point, point_id=t.point_id, status="failed",
                          job_id=job.job_id, error=message) for t in job.tasks]
