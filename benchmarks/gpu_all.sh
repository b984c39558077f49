#!/usr/bin/env bash
# One device run for the GPU deploy targets (2:4 on cuSPARSELt; constant fan-in on condensed Triton kernels), in
# priority order, each step with its own budget (seconds after which it starts nothing new; its JSON is
# rewritten after every item, so a step cut short keeps what it measured) and a hard timeout a minute past
# it (on a GPU); the steps' budgets sum to ~470 s of a ~10-minute device session (start-up and copies take the rest).
#
#   1. 2:4 core          probe cuSPARSELt, correctness (2:4 all-sparse and planned), ViT-B/16 b256/64/1
#   2. fan-in            condensed deploy: correctness + saved plan, Linear 3072->768 rows (90% then 80%,
#                        fp32 / bf16, b256 / 1 / 32), ViT-B/16 and ResNet-50 at 90% SRigL-like, fp32, b256 / 1
#   3. 2:4 rest          ViT-B/16 GEMM rows, ConvNeXt-T and ResNet-50 (b256 / 64 / 1)
#   4. kernels           benchmarks/gpu_condensed.py: every config on device, shuffled round-robin timing
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh            # on the GPU machine; results under $OUT/<step>/
#   OUT=/tmp/x bash benchmarks/gpu_all.sh --smoke       # CPU check of the whole chain (emulated, interpreter)
#
# TOTAL_S caps the whole run (default 480): a step never gets more than what is left of it, less 15 s.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=()
GRACE=60  # the hard timeout past a step's budget (an item already running may finish within it)
if [ "${1:-}" = "--smoke" ]; then SMOKE=(--smoke); GRACE=400; fi  # the Triton interpreter is slow
TOTAL=${TOTAL_S:-480}
START=$(date +%s)
mkdir -p "$OUT"

budget() {  # budget <wanted seconds>: what the step may use, given what is left of TOTAL
  local left=$(( TOTAL - ($(date +%s) - START) - 15 ))
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

step() {  # step <name> <wanted budget> <script> <args...>
  local name=$1 want=$2 script=$3; shift 3
  local b; b=$(budget "$want")
  if [ "$b" -lt 20 ]; then
    echo "== $name: skipped (${b}s left of ${TOTAL}s)" | tee -a "$OUT/gpu_all.log"
    return
  fi
  mkdir -p "$OUT/$name"
  echo "== $name: budget ${b}s ($(( $(date +%s) - START ))s elapsed)" | tee -a "$OUT/gpu_all.log"
  timeout -k 10 $(( b + GRACE )) "$PY" "$script" "${SMOKE[@]}" --budget-s "$b" "$@" 2>&1 | tee "$OUT/$name/log.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$OUT/gpu_all.log"
}

step issue13_core 150 benchmarks/gpu_deploy_24.py --out "$OUT/issue13_core" \
  --only probe correctness vit_b_16 --caps correctness=50 vit_b_16=80
step issue16 170 benchmarks/gpu_deploy_24.py --out "$OUT/issue16" \
  --only condensed_correctness condensed_layers condensed_models \
  --caps condensed_correctness=25 condensed_layers=50 condensed_models=95
step issue13_rest 110 benchmarks/gpu_deploy_24.py --out "$OUT/issue13_rest" \
  --only layers convnext_tiny resnet50 --caps layers=25 convnext_tiny=40 resnet50=45
step kernels 40 benchmarks/gpu_condensed.py --out "$OUT/kernels/gpu_condensed.json" \
  --correctness-cap-s 12 --part-cap-s 10
echo "== all done in $(( $(date +%s) - START ))s; results under $OUT" | tee -a "$OUT/gpu_all.log"
