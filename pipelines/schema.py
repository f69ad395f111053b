"""Typed schema of the Hydra config tree in ``conf/``: a wrong key or type fails at composition.

The trainer and concept nodes reuse the library's own dataclasses, so the YAML and the Python API
accept exactly the same fields.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from spm_train.config import ConceptSpec, TrainerConfig


@dataclass
class ModelConfig:
    # "toyworld", "toyworld:variant", "random:sd1|sd2|sdxl", a local diffusers folder, or a hub id
    source: str = "toyworld"
    dtype: str = "float32"
    # when set, the loaded model must be of this family (sd1, sd2, sdxl)
    family: Optional[str] = None
    # for model cards: the base's Hub id (its `base_model`) and license (membranes derive from the base)
    hub_id: Optional[str] = None
    license: Optional[str] = None


@dataclass
class ConceptSetConfig:
    name: str = MISSING
    description: str = ""
    concepts: List[ConceptSpec] = MISSING


@dataclass
class ClusterConfig:
    # null: start a local Ray instance in-process; "auto", "host:6379" or "ray://host:10001" to join one
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    # > 1: each pack runs data-parallel on this many Ray Train workers, each with the resources above
    workers_per_job: int = 1
    # a DeepSpeed config file (conf/deepspeed/zero2.json, zero3.json) to train packs under ZeRO
    deepspeed: Optional[str] = None
    # concepts per pack; 0: as many as fit the worker's GPU (measured there), at most max_pack_size
    pack_size: int = 4
    max_pack_size: int = 32
    max_retries: int = 3
    connect_timeout_s: float = 10.0
    runtime_env: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    backend: str = "wandb"  # wandb | disabled
    mode: str = "offline"  # offline | online
    project: str = "spm-membranes"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # W&B writes its runs to <dir>/wandb/ (offline: `wandb sync <dir>/wandb/offline-run-*`)
    dir: str = "${paths.root}"
    # W&B's system metrics (CPU, memory, GPU) of the machine the job runs on, sampled while it runs
    system_stats: bool = True
    # online only: link every logged membrane artifact into this registry collection
    # (e.g. "wandb-registry-model/membranes")
    registry_collection: Optional[str] = None


@dataclass
class RegistryConfig:
    enabled: bool = True
    uri: str = "${paths.root}/registry"
    blobs: str = "${paths.root}/registry/blobs"
    # validation gates, overridable per concept set
    min_erasure: float = 0.9
    max_preservation_drop: float = 0.05
    min_target_drop: float = 0.1
    # per-concept gate overrides: {concept name: {min_erasure: .., max_preservation_drop: .., min_target_drop: ..}}
    gates: Dict[str, Dict[str, float]] = field(default_factory=dict)
    # behavioural check: "package.module:function" with evaluate(pipe, membrane, concept_spec) -> metrics;
    # null records the behaviour as "not evaluated"
    evaluator: Optional[str] = None
    # keyword arguments for the evaluator, e.g. {samples_per_prompt: 4, steps: 10}
    evaluator_options: Dict[str, Any] = field(default_factory=dict)
    # alias set on each newly registered version that did not fail validation (null: none)
    candidate_alias: Optional[str] = "candidate"
    # "all": every sweep point's membrane is registered; "best": per concept only the best candidate
    # (passed first, then the largest target drop minus preservation drop)
    select: str = "all"
    # other models of the base's family the membranes are also validated on (transfer), each a model
    # source as in conf/model (toyworld:variant, a local diffusers folder); the gates must hold on each
    transfer_models: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    enabled: bool = False
    kind: str = "toyworld"  # toyworld | clip | none
    # a local CLIP model folder (transformers CLIPModel), for kind=clip
    clip_path: Optional[str] = None
    samples_per_prompt: int = 8
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 64
    # facilitated transport's similarity: "token" (per-token, calibrated per membrane), "content" (pooled
    # content tokens) or "paper" (flattened cosine, overlap of every token)
    similarity: str = "token"
    threshold: float = 0.85
    # erasure counted on probes the base draws the concept in at least this often
    draw_threshold: float = 0.5
    # images per prompt shown in the report's grids (each with the scorer's verdict)
    grid_samples: int = 4
    # also train each concept without latent anchoring, for the paper's ablation
    ablation: bool = False


@dataclass
class PathsConfig:
    root: str = "${oc.env:SPM_HOME,runs}"
    store: str = "${paths.root}/store"
    # Optional: `--cfg job --resolve` prints the config outside a run, where Hydra has no output dir
    run_dir: Optional[str] = "${hydra:runtime.output_dir}"


@dataclass
class BulkTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: ConceptSetConfig = field(default_factory=ConceptSetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # trainer field -> values; the cartesian product runs concurrently as one bulk run
    sweep: Dict[str, List[Any]] = field(default_factory=dict)
    progress: bool = True
    # what the app returns for sweepers (spm_train/bulk/objective.py): erasure_minus_drop, erasure,
    # target_drop, preservation_drop (evaluated runs) or loss
    objective: str = "erasure_minus_drop"


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="bulk_train_schema", node=BulkTrainConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="concepts", name="schema", node=ConceptSetConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="cluster", name="schema", node=ClusterConfig)
    cs.store(group="tracking", name="schema", node=TrackingConfig)
    cs.store(group="registry", name="schema", node=RegistryConfig)
    cs.store(group="eval", name="schema", node=EvalConfig)


def check_home(argv: List[str] | None = None) -> None:
    """Exit with one line (status 2) when the folder runs go to cannot be written.

    Hydra makes its run folder under ``paths.root`` (``$SPM_HOME``) before any check of ours runs, and
    fails there with a traceback; this runs first.
    """
    from spm_train.io import folder_problem

    args = sys.argv[1:] if argv is None else argv
    overrides = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("paths.root=")]
    if overrides:
        name, folder = "paths.root", overrides[-1]
    elif os.environ.get("SPM_HOME"):
        name, folder = "SPM_HOME", os.environ["SPM_HOME"]
    else:
        name, folder = "paths.root", "runs"
    if "://" in folder or "${" in folder:
        return  # the pipeline's own checks name these
    problem = folder_problem(folder)
    if problem:
        print(f"error: {name}={folder}: {problem}; runs write their folders there", file=sys.stderr)
        sys.exit(2)
