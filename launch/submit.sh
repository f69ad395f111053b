#!/usr/bin/env bash
# Submit the bulk job to a running Ray cluster, shipping this checkout as the job's working dir.
#
#   RAY_ADDRESS=http://head:8265 launch/submit.sh concepts=characters model=sd14 trainer=paper eval=none
#
# Every argument is a Hydra override for `python -m pipelines.bulk_train`. The result store and the
# run folders go to SPM_HOME, a folder shared by all nodes (NFS/EFS/Lustre); to keep results and
# membranes in object storage add paths.store=s3://... registry.blobs=s3://... (any fsspec URL).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://head:8265}"
: "${SPM_HOME:=/shared/spm}"
: "${SPM_MODELS:=/shared/models}"
env_vars=$(printf '"SPM_HOME": "%s", "SPM_MODELS": "%s", "HF_HUB_OFFLINE": "%s", "WANDB_MODE": "%s"' \
  "$SPM_HOME" "$SPM_MODELS" "${HF_HUB_OFFLINE:-1}" "${WANDB_MODE:-offline}")
runtime_env="{\"env_vars\": {${env_vars}}, \"excludes\": [\".venv\", \"runs\", \"outputs\", \"multirun\", \"wandb\", \".git\"]}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" -- \
  python -m pipelines.bulk_train cluster=existing "paths.root=${SPM_HOME}" "$@"
