#!/usr/bin/env bash
# The one prepared GPU check: benchmarks/gpu/run.sh [--dry] [OUT.json]   (README.md here)
# GPU machine: installs vLLM if it is missing, then runs benchmarks/gpu/gpu_check.py (vLLM vs HF
# greedy parity, generations/s of both, a bf16 FSDP2 training run's tokens/s and MFU, `derta eval`
# through ray.data.llm) and writes one JSON. No GPU (or --dry): the dry mode, no GPU part.
# Budget: 8 minutes in all (install <= VLLM_INSTALL_TIMEOUT s, the check gets the rest).
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
PY=${PYTHON:-python}
DRY=""
if [ "${1:-}" = "--dry" ]; then DRY="--dry"; shift; fi
OUT=${1:-${OUT:-/tmp}/gpu_check.json}
BUDGET=${GPU_CHECK_BUDGET:-480}
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export DERTA_CACHE=${DERTA_CACHE:-/tmp/derta-gpu-check-cache}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -z "$DRY" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[run.sh] no CUDA device visible: dry mode"; DRY="--dry"
fi
if [ -z "$DRY" ] && ! "$PY" -c "import vllm" 2>/dev/null; then
  # Offline machines: VLLM_WHEELS=/dir/of/wheels installs from there only (pip --no-index).
  SRC=(vllm${VLLM_VERSION:+==$VLLM_VERSION})
  if [ -n "${VLLM_WHEELS:-}" ]; then SRC=(--no-index --find-links "$VLLM_WHEELS" "${SRC[@]}"); fi
  echo "[run.sh] installing ${SRC[*]} (at most ${VLLM_INSTALL_TIMEOUT:-240} s)"
  timeout "${VLLM_INSTALL_TIMEOUT:-240}" "$PY" -m pip install -q "${SRC[@]}" \
    || echo "[run.sh] vLLM install failed: the vLLM parts will be reported as skipped"
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
[ "$LEFT" -lt 60 ] && LEFT=60
export EVAL_TIMEOUT=$(( LEFT / 3 ))
timeout "$LEFT" "$PY" benchmarks/gpu/gpu_check.py $DRY --out "$OUT"
RC=$?
[ "$RC" = 124 ] && echo "[run.sh] the check ran past the budget (${LEFT} s left after install)"
echo "[run.sh] exit $RC after $(( $(date +%s) - T0 )) s; results: $OUT"
exit $RC
