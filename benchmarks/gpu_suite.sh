#!/usr/bin/env bash
# The one script the GPU machine runs: install what is missing (wheels carried in .whl/), write the synthetic
# models in the background, run the gpu-marked tests, run the benchmarks, write JSON under $OUT (or
# benchmarks/results/latest/ without $OUT), and print a short summary last.
#   usage: bash benchmarks/gpu_suite.sh [stage|probe|tests|full|targets|bench|types|fit|sweep|latency] [BENCH_DEADLINE_S] [TESTS]
#     TESTS (tests and targets): test files or node ids to run instead of the whole GPU selection, all markers
#     stage  keep the first half of the default model (.carry/a/smol.part00) in /tmp for a second run on the same host
#     probe  the new kernels' tests; the decode GEMV's evidence: benchmarks/gemv_probe.py (GB/s, registers,
#            spills; the int8-activation Q4_K kernel beside the default), Nsight Compute's view of the int8
#            one (throughput, occupancy, warp stalls); launch-shape sweeps of the int8 GEMVs, decode attention
#            and the prefill GEMM (benchmarks/kernel_sweep.py); and where a 7B pp512 spends its time
#            (benchmarks/prefill_probe.py: the torch profiler's kernel table, the tuned GEMM methods).
#            Exactly 8 files under $OUT, the most a call brings back.
#     tests  the gpu-marked tests only
#     bench  full without the tests (for a commit whose tests ran on the GPU already)
#     full   the tests, then benchmarks/run_gpu_benchmarks.py, which starts no stage past BENCH_DEADLINE_S
#            seconds (default 330) so that a run under a wall-clock limit still brings results back
#     targets  the tests, then the issue's Q4_K_M rows alone (run_gpu_benchmarks.py --only targets): 7B at depth 0
#            and deep, the step breakdown, the correctness checks, 13B; no comparisons
#     types  the 7B F16 and Q8_0 benchmarks alone (run_gpu_benchmarks.py --only types), no tests
#     fit    the 7B Q4_K_M under a 6 GiB cap alone, in a fresh process (run_gpu_benchmarks.py --only fit), no tests
#     sweep  launch-shape sweeps of the 16-bit GEMVs and of decode attention alone (benchmarks/kernel_sweep.py)
#     latency  the decode attention, greedy draw, norm, SiLU and GPU CLI tests, decode attention's launch-shape
#            sweep and its products sweep (f16 and int8 caches; tensor-core, int8 and CUDA-core products), then
#            what a GEMV launch costs beyond its bytes
#            (benchmarks/gemv_overhead.py): the step's latency-bound parts alone
# The default model (98 MB) is larger than one transfer to the GPU host may be, and that host has no network: it
# travels in two halves over two runs on the same host (`stage`, then a run with .carry/b/smol.part01). Without both,
# its tests are skipped with that reason. Write .commit (git rev-parse --short=12 HEAD) first: the machine's
# copy of the tree has no git history, and result files name the commit they measured.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
DEADLINE=${2:-330}
TESTS=${3:-}
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export REPLAYLLM_CACHE=${REPLAYLLM_CACHE:-/tmp/replayllm-cache}
export REPLAYLLM_SYNTH_DIR=${REPLAYLLM_SYNTH_DIR:-/tmp/replayllm-synth}
mkdir -p "$REPLAYLLM_CACHE/models" "$REPLAYLLM_SYNTH_DIR"
if [ "$MODE" = stage ]; then
  cp .carry/a/smol.part00 "$REPLAYLLM_CACHE/" && ls -l "$REPLAYLLM_CACHE"
  exit $?
fi
LOG=$OUT/suite.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} REPLAYLLM_GPU_SUITE=1
[ -f .commit ] && export REPLAYLLM_COMMIT=$(cat .commit)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
model=$REPLAYLLM_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ] && [ -f "$REPLAYLLM_CACHE/smol.part00" ] && [ -f .carry/b/smol.part01 ]; then
  cat "$REPLAYLLM_CACHE/smol.part00" .carry/b/smol.part01 > "$model.tmp" && mv "$model.tmp" "$model"
fi
python3 - <<'PY' | tee "$LOG"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}")
PY
[ -f "$model" ] && sha256sum "$model" | tee -a "$LOG"
if [ "$MODE" = probe ]; then
  q7=$REPLAYLLM_SYNTH_DIR/llama2-7b-q4_k_m.gguf
  [ -f "$q7" ] || python3 -m replayllm.cli.main synth --shape llama2-7b --quant q4_k_m --workers 12 --quiet "$q7" \
    >> "$LOG" 2>&1 &
  synth_pid=$!
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_matvec_q8.py tests/kernels/test_quant_matmul.py \
    tests/kernels/test_prefill_attention.py 2>&1 | tail -n 3 | tee -a "$LOG"
  python3 benchmarks/gemv_probe.py --out "$OUT" 2>&1 | tee -a "$LOG"
  # Clocks left as they are (--clock-control none); of the 6 int8-activation launches (Q4_K) the 5th and 6th.
  ncu --clock-control none --kernel-name regex:_matvec_q8_kernel --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/gemv_probe.py --out /tmp/probe-ncu-q8 --launches 6 > "$OUT/ncu_q8.txt" 2>&1
  timeout 150 python3 benchmarks/kernel_sweep.py --out "$OUT" --only gemv 2>&1 | tee -a "$LOG"
  python3 benchmarks/kernel_sweep.py --out "$OUT" --only attention 2>&1 | tee -a "$LOG"
  wait "$synth_pid"
  python3 benchmarks/prefill_probe.py "$q7" --out "$OUT" 2>&1 | tee -a "$LOG"
  timeout "${SWEEP_GEMM_S:-180}" python3 benchmarks/kernel_sweep.py --out "$OUT" --only gemm 2>&1 | tee -a "$LOG"
  echo "==== summary ===="; head -n 1 "$LOG"
  grep -E '^Q[0-9]|-token prefill|^gemm|^gemv|^attention|^ +next|^sweep|passed|failed|^prefill' "$LOG"
  grep -E 'Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Duration' \
    "$OUT/ncu_q8.txt" | head -n 12
  exit 0
