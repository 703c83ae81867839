#!/usr/bin/env bash
# The GPU checks of issue #4 in one device call: the VRAM GPU tests, the fp8 matmul profile, and the
# benchmarks whose figures benchmarks/RESULTS.md records (or still lacks). The device machine has torch,
# transformers, accelerate, peft and safetensors but reaches no index, so our wheels and diffusers travel.
#
# Here, before the call:
#   rm -rf .devrun && mkdir -p .devrun/wheels
#   for p in runtime z-image flux qwen-image ltx2 training; do uv build --wheel -q -o .devrun/wheels packages/$p; done
#   python3 -m pip download -q --no-deps -d .devrun/wheels "diffusers==0.42.*"
# Then: run(command="bash benchmarks/device_run.sh", carry=[".devrun"], timeout_s=600). Each step has its own
# time limit (together 570 s); under $OUT come back summary.txt, log.txt (every step's output) and
# results.jsonl (the lines the benchmarks added to benchmarks/results/), within the device's 8 files.
# bench_ltx2.py (about 38 GB of weights) needs a call of its own: STEPS=ltx2 bash benchmarks/device_run.sh;
# so does LTX-2.5's diffusion decoder against diffusers': STEPS=decoder bash benchmarks/device_run.sh, and the
# CUDA checks of stop 30's formats (GGUF kernels, the pinned host arena): STEPS=formats bash benchmarks/device_run.sh.
#
# DRY=1 PYTHON=.venv/bin/python OUT=/tmp/device-out bash benchmarks/device_run.sh runs the same flow on the
# CPU with tiny models (no install, no GPU-only steps), to check the script itself.
set -u
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-out}
STEPS=${STEPS:-all}
mkdir -p "$OUT"
summary="$OUT/summary.txt" log="$OUT/log.txt"
: > "$summary"
: > "$log"
mkdir -p benchmarks/results
declare -A before  # lines each results file had before the run
for f in benchmarks/results/*.jsonl; do [ -f "$f" ] && before[$f]=$(wc -l < "$f"); done

if [ -z "${DRY:-}" ]; then
  if ! "$PYTHON" -m pip install -q --no-deps --no-index .devrun/wheels/*.whl > "$OUT/install.log" 2>&1; then
    echo "install failed (see install.log)" | tee -a "$summary"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$summary" 2>&1
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__)" >> "$summary" 2>&1

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in log.txt, its status in the summary
step() {
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  echo "===== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "$name: exit $? in $((SECONDS - began)) s" | tee -a "$summary"
}

TINY=(--tiny --device cpu --height 64 --width 64 --caption-len 7 --steps 1 --warmup 0)
bench() {  # bench NAME SECONDS SCRIPT ARGS...: on the GPU with ARGS, or tiny on the CPU in a dry run
  local name=$1 limit=$2 script=$3
  shift 3
  if [ -n "${DRY:-}" ]; then
    # shellcheck disable=SC2086  # DRY_ARGS: extra words for the tiny run, e.g. DRY_ARGS="--num-frames 17"
    step "$name" "$limit" "$PYTHON" "benchmarks/$script" "${TINY[@]}" ${DRY_ARGS:-}
  else
    step "$name" "$limit" "$PYTHON" "benchmarks/$script" "$@"
  fi
}

if [ "$STEPS" = ltx2 ]; then
  bench bench_ltx2 540 bench_ltx2.py --steps 3 --warmup 1
elif [ "$STEPS" = formats ]; then
  step test_formats_gpu 120 "$PYTHON" -m pytest packages/runtime/tests/test_formats_gpu.py -m gpu -q -s -p no:cacheprovider
elif [ "$STEPS" = decoder ]; then
  # tiny: 17 frames (3 latent frames); with 2 the authors' and diffusers' decoders differ by design
  export DRY_ARGS="--num-frames 17"
  bench bench_ltx2_diffusion_decoder 270 bench_ltx2_diffusion_decoder.py --steps 2 --warmup 1
  bench bench_ltx2_diffusion_decoder_1080p 270 bench_ltx2_diffusion_decoder.py --height 1024 --width 1536 \
    --steps 1 --warmup 0
  unset DRY_ARGS
else
  if [ -z "${DRY:-}" ]; then
    step test_vram_gpu 90 "$PYTHON" -m pytest packages/runtime/tests/test_vram_gpu.py -m gpu -q -p no:cacheprovider
    step profile_fp8_matmul 60 "$PYTHON" benchmarks/profile_fp8_matmul.py
    step bench_vram_offload 120 "$PYTHON" benchmarks/bench_vram_offload.py --steps 5 --warmup 2
  fi
  bench bench_training 60 bench_training.py --steps 5 --warmup 2
  bench bench_flux 60 bench_flux.py --steps 5 --warmup 2
  bench bench_qwen_image 60 bench_qwen_image.py --steps 3 --warmup 1
  bench bench_flux2 60 bench_flux2.py --references 1 --steps 5 --warmup 2
  bench bench_step_cache 60 bench_step_cache.py --steps 10 --warmup 3
fi
# the lines the benchmarks appended (the results files travel with their earlier lines)
: > "$OUT/results.jsonl"
for f in benchmarks/results/*.jsonl; do
  [ -f "$f" ] && tail -n +"$((${before[$f]:-0} + 1))" "$f" >> "$OUT/results.jsonl"
done
cat "$summary"
