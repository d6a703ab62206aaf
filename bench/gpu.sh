#!/usr/bin/env bash
# One GPU session's measurements, in under 8 minutes: the CUDA tests, the train step
# (eager and compiled, bf16 autocast, against full fine-tuning, the BitFit floor and
# PEFT; eager also with the activation route forced), CUDA peak memory (with and without
# activation checkpointing), unmerged and merged inference (eager), the fixed cost per
# adapted layer, each layer shape on each route, per-sample serving, and unmerged
# inference at one sample a call (serving: where host work per layer shows). Each stage has
# its own time limit, so a slow one costs only its share; results go to
# bench/results/gpu_*.
#
#   bash bench/gpu.sh               # on the GPU machine
#   bash bench/gpu.sh --cpu-dry-run # every stage on CPU at the smallest sizes: does it run?
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=bench/results
DEVICE=cuda DTYPE=bf16 SIZES=--gpu-sizes REPEATS=12 TESTS=tests/test_cuda.py
if [ "${1:-}" = "--cpu-dry-run" ]; then
  OUT=${DRY_RUN_OUT:-/tmp/lora_anywhere_gpu_dry_run} DEVICE=cpu DTYPE=fp32 SIZES=--quick REPEATS=1 TESTS=tests/test_cuda.py
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

stage() { # stage NAME SECONDS COMMAND...: run with a time limit, log, never stop the script
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

{
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/gpu_env.txt" 2>&1

if [ "$DEVICE" = cpu ]; then # the dry run: every benchmark once, smallest sizes and models
  stage tests 120 "$PY" -m pytest -q "$TESTS"
  stage train-step 900 "$PY" bench/train_step.py --device cpu --dtype "$DTYPE" $SIZES --models gcn --repeats 1 --runs 1 --no-peft --compile --out "$OUT"
  stage memory 300 "$PY" bench/memory.py --device cpu --dtype "$DTYPE" $SIZES --models gcn --no-peft --out "$OUT"
  stage overhead 120 "$PY" bench/overhead.py --device cpu --quick --runs 1 --out "$OUT"
  stage serving 300 "$PY" bench/serving.py --device cpu --dtype "$DTYPE" --quick --models vit_small --adapters 2 --batch 4 --repeats 1 --out "$OUT"
  stage inference-small 300 "$PY" bench/train_step.py --device cpu --dtype "$DTYPE" --quick --inference-only --batch 1 --models vit_small --repeats 1 --runs 1 --out "$OUT"
else
  [ -n "${GPU_SKIP_TESTS:-}" ] || stage tests 60 "$PY" -m pytest -q "$TESTS"  # GPU_SKIP_TESTS=1 on a rerun
  stage train-step 110 "$PY" bench/train_step.py --device cuda --dtype bf16 $SIZES --repeats $REPEATS --runs 3 \
    --models resnet50,mobilenet_v3_large,vit_small,swin_tiny,wav2vec2_base,conformer,gcn,gat --out "$OUT"
  stage memory 60 "$PY" bench/memory.py --device cuda --dtype bf16 $SIZES \
    --models resnet50,vit_small,swin_tiny,wav2vec2_base,gcn --out "$OUT"
  # Compiling costs tens of seconds per model and contender (ViT-S and ResNet-50 together
  # ran past 150 s in the first run): ViT-S only.
  stage train-step-compiled 120 "$PY" bench/train_step.py --device cuda --dtype bf16 $SIZES \
    --repeats $REPEATS --runs 3 --compile --no-peft --no-inference --models vit_small --out "$OUT/compiled"
  # Each layer shape on each route at batch 64: the per-layer check of SMALL_CALL_OFF_CPU.
  stage layer-paths 40 "$PY" bench/layer_paths.py --device cuda --dtype bf16 --batch-scale 8 --quick --out "$OUT"
  stage overhead 20 "$PY" bench/overhead.py --device cuda --quick --out "$OUT"
  stage serving 40 "$PY" bench/serving.py --device cuda --dtype bf16 --adapters 2,8 --batch 64 --repeats 10 --models vit_small,resnet50 --out "$OUT"
  # Unmerged inference at one sample a call (224 px, 1 s of audio): every layer reads a
  # kept W + ΔW, so what is left is the host's work per adapted layer.
  stage inference-small 30 "$PY" bench/train_step.py --device cuda --dtype bf16 --inference-only --batch 1 --repeats 20 --runs 3 \
    --models resnet50,vit_small,swin_tiny,wav2vec2_base --out "$OUT"
fi

# Every result as gpu_<what>.{md,json,png} (the dry run keeps the names it gets).
for f in "$OUT"/inference_cuda_batch1.*; do
  [ -f "$f" ] && mv "$f" "$OUT/gpu_inference_small.${f##*.}"
done
for f in "$OUT"/train_step_cuda.* "$OUT"/memory_cuda.* "$OUT"/serving_cuda.* "$OUT"/overhead_cuda.* "$OUT"/layer_paths_cuda.*; do
  [ -f "$f" ] && mv "$f" "$OUT/gpu_$(basename "$f" | sed 's/_cuda//')"
done
for f in "$OUT"/compiled/train_step_cuda.*; do
  [ -f "$f" ] && mv "$f" "$OUT/gpu_train_step_compiled.${f##*.}"
done
rmdir "$OUT/compiled" 2>/dev/null
{
  echo "# GPU run ($(date -u +%Y-%m-%d), $(head -1 "$OUT/gpu_env.txt"))"
  echo
  grep -h "^== .*: exit" "$LOG"
  for f in "$OUT"/gpu_train_step.md "$OUT"/gpu_train_step_compiled.md "$OUT"/gpu_memory.md "$OUT"/gpu_serving.md \
    "$OUT"/gpu_layer_paths.md "$OUT"/gpu_overhead.md "$OUT"/gpu_inference_small.md "$OUT"/train_step_quick.md "$OUT"/memory_quick.md "$OUT"/serving_quick.md "$OUT"/overhead.md "$OUT"/inference_quick_batch1.md; do
    [ -f "$f" ] && { echo; echo "## $(basename "$f")"; echo; cat "$f"; }
  done
} >"$OUT/gpu_summary.md"
echo "summary: $OUT/gpu_summary.md"
