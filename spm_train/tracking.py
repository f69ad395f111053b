"""Experiment tracking for bulk runs: W&B (offline by default) or nothing.

    with open_tracker({"backend": "wandb", "mode": "offline"}, root="runs", config=run_config) as tracker:
        tracker.log_history("snoopy", result.history)
        tracker.log_membrane(version, blob_path)

``open_tracker`` always finishes the run, with a non-zero exit code when the block raised, so no run
is left "running". ``backend: disabled`` gives a :class:`NullTracker` whose methods do nothing.
Offline runs are written under ``<root>/wandb``; ``wandb sync <run dir>`` uploads them later.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "erase", "anchor", "tail", "lr")


class NullTracker:
    """Tracking turned off: same interface, no effect."""

    enabled = False
    run_id: str | None = None
    run_dir: str | None = None

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_history(self, concept: str, history: Sequence[Mapping[str, Any]], prefix: str = "") -> int:
        return 0

    def stream(self, rows: Sequence[Mapping[str, Any]]) -> None:
        pass

    def log_images(self, name: str, images: Sequence[tuple[str, str]]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], prefix: str = "") -> None:
        pass

    def log_membrane(self, version, path: str) -> None:
        pass

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass


class WandbTracker(NullTracker):
    """One W&B run. Loss curves go to ``train/<concept>/<key>`` against ``train/<concept>/step``."""

    enabled = True

    def __init__(self, run, registry_collection: str | None = None):
        self.run = run
        self.streamed: set[str] = set()  # curves logged live while training: not logged again at the end
        self._defined: set[tuple[str, str]] = set()
        self.run_id = run.id
        self.run_dir = os.path.dirname(run.dir)  # .../wandb/offline-run-<time>-<id>
        self.registry_collection = registry_collection
        self.offline = bool(getattr(run.settings, "_offline", False)) or run.settings.mode == "offline"

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_history(self, concept: str, history: Sequence[Mapping[str, Any]], prefix: str = "train") -> int:
        """A finished concept's loss curve; skipped when it was streamed while it trained."""
        if concept in self.streamed:
            return 0
        n = 0
        for row in history:
            n += self._log_row(concept, row, prefix, n)
        return n

    def stream(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log training rows as packs report them (``label``: the concept, with its sweep point if any)."""
        for row in rows:
            label = row["label"]
            self._log_row(label, row, "train", 0)
            self.streamed.add(label)

    def _log_row(self, concept: str, row: Mapping[str, Any], prefix: str, n: int) -> int:
        # one panel section per concept, each against its own step: packs run side by side at their own pace
        step_key = f"{prefix}/{concept}/step"
        if (prefix, concept) not in self._defined:
            self.run.define_metric(step_key, hidden=True)
            self.run.define_metric(f"{prefix}/{concept}/*", step_metric=step_key)
            self._defined.add((prefix, concept))
        values = {f"{prefix}/{concept}/{k}": float(row[k]) for k in LOSS_KEYS
                  if isinstance(row.get(k), (int, float)) and math.isfinite(float(row[k]))}
        if not values:
            return 0
        values[step_key] = int(row.get("step", n))
        self.run.log(values)
        return 1

    def log_images(self, name: str, images: Sequence[tuple[str, str]]) -> None:
        """PNG files as ``wandb.Image``s under ``name``: (caption, path) each."""
        import wandb

        self.run.log({name: [wandb.Image(path, caption=caption) for caption, path in images]})

    def log_metrics(self, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Final numbers go to the run summary (one value each), not to the step history."""
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, (int, float)):
                self.run.summary[name] = value

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_membrane(self, version, path: str) -> None:
        """A W&B Artifact of type ``membrane`` per registry version, with its metadata and aliases.

        The blob is referenced (``policy="immutable"``: registry blobs never change), not copied.
        """
        import wandb

        artifact = wandb.Artifact(
            name=membrane_artifact_name(version.concept), type="membrane",
            description=f"SPM membrane erasing {version.concept} (registry {version.ref})",
            metadata={"registry_ref": version.ref, "concept": version.concept, "version": version.version,
                      "sha256": version.sha256, "status": version.status, "metrics": version.metrics,
                      "lineage": version.lineage, "header": version.metadata},
        )
        artifact.add_file(path, name="membrane.safetensors", policy="immutable")
        aliases = sorted({f"registry-v{version.version}", *version.aliases})
        logged = self.run.log_artifact(artifact, aliases=aliases)
        if self.registry_collection and not self.offline:
            try:
                self.run.link_artifact(logged, self.registry_collection, aliases=list(version.aliases))
            except Exception as exc:  # linking is a convenience; the artifact itself is logged
                logger.warning("could not link %s to %s: %s", version.ref, self.registry_collection, exc)