fi
if [ "$MODE" = latency ]; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py tests/kernels/test_greedy_sample.py \
    tests/kernels/test_rmsnorm.py tests/kernels/test_activation.py \
    tests/cli/test_cli_gpu.py::test_bench_kernels_shows_the_decode_step_kernel_by_kernel 2>&1 | tail -n 12 \
    | tee "$OUT/gpu_tests.log"
  timeout 45 python3 benchmarks/kernel_sweep.py --out "$OUT" --only attention 2>&1 | tee -a "$LOG"
  timeout 150 python3 benchmarks/kernel_sweep.py --out "$OUT" --only products 2>&1 | tee -a "$LOG"
  timeout 45 python3 benchmarks/gemv_overhead.py --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "==== summary ===="; head -n 1 "$LOG"; cat "$OUT/gpu_tests.log"; grep -E '^attention|^empty|^gemv_overhead' "$LOG"
  exit 0
fi
if [ "$MODE" = sweep ]; then
  timeout 300 python3 benchmarks/kernel_sweep.py --out "$OUT" --only gemv --form 16bit 2>&1 | tee -a "$LOG"
  python3 benchmarks/kernel_sweep.py --out "$OUT" --only attention 2>&1 | tee -a "$LOG"
  echo "==== summary ===="; head -n 1 "$LOG"; grep -E '^gemv|^attention|^ +next|^sweep' "$LOG"
  exit 0
fi
if [ "$MODE" = full ] || [ "$MODE" = bench ] || [ "$MODE" = targets ]; then
  # 12 of 16 cores, so the tests keep cores of their own; the 13B model is written later, by the benchmarks.
  (python3 -m replayllm.cli.main synth --shape llama2-7b --quant q4_k_m --workers 12 --quiet \
     "$REPLAYLLM_SYNTH_DIR/llama2-7b-q4_k_m.gguf" && echo "synth llama2-7b q4_k_m done at $(date +%T)") >> "$LOG" 2>&1 &
fi
status=0
if [ -n "$TESTS" ]; then  # a chosen selection: the files a change touched
  # shellcheck disable=SC2086
  python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
elif [ "$MODE" != types ] && [ "$MODE" != fit ] && [ "$MODE" != bench ]; then  # types, fit: the benchmarks alone, after a full run has tested the same commit
  # Unmarked kernel tests that take the GPU when there is one: the integer-dot GEMVs (16-bit and int8) and the
  # kernels that write their activations.
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_quant_matvec_q8.py tests/kernels/test_float_matvec.py \
    tests/kernels/test_rmsnorm.py tests/kernels/test_decode_attention.py tests/kernels/test_greedy_sample.py \
    -k "quant or matvec or copy or sliced or merge or new_token or cuda_graph or real_shapes or greedy" \
    tests/kernels/test_quant_dequant.py::test_small_int_to_f32_is_exact_over_its_range 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine tests/cli tests/runner \
    tests/kernels/test_quant_dequant.py tests/kernels/test_quant_matvec.py tests/kernels/test_quant_matvec_q8.py \
    tests/kernels/test_quant_matmul.py tests/kernels/test_prefill_attention.py 2>&1 | tee -a "$OUT/gpu_tests.log"
  status=$(( status | PIPESTATUS[0] ))
fi
if [ "$MODE" = full ] || [ "$MODE" = bench ]; then
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" --deadline-s "$DEADLINE" 2>&1 | tee -a "$LOG"
fi
if [ "$MODE" = targets ]; then
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" --deadline-s "$DEADLINE" --only targets 2>&1 | tee -a "$LOG"
fi
if [ "$MODE" = types ]; then
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" --deadline-s "$DEADLINE" --only types 2>&1 | tee -a "$LOG"
fi
if [ "$MODE" = fit ]; then
  python3 -m replayllm.cli.main synth --shape llama2-7b --quant q4_k_m --workers 16 --quiet \
    "$REPLAYLLM_SYNTH_DIR/llama2-7b-q4_k_m.gguf" >> "$LOG" 2>&1
  python3 benchmarks/run_gpu_benchmarks.py --out "$OUT" --deadline-s "$DEADLINE" --only fit 2>&1 | tee -a "$LOG"
fi
echo "==== summary ===="
head -n 2 "$LOG"
grep '^synth' "$LOG"
[ -f "$OUT/gpu_tests.log" ] && grep -E 'passed|failed|error' "$OUT/gpu_tests.log" | tail -n 4
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
[ "$status" = 0 ]
