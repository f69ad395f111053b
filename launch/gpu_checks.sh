#!/usr/bin/env bash
# GPU checks for a node with one CUDA device, in one go:
#   sd15      the throughput benchmark on the SD 1.5 architecture at 512 px (paper loop vs packs, same
#             process), with one profiled iteration per pack (profile_packed_K<k>.txt);
#   variants  the largest pack again in separate processes, one speed knob each, each against the paper
#             loop in its own process: channels_last (the UNet in channels-last memory format), bf16_base
#             (the packs on a bf16 copy of the UNet without autocast, the paper loop on fp32), compile
#             (torch.compile of the UNet);
#   tests     the GPU test subset (tests/test_gpu.py: pack = separate runs on CUDA, no host syncs in an
#             iteration, bf16 losses, fitted pack size, transport on CUDA, ToyWorld erasure on the bf16
#             fast path);
#   toyworld  the ToyWorld benchmark;
#   build     (BUILD_MINUTES > 0) a ToyWorld build on the GPU, packed as tarballs, in what is left of
#             TOTAL_SECONDS when set.
#
#   bash launch/gpu_checks.sh [OUT_DIR]            # default runs/gpu_checks
#   STAGES="sd15 variants" VARIANTS="channels_last compile" bash launch/gpu_checks.sh /tmp/out
#
# On an H100 the stages take about: sd15 4 min (model set-up, paper loop, K = 1, 8, 32 each with one
# flop-counted and one profiled iteration), channels_last and bf16_base 2 min each, compile up to 5,
# tests up to 5 (one compiles the tiny UNet with Inductor), toyworld 1. Where one command may run
# 10 minutes, split them: STAGES=sd15, then STAGES=variants VARIANTS="channels_last bf16_base", then
# STAGES=variants VARIANTS=compile, then STAGES="tests toyworld".
#
# The node's Python needs torch with CUDA plus this project's requirements. On a node without internet,
# build wheels where there is one and install them there without an index, e.g.
#   pip wheel --no-deps -w .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 \
#     antlr4-python3-runtime==4.9.3 importlib_metadata          # here
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site  # there
#
# Each stage has its own time limit and a failing stage does not stop the next; the exit status is the
# number of failed stages. Writes checks.log, benchmark_sd15.json (+ profiles), benchmark_sd15_<variant>.json,
# benchmark_toyworld.json and, with a build, build.log, quality.json, toyworld_base.tar and
# toyworld_variant.tar into OUT_DIR.
set -uo pipefail

out=$(mkdir -p "${1:-runs/gpu_checks}" && cd "${1:-runs/gpu_checks}" && pwd)
python=${PYTHON:-python3}
scratch=${SCRATCH:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
log="$out/checks.log"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
$python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
  | tee -a "$log"

stages=" ${STAGES:-sd15 variants tests toyworld build} "
for name in $stages; do
  case $name in
    sd15|variants|tests|toyworld|build) ;;
    *) echo "unknown stage $name (stages: sd15 variants tests toyworld build)" | tee -a "$log"; exit 64 ;;
  esac
done
big=${BIG_PACK:-32}
sd15=(model.source=arch:sd15 trainer.resolution=512 iterations=3 warmup=1 micro_batch=32 flop_iterations=1)

if [[ $stages == *" sd15 "* ]]; then
  stage "benchmark: SD 1.5 architecture, 512 px" "${BENCH_SECONDS:-330}" \
    $python -m pipelines.benchmark "${sd15[@]}" "packs=${PACKS:-[1,8,$big]}" baseline_iterations=6 profile=true \
    out="$out/benchmark_sd15.json" hydra.run.dir="$scratch/hydra_sd15"
fi

if [[ $stages == *" variants "* ]]; then
  for variant in ${VARIANTS:-channels_last bf16_base compile}; do
    case $variant in
      channels_last) knobs=(trainer.channels_last=true) limit=${VARIANT_SECONDS:-150} ;;
      bf16_base) knobs=(fast_base_dtype=bfloat16 fast_precision=fp32) limit=${VARIANT_SECONDS:-150} ;;
      compile) knobs=(trainer.compile=true warmup=3) limit=${COMPILE_SECONDS:-300} ;;
      *) echo "unknown variant $variant" | tee -a "$log"; failed=$((failed + 1)); continue ;;
    esac
    stage "benchmark: SD 1.5, K = $big, $variant" "$limit" \
      $python -m pipelines.benchmark "${sd15[@]}" "packs=[$big]" baseline_iterations=6 flops=false "${knobs[@]}" \
      out="$out/benchmark_sd15_$variant.json" hydra.run.dir="$scratch/hydra_sd15_$variant"
  done
fi

if [[ $stages == *" tests "* ]]; then
  stage "GPU tests" "${TEST_SECONDS:-300}" \
    $python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi

if [[ $stages == *" toyworld "* ]]; then
  stage "benchmark: ToyWorld" "${TOY_SECONDS:-60}" \
    $python -m pipelines.benchmark packs=[1,8,32] iterations=5 baseline_iterations=10 \
    out="$out/benchmark_toyworld.json" hydra.run.dir="$scratch/hydra_toyworld"
fi

# The build gets what is left of TOTAL_SECONDS (if set): about 150 s of it go to rendering, the VAE and
# the quality measurements, the rest (up to BUILD_MINUTES) to the UNet.
left=$(( ${TOTAL_SECONDS:-100000} - SECONDS ))
unet_minutes=$($python -c "print(round(min(float('${BUILD_MINUTES:-0}'), ($left - 150) / 60), 2))")
if [[ $stages == *" build "* ]] && $python -c "import sys; sys.exit(not float('$unet_minutes') >= 1)"; then
  assets="$scratch/toyworld_assets"
  mkdir -p "$assets" && cp -r spm_train/toyworld/assets/classifier "$assets/"  # the shipped classifier scores it
  stage "ToyWorld build on the GPU" "$left" \
    $python -m spm_train.toyworld.build --device cuda --out "$assets" --work-dir "$scratch/toyworld_work" \
    --unet-minutes "$unet_minutes" --steps 40000 --batch "${BUILD_BATCH:-512}" --lr "${BUILD_LR:-8e-4}"
  grep -v "it/s\]" "$log" | sed -n '/=== ToyWorld build/,$p' > "$out/build.log"
  [ -f "$assets/quality.json" ] && cp "$assets/quality.json" "$out/"
  [ -d "$assets/base" ] && tar -C "$assets" -cf "$out/toyworld_base.tar" base
  [ -d "$assets/variant" ] && tar -C "$assets" -cf "$out/toyworld_variant.tar" variant
fi

echo "=== done: $failed failed stage(s)" | tee -a "$log"
exit "$failed"