def membrane_artifact_name(concept: str) -> str:
    """The W&B artifact collection of a concept's membranes."""
    return f"membrane-{_artifact_safe(concept)}"


ALIAS_ACTIONS = ("promote", "unalias")


def mirror_alias(change: Mapping[str, Any], *, mode: str, project: str, entity: str | None = None,
                 directory: str = ".") -> str:
    """Carry a registry alias change to the W&B artifact of the version; returns a line saying what was done.

    ``change``: ``action`` (``promote``: the alias now names this version; ``unalias``: it was taken off),
    ``concept``, ``alias``, ``version`` (the registry's number) and any detail worth recording.

    ``online``: the artifact's aliases are edited through W&B's public API and saved. A promotion adds the
    alias to the version's artifact (found by its ``registry-v<N>`` alias) and W&B moves it off any other
    version of the collection, as the registry does; ``unalias`` takes it off the artifact that holds it.
    ``offline``: without its server W&B cannot edit an artifact, and logging the artifact again would move
    W&B's own ``latest`` to it, so the change is recorded in a small offline run (job type ``registry``;
    config and summary hold the change) in ``directory``; ``wandb sync`` uploads it, and
    ``python -m pipelines.registry wandb-aliases`` later sets every artifact's aliases from the registry.
    """
    action, concept, alias, number = change["action"], change["concept"], change["alias"], int(change["version"])
    if action not in ALIAS_ACTIONS:
        raise ValueError(f"unknown alias action {action!r}; supported: {', '.join(ALIAS_ACTIONS)}")
    collection = membrane_artifact_name(concept)
    if mode == "online":
        import wandb

        api = wandb.Api(timeout=30)
        prefix = f"{entity}/{project}" if entity else project
        if action == "promote":
            artifact = api.artifact(f"{prefix}/{collection}:registry-v{number}", type="membrane")
            if alias not in artifact.aliases:
                artifact.aliases.append(alias)
                artifact.save()
        else:
            artifact = api.artifact(f"{prefix}/{collection}:{alias}", type="membrane")
            artifact.aliases = [a for a in artifact.aliases if a != alias]
            artifact.save()
        return f"W&B: {prefix}/{collection}:registry-v{number} {'now has' if action == 'promote' else 'lost'} {alias}"
    if mode != "offline":
        raise ValueError(f"unknown W&B mode {mode!r}; supported: offline, online")
    record = {"registry_change": {**change, "artifact": f"{collection}:registry-v{number}"}}
    with open_tracker({"backend": "wandb", "mode": "offline", "project": project, "entity": entity,
                       "dir": directory, "system_stats": False}, root=directory, config=record,
                      name=f"{action} {concept}@{alias}", job_type="registry") as tracker:
        tracker.run.summary.update(record)
        run_dir = tracker.run_dir
    return f"W&B: {action} {concept}@{alias} recorded offline in {run_dir} (`wandb sync {run_dir}`)"


