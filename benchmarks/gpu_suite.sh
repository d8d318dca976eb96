#!/usr/bin/env bash
# Every GPU figure of the docs in one device call: each step under its own time limit, JSON and one log under $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh kernel vs_reference offload quantize
#   OUT=benchmarks/results SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh speed      # issue #23's calibration figures
#   SUITE_SMOKE=1 OUT=/tmp/gpu bash benchmarks/gpu_suite.sh kernel vs_reference   # toy sizes on a CPU (the script runs)
#   SUITE_SECONDS=550 ... # a budget for all steps together (a device call's limit)
#
# Steps: kernel (benchmarks/mass_kernel_cuda.py), vs_reference and speed (benchmarks/vs_reference_cuda.py; need a clone
# of the reference in SINKPRUNE_REFERENCE, default .ref/sap; SUITE_STEP_SECONDS tells the script its limit), offload
# (benchmarks/offload_cuda.py), quantize (benchmarks/quantize_cuda.py).  Wheels in .whl/ (packages the GPU machine lacks) are installed first, if present.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false SINKPRUNE_REFERENCE=${SINKPRUNE_REFERENCE:-$PWD/.ref/sap}
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
smoke=()
[ -n "${SUITE_SMOKE:-}" ] && smoke=(--device cpu --tiny)
# SUITE_SECONDS: the whole suite's budget; a step never runs past it (its limit is cut to what is left, minus 5 s)
deadline=$(( $(date +%s) + ${SUITE_SECONDS:-100000} ))
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) - 5 ))
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -le 0 ] && { echo "== $name skipped: the suite's time is spent"; return; }
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  SUITE_STEP_SECONDS=$limit timeout "$limit" "$@" "${smoke[@]}" 2>&1 | grep --line-buffered -v -e "^loading calibration" -e "^dataset loading" -e "litlogger" \
    -e "^Computing sink" -e "^Pruning layer" -e "available: " -e "Trainer.fit. stopped"
  echo "== $name exit ${PIPESTATUS[0]} ($(date +%T))"
}
[ -n "${SUITE_SMOKE:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
for s in "$@"; do
  case $s in
    kernel) step kernel 150 $PY benchmarks/mass_kernel_cuda.py --json "$OUT/mass_kernel_cuda.json" ;;
    vs_reference) step vs_reference ${VS_LIMIT:-420} $PY benchmarks/vs_reference_cuda.py --json "$OUT/vs_reference_cuda.json" \
                    ${VS_ARGS:-} ;;
    # calibration speed (issue #23): sink Wanda default / reference-exact against the floor and the reference at
    # T = 2048 x 16 and 4096 x 8 windows, then sink SparseGPT default one-shot and sequential at T = 2048 (medians of 3
    # where the step's time allows: the script skips what would pass it), each with a phase breakdown
    speed) step speed ${SPEED_LIMIT:-530} $PY benchmarks/vs_reference_cuda.py --json "$OUT/vs_reference_speed.json" \
             --configs default reference-flavour --sparsegpt-configs default default-sequential default-host-totals \
             --phases sink_wanda sink_sparsegpt --profile sink_wanda ${SPEED_ARGS:-} ;;
    offload) step offload ${OFFLOAD_LIMIT:-150} $PY benchmarks/offload_cuda.py --json "$OUT/offload_cuda.json" ${OFFLOAD_ARGS:-} ;;
    quantize) step quantize 150 $PY benchmarks/quantize_cuda.py --json "$OUT/quantize_cuda.json" ;;
    *) echo "unknown step $s: use kernel, vs_reference, speed, offload, quantize"; exit 2 ;;
  esac
done
