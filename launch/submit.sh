#!/usr/bin/env bash
# Submit the bulk job to a running Ray cluster, shipping this checkout as the job's working dir.
#
#   RAY_ADDRESS=http://head:8265 launch/submit.sh concepts=characters model=sd14 trainer=paper eval=none
#
# Every argument is a Hydra override for `python -m pipelines.bulk_train`. The result store and the
# run folders go to SPM_HOME, a folder shared by all nodes (NFS/EFS/Lustre); to keep results and
# membranes in object storage add paths.store=s3://... registry.blobs=s3://... (any fsspec URL).
#
# The job's driver loads the base model, validates the membranes and evaluates them: it reserves
# SPM_DRIVER_CPUS CPUs (default 4), so Ray places it on a worker node with room for that work, never on
# the head (which offers Ray no CPUs in launch/cluster.yaml and launch/kuberay.yaml). A cluster without a
# node that has that many free CPUs keeps the job pending: SPM_DRIVER_CPUS=0 runs the driver on the head.
# `ray job submit` leaves .git behind, so the code version travels as SPM_CODE_VERSION (this checkout's
# `git describe`, full hash, -dirty with uncommitted changes), which the run's manifest and the registry's
# lineage record.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://head:8265}"
: "${SPM_HOME:=/shared/spm}"
: "${SPM_MODELS:=/shared/models}"
: "${SPM_DRIVER_CPUS:=4}"
code_version=${SPM_CODE_VERSION:-}
if [ -z "$code_version" ] && described=$(git describe --always --dirty --tags --abbrev=40 2>/dev/null); then
  code_version="git:$described"
fi
# JSON written by Python: paths and versions may hold characters a shell-built string would not escape
runtime_env=$(SPM_CODE_VERSION="$code_version" SPM_HOME="$SPM_HOME" SPM_MODELS="$SPM_MODELS" \
  HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" "${PYTHON:-python3}" -c '
import json, os
names = ["SPM_HOME", "SPM_MODELS", "HF_HUB_OFFLINE", "WANDB_MODE", "SPM_CODE_VERSION"]
env = {name: os.environ[name] for name in names if os.environ.get(name)}
excludes = [".git", ".venv", "runs", "outputs", "multirun", "wandb", "__pycache__", ".pytest_cache", "*.egg-info"]
print(json.dumps({"env_vars": env, "excludes": excludes}))')
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  --entrypoint-num-cpus "$SPM_DRIVER_CPUS" -- \
  python -m pipelines.bulk_train cluster=existing "paths.root=${SPM_HOME}" "$@"