def sync_aliases(versions: Sequence, *, project: str, entity: str | None = None) -> list[str]:
    """Online: give the W&B artifact of every registry version in ``versions`` the registry's aliases.

    The registry is the source of truth: each artifact (found by its ``registry-v<N>`` alias) ends with
    that alias and the version's registry aliases; an alias the registry no longer gives it is taken off,
    and W&B's own ``latest`` is left where W&B put it. Returns one line per artifact changed or missing.
    """
    import wandb

    api = wandb.Api(timeout=30)
    prefix = f"{entity}/{project}" if entity else project
    lines = []
    for version in versions:
        name = f"{prefix}/{membrane_artifact_name(version.concept)}:registry-v{version.version}"
        try:
            artifact = api.artifact(name, type="membrane")
        except (ValueError, wandb.errors.CommError) as exc:  # not found: ValueError; the server: CommError
            lines.append(f"{version.ref}: no W&B artifact {name} ({exc})")
            continue
        wanted = {f"registry-v{version.version}", *version.aliases} - {"latest"}
        wanted |= {"latest"} & set(artifact.aliases)
        if set(artifact.aliases) != wanted:
            artifact.aliases = sorted(wanted)
            artifact.save()
            lines.append(f"{version.ref}: {name} aliases now {', '.join(sorted(wanted))}")
    return lines


def _artifact_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def check_tracking(tracking: Mapping[str, Any]) -> list[str]:
    """Every problem of a tracking section, found before a run starts rather than when it logs."""
    backend = tracking.get("backend", "disabled")
    if backend in ("disabled", "none", None):
        return []
    if backend != "wandb":
        return [f"tracking.backend={backend}: wandb or disabled"]
    mode = tracking.get("mode", "offline")
    if mode not in ("offline", "online"):
        return [f"tracking.mode={mode}: offline or online"]
    if mode == "online" and os.environ.get("WANDB_MODE", "").lower() not in ("disabled", "offline") \
            and not _wandb_key_known():
        return ["tracking=online needs a W&B API key (WANDB_API_KEY, or `wandb login`); tracking=offline logs "
                "locally and `wandb sync` uploads later"]
    return []


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return base in hosts


@contextlib.contextmanager
def _wandb_home(directory: str, names: Mapping[str, str]) -> Iterator[None]:
    """W&B's own folders (artifact staging, caches, core logs) under ``<directory>/wandb-home`` instead of
    the user's home folder, for the block; variables the user set are left alone."""
    saved = {name: os.environ.get(name) for name in names}
    for name, sub in names.items():
        if saved[name] is None:
            os.environ[name] = os.path.join(directory, "wandb-home", sub)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


@contextlib.contextmanager
def open_tracker(tracking: Mapping[str, Any], *, root: str, config: Mapping[str, Any] | None = None,
                 name: str | None = None, job_type: str = "bulk_train") -> Iterator[NullTracker]:
    """A tracker for ``tracking`` (the ``TrackingConfig`` as a dict); the run always finishes."""
    backend = tracking.get("backend", "disabled")
    if backend == "wandb" and os.environ.get("WANDB_MODE", "").lower() == "disabled":
        logger.info("WANDB_MODE=disabled: tracking off for this run")
        backend = "disabled"
    if backend in ("disabled", "none", None):
        yield NullTracker()
        return
    if backend != "wandb":
        raise ValueError(f"unknown tracking backend {backend!r}; supported: wandb, disabled")
    mode = tracking.get("mode", "offline")
    if mode not in ("offline", "online"):
        raise ValueError(f"unknown W&B mode {mode!r}; supported: offline, online")
    import wandb

    directory = os.path.abspath(str(tracking.get("dir") or root))
    os.makedirs(directory, exist_ok=True)
    with _wandb_home(directory, {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}):
        # wandb-core writes its debug logs to the user cache folder of the moment it starts
        with _wandb_home(directory, {"XDG_CACHE_HOME": "cache"}):
            run = wandb.init(project=tracking.get("project", "spm-membranes"), entity=tracking.get("entity"),
                             tags=list(tracking.get("tags") or []), config=dict(config or {}), name=name,
                             job_type=job_type, dir=directory, mode=mode, reinit="create_new",
                             settings=wandb.Settings(silent=True, console="off",
                                                                     x_disable_stats=not tracking.get("system_stats", True)))
        tracker = WandbTracker(run, tracking.get("registry_collection"))
        logger.info("W&B run %s (%s) writing to %s", run.id, mode, tracker.run_dir)
        try:
            yield tracker
        except BaseException:
            run.finish(exit_code=1)
            raise
        else:
            run.finish()
    if mode == "offline":
        logger.info("offline W&B run in %s; upload it with `wandb sync %s`", tracker.run_dir, tracker.run_dir)
