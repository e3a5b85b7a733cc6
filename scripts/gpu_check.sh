#!/usr/bin/env bash
# The CUDA-graph path's checks on one GPU machine, in one run that ends within DEADLINE seconds:
# the GPU tests, the benchmark's eager-vs-graph rows, one 20-epoch training per norm, and the
# 3x3 study with 9 lanes, graphs on and off (and, where the machine has it, under CUDA MPS).
# Tracking-free (scripts/untracked.py): it needs PyTorch with CUDA, not MLflow. Every step it
# times or trains is a norm's recipe built by train's own builder (training.build_model +
# training.build_training): the benchmark's through scripts/benchmarks/recipe.py, the trainings'
# through training.prepare_training + training.fit, the GPU tests' through training too.
#
#   bash scripts/gpu_check.sh DATA OUT [DEADLINE]      e.g. DATA=../shared/data/cifar10-dev.tar.gz
#
# Writes under OUT: log.txt (everything), pytest-gpu.txt, benchmark.md, runs.jsonl (every
# training's JSON line, labelled by section), summary.md (the tables of each section).
# Each section runs only while the deadline leaves it room; a failing section does not stop
# the ones after it.
set -uo pipefail
DATA=${1:?usage: gpu_check.sh DATA OUT [DEADLINE]}
OUT=${2:?usage: gpu_check.sh DATA OUT [DEADLINE]}
DEADLINE=$(( $(date +%s) + ${3:-480} ))
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PIPELINE_CACHE_DIR=${PIPELINE_CACHE_DIR:-/tmp/pipeline-cache}
PYTHON=${PYTHON:-python3}
RUNS="$OUT/runs.jsonl"
# Extra options of every training, for a rehearsal elsewhere: GPU_CHECK_ARGS="--set epochs=1"
read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"
# The benchmark's device; a rehearsal on a machine without CUDA: GPU_CHECK_DEVICE=cpu
DEVICE=${GPU_CHECK_DEVICE:-cuda}

section() { echo; echo "=== $1 ($(date +%T), $(( DEADLINE - $(date +%s) )) s left)"; }
# within LIMIT NEED COMMAND...: run COMMAND for at most LIMIT seconds (less if the deadline is
# nearer), or skip it when fewer than NEED seconds are left.
within() {
  local limit=$1 need=$2 left; shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt "$need" ]; then echo "!!! skipped, $left s left: $*"; return 0; fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout --kill-after=5 "$limit" "$@"
  local code=$?
  [ "$code" -eq 0 ] || echo "!!! exit $code after at most $limit s: $*"
  return 0
}
study() {  # study LABEL LIMIT NEED [untracked.py study options...]
  local label=$1 limit=$2 need=$3; shift 3
  section "study $label"
  within "$limit" "$need" "$PYTHON" scripts/untracked.py study --data "$DATA" --out "$RUNS" \
    --label "$label" --seeds 3 "${EXTRA[@]}" "$@"
  { echo "## $label"; echo; "$PYTHON" scripts/untracked.py table --out "$RUNS" --label "$label"
    echo; } >> "$OUT/summary.md"
}

section machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
echo "cores: $(nproc)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

section data
within 60 10 "$PYTHON" -c "from pipeline.data import load_dataset; load_dataset('$DATA')"

section "tests -m gpu"
within 120 30 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest-gpu.txt"

section benchmark
within 150 60 "$PYTHON" scripts/benchmark.py --data "$DATA" --device "$DEVICE" --no-tracking \
  --no-layouts --no-tta --steps 100 --warmup-steps 10 --workers 8 > "$OUT/benchmark.md"
cat "$OUT/benchmark.md"

section "one 20-epoch training per norm, CUDA graphs (auto)"
for norm in batch group layer; do
  within 60 20 "$PYTHON" scripts/untracked.py train --norm "$norm" --seed 1 --data "$DATA" \
    --out "$RUNS" --label single "${EXTRA[@]}"
done
{ echo "## single"; echo; "$PYTHON" scripts/untracked.py table --out "$RUNS" --label single
  echo; } >> "$OUT/summary.md"

study lanes9-graphs 150 60 --parallel 9
study lanes9-eager 240 100 --parallel 9 --set cuda_graphs=off

section "CUDA MPS"
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 "$PYTHON" -c \
      "import torch; torch.ones(1, device='cuda').sum().item(); print('MPS client ok')"; then
    study lanes9-graphs-mps 120 45 --parallel 9
  else
    echo "!!! MPS did not start or its client failed"; cat /tmp/mps-log/*.log 2>/dev/null | tail
  fi
  echo quit | nvidia-cuda-mps-control
  sleep 2
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
else
  echo "nvidia-cuda-mps-control: not on this machine"
fi

study lanes3-graphs 120 60 --parallel 3

section "graphs vs eager, paired by seed"
{ echo "## lanes9-graphs and lanes9-eager"; echo
  "$PYTHON" scripts/untracked.py table --out "$RUNS" --label lanes9-graphs,lanes9-eager; echo
} >> "$OUT/summary.md"

section done
cat "$OUT/summary.md"
