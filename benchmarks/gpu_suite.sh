#!/usr/bin/env bash
# The one script the GPU machine runs: install what is missing (wheels carried in .whl/), write the synthetic
# models in the background, run the gpu-marked tests, run the benchmarks, write JSON under $OUT (or
# benchmarks/results/latest/ without $OUT), and print a short summary last.
#   usage: bash benchmarks/gpu_suite.sh [tests|full] [BENCH_DEADLINE_S]
#     tests  the gpu-marked tests only
#     full   the tests, then benchmarks/run_gpu_benchmarks.py, which starts no stage past BENCH_DEADLINE_S
#            seconds (default 330) so that a short lease still brings results back
# The default model's GPU tests need it in REPLAYLLM_CACHE; this machine has no network and the file is larger
# than one call may carry, so there they are skipped, with that reason, unless the cache already holds it.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
DEADLINE=${2:-330}
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
LOG=$OUT/suite.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} REPLAYLLM_GPU_SUITE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
export REPLAYLLM_CACHE=${REPLAYLLM_CACHE:-/tmp/replayllm-cache}
export REPLAYLLM_SYNTH_DIR=${REPLAYLLM_SYNTH_DIR:-/tmp/replayllm-synth}
mkdir -p "$REPLAYLLM_CACHE/models" "$REPLAYLLM_SYNTH_DIR"
python3 - <<'PY' | tee "$LOG"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}")
PY
if [ "$MODE" = full ]; then
  # 12 of 16 cores: the benchmarks' own host thread keeps a core to itself while the models are written.
  (for spec in llama2-7b:q4_k_m llama2-13b:q4_k_m; do
     python3 -m replayllm.cli.main synth --shape "${spec%:*}" --quant "${spec#*:}" --workers 12 --quiet \
       "$REPLAYLLM_SYNTH_DIR/${spec%:*}-${spec#*:}.gguf" && echo "synth $spec done at $(date +%T)"
   done) >> "$LOG" 2>&1 &
fi
python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine tests/kernels/test_quant_dequant.py 2>&1 \
  | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
if [ "$MODE" = full ]; then
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" --deadline-s "$DEADLINE" 2>&1 | tee -a "$LOG"
fi
echo "==== summary ===="
head -n 1 "$LOG"
grep '^synth' "$LOG"
tail -n 1 "$OUT/gpu_tests.log"
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
exit $status
