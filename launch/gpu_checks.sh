#!/usr/bin/env bash
# GPU checks for a node with one CUDA device, in one go. Stages, in the order STAGES lists them:
#   sd15      the quick GPU benchmark (conf/preset/gpu.yaml): SD 1.5 architecture at 512 px, the paper loop
#             in fp32 and in bf16 autocast, packs in bf16 at K = 1, 8 and BIG_PACK, every row on the same 32
#             trajectory lengths, FLOPs over one iteration per row, one profiled iteration per pack
#             (profile_packed_K<k>.txt); the headline states packing's and precision's gains apart;
#   fit       K up to the memory limit: BIG_PACK again and the pack size fitted to free GPU memory (at most
#             FIT_LIMIT), the fitted one profiled; no paper loop (it trains on the sd15 stage's lengths:
#             same seed, same settings, so its rows compare with the sd15 stage's);
#   variants  BIG_PACK once per speed knob, each in its own process on the same lengths, to compare with the
#             sd15 stage's K = BIG_PACK row: channels_last (the UNet in channels-last memory format),
#             bf16_base (the packs on a bf16 copy of the UNet without autocast), compile (torch.compile);
#   tests     the GPU test subset (tests/test_gpu.py: pack = separate runs on CUDA, no host syncs in an
#             iteration, bf16 losses, fitted pack size, transport on CUDA, ToyWorld erasure on the bf16
#             fast path, the speed knobs reaching the plain pack's weights);
#   toyworld  the default benchmark (ToyWorld) on the GPU;
#   build     (BUILD_MINUTES > 0) a ToyWorld build on the GPU, packed as tarballs.
#
#   bash launch/gpu_checks.sh [OUT_DIR]            # default runs/gpu_checks, every stage but build
#   TOTAL_SECONDS=570 bash launch/gpu_checks.sh /tmp/out     # under a 10-minute limit for the whole call
#   STAGES="sd15 variants" VARIANTS="channels_last compile" bash launch/gpu_checks.sh /tmp/out
#
# Time (estimated from the H100 figures measured before paired draws, docs/benchmark.md; not yet run in
# this form): sd15 about 4-5 min (set-up 0.5, the two paper-loop rows about 2, packs 1.5, FLOP counts and
# profiles 1), fit 2-3, channels_last and bf16_base 1 each, compile up to 5, tests up to 5, toyworld 1.
# With TOTAL_SECONDS set, every stage's limit is cut to what is left and a stage with under a minute left
# is skipped (named in the log), so the stages go in priority order: sd15 (the headline) first. Within a
# session's 15 minutes of device time, two calls cover the priorities:
#   TOTAL_SECONDS=570 STAGES="sd15 fit" bash launch/gpu_checks.sh OUT
#   TOTAL_SECONDS=570 STAGES="variants tests" VARIANTS="channels_last bf16_base" bash launch/gpu_checks.sh OUT
# (compile and toyworld in a third call when there is time).
#
# The node's Python needs torch with CUDA plus this project's requirements. On a node without internet,
# build wheels where there is one and install them there without an index, e.g.
#   pip wheel --no-deps -w .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 \
#     antlr4-python3-runtime==4.9.3 importlib_metadata          # here
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site  # there
#
# A failing stage does not stop the next; the exit status is the number of failed stages (skipped ones do
# not count). Writes checks.log (ending with every stage's rows and headline), benchmark_sd15.json
# (+ profiles), fit/benchmark_sd15_fit.json (+ profiles), benchmark_sd15_<variant>.json,
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
total=${TOTAL_SECONDS:-0}  # 0: no overall limit

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$total" -gt 0 ]; then
    local left=$((total - SECONDS - 10))
    if [ "$left" -lt 60 ]; then
      echo "=== $name: skipped, ${left}s left of TOTAL_SECONDS=$total" | tee -a "$log"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
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

stages=${STAGES:-sd15 fit variants tests toyworld}
for name in $stages; do
  case $name in
    sd15|fit|variants|tests|toyworld|build) ;;
    *) echo "unknown stage $name (stages: sd15 fit variants tests toyworld build)" | tee -a "$log"; exit 64 ;;
  esac
