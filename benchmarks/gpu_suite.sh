#!/usr/bin/env bash
# The one script the GPU machine runs: install what is missing (wheels carried in .whl/), run every
# gpu-marked test, run the benchmarks, write JSON under $OUT (or benchmarks/results/latest/ without $OUT),
# and print a short summary last.
#   usage: bash benchmarks/gpu_suite.sh [stage|quick|full]
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
export REPLAYLLM_CACHE=${REPLAYLLM_CACHE:-$PWD/.cache}
# The GPU machine has no network: the default model arrives in two parts (.carry/a, .carry/b), each under the
# per-call transfer limit, over two calls; the first part waits in the (ignored, kept) cache folder.
model=$REPLAYLLM_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$REPLAYLLM_CACHE/models"
[ -f .carry/a/smol.part00 ] && cp .carry/a/smol.part00 "$REPLAYLLM_CACHE/"
if [ ! -f "$model" ] && [ -f "$REPLAYLLM_CACHE/smol.part00" ] && [ -f .carry/b/smol.part01 ]; then
  cat "$REPLAYLLM_CACHE/smol.part00" .carry/b/smol.part01 > "$model.tmp" && mv "$model.tmp" "$model"
fi
[ "$MODE" = stage ] && { ls -la "$REPLAYLLM_CACHE"; exit 0; }
python3 - <<'PY' | tee "$OUT/device.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}")
PY
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
if [ "$MODE" = full ] && [ -f benchmarks/run_gpu_benchmarks.py ]; then
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
echo "==== summary ===="
cat "$OUT/device.txt"
tail -n 1 "$OUT/gpu_tests.log"
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
exit $status
