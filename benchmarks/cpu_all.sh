#!/usr/bin/env bash
# One run of issue 24's CPU measurements on the machine at hand (meant for an Intel Xeon with AVX-512,
# AVX512-BF16 and AMX, which the AMD Zen 3 sessions could not measure), in priority order, each result under
# $OUT. Run it on a quiet machine (nothing else running); it prints lscpu first, and every figure file states
# the load it was measured at.
#
#   1. kernels        every compiled kernel variant (generic / AVX2 / AVX-512) against the reference, with tails
#   2. anchors b1     ResNet-50, ViT-B/16 and ConvNeXt-T at 90% SRigL-like fan-in, batch 1: ss.deploy fp32 and
#                     bf16 against torch (fp32, channels-last, bf16 autocast), onnxruntime, OpenVINO (default, f32)
#   3. layer          the Linear 3072->768 rows (90%, batch 1 and 256; 80% batch 1) of `semisparse bench`
#   4. anchors 2:4    the same models at 2:4, batch 1
#   5. anchors b32    ResNet-50 fan-in at batch 32 (planning alone takes minutes)
# The dense runtimes come with the `bench` extra (pip install -e '.[bench]'); one not installed is skipped with
# a note in the table.
#
#   OUT=/some/dir bash benchmarks/cpu_all.sh          # ~50 minutes on 2 cores
#   OUT=/tmp/x bash benchmarks/cpu_all.sh --smoke     # the chain, small sizes (a few minutes)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cpu_all}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
START=$(date +%s)

step() {  # step <name> <command...>: runs it, its output to $OUT/<name>.txt, its exit status to the log
  local name=$1; shift
  echo "== $name ($(( $(date +%s) - START ))s elapsed, load $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$OUT/cpu_all.log"
  "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/cpu_all.log"
}

lscpu > "$OUT/lscpu.txt"
grep -E "Model name|^Flags" "$OUT/lscpu.txt" | cut -c1-200 | tee -a "$OUT/cpu_all.log"
if [ "$SMOKE" = 1 ]; then
  step kernels "$PY" -m pytest -q -x tests/runtime/cpu/test_cpu_kernels.py -k "variant or isa" -p no:cacheprovider
  step anchors_b1 "$PY" benchmarks/cpu_anchors.py --smoke --bf16 --patterns fan-in --json "$OUT/anchors_b1.json"
  step layer "$PY" -m semisparse bench --layer 96x384 --batch 1 --reps 5 --json "$OUT/layer.json"
else
  step kernels "$PY" -m pytest -q tests/runtime/cpu/test_cpu_kernels.py -p no:cacheprovider
  step anchors_b1 "$PY" benchmarks/cpu_anchors.py --models resnet50 vit_b_16 convnext_tiny --patterns fan-in --bf16 \
    --json "$OUT/anchors_b1.json"
  step layer "$PY" -m semisparse bench --layer 768x3072 --reps 50 --json "$OUT/layer.json"
  step anchors_24 "$PY" benchmarks/cpu_anchors.py --models resnet50 vit_b_16 convnext_tiny --patterns 2:4-rows4 2:4 \
    --bf16 --json "$OUT/anchors_24.json"
  step rows4_layers "$PY" benchmarks/rows4_layers.py --reps 30
  step anchors_b32 "$PY" benchmarks/cpu_anchors.py --models resnet50 --patterns fan-in --batch 32 \
    --json "$OUT/anchors_b32.json"
fi
echo "== all done in $(( $(date +%s) - START ))s; results under $OUT" | tee -a "$OUT/cpu_all.log"