done
big=${BIG_PACK:-32}
bench=($python -m pipelines.benchmark preset=gpu)

for name in $stages; do
  case $name in
    sd15)
      stage "benchmark: SD 1.5 architecture, 512 px, paired draws" "${BENCH_SECONDS:-420}" \
        "${bench[@]}" "packs=${PACKS:-[1,8,$big]}" profile=true \
        out="$out/benchmark_sd15.json" hydra.run.dir="$scratch/hydra_sd15" ;;
    fit)
      stage "benchmark: SD 1.5, K = $big and the largest K that fits" "${FIT_SECONDS:-240}" \
        "${bench[@]}" "packs=[$big]" fit_pack=true "fit_pack_limit=${FIT_LIMIT:-128}" "baseline_precisions=[]" \
        flops=false profile=true out="$out/fit/benchmark_sd15_fit.json" hydra.run.dir="$scratch/hydra_fit" ;;
    variants)
      for variant in ${VARIANTS:-channels_last bf16_base compile}; do
        case $variant in
          channels_last) knobs=(trainer.channels_last=true) limit=${VARIANT_SECONDS:-150} ;;
          bf16_base) knobs=(fast_base_dtype=bfloat16 fast_precision=fp32) limit=${VARIANT_SECONDS:-150} ;;
          compile) knobs=(trainer.compile=true warmup=3) limit=${COMPILE_SECONDS:-300} ;;
          *) echo "unknown variant $variant" | tee -a "$log"; failed=$((failed + 1)); continue ;;
        esac
        stage "benchmark: SD 1.5, K = $big, $variant" "$limit" \
          "${bench[@]}" "packs=[$big]" "baseline_precisions=[]" flops=false "${knobs[@]}" \
          out="$out/benchmark_sd15_$variant.json" hydra.run.dir="$scratch/hydra_sd15_$variant"
      done ;;
    tests)
      stage "GPU tests" "${TEST_SECONDS:-300}" $python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ;;
    toyworld)
      stage "benchmark: ToyWorld" "${TOY_SECONDS:-90}" \
        $python -m pipelines.benchmark packs=[1,8,32] concept_iterations=32 out="$out/benchmark_toyworld.json" \
        hydra.run.dir="$scratch/hydra_toyworld" ;;
    build)
      # what is left of TOTAL_SECONDS (if set): about 150 s go to rendering, the VAE and the quality
      # measurements, the rest (up to BUILD_MINUTES) to the UNet
      left=$(( ${TOTAL_SECONDS:-100000} - SECONDS ))
      unet_minutes=$($python -c "print(round(min(float('${BUILD_MINUTES:-0}'), ($left - 150) / 60), 2))")
      if $python -c "import sys; sys.exit(not float('$unet_minutes') >= 1)"; then
        assets="$scratch/toyworld_assets"
        mkdir -p "$assets" && cp -r spm_train/toyworld/assets/classifier "$assets/"  # the shipped classifier scores it
        stage "ToyWorld build on the GPU" "$left" \
          $python -m spm_train.toyworld.build --device cuda --out "$assets" --work-dir "$scratch/toyworld_work" \
          --unet-minutes "$unet_minutes" --steps 40000 --batch "${BUILD_BATCH:-512}" --lr "${BUILD_LR:-8e-4}"
        grep -v "it/s\]" "$log" | sed -n '/=== ToyWorld build/,$p' > "$out/build.log"
        [ -f "$assets/quality.json" ] && cp "$assets/quality.json" "$out/"
        [ -d "$assets/base" ] && tar -C "$assets" -cf "$out/toyworld_base.tar" base
        [ -d "$assets/variant" ] && tar -C "$assets" -cf "$out/toyworld_variant.tar" variant
      else
        echo "=== build: skipped (BUILD_MINUTES=${BUILD_MINUTES:-0}, ${left}s left)" | tee -a "$log"
      fi ;;
  esac
done

# every benchmark's rows and headline, in one place at the end of the log
echo "=== summary: $failed failed stage(s)" | tee -a "$log"
grep -E "^(=== |path \||paper loop \||packed \||K = [0-9]+ in )" "$log" > "$log.summary"
tee -a "$log" < "$log.summary" && rm -f "$log.summary"
exit "$failed"
