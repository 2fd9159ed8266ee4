#!/usr/bin/env bash
# Every GPU figure the project needs, in one command, on a machine with a CUDA GPU:
#
#     bash benchmarks/run_gpu.sh
#
#   1. measure_peaks.py        real peak allocated / reserved of short training runs (the default grid)
#                              -> results/<gpu>-training-peaks.jsonl (a dated name when that file already exists)
#   2. compare_estimates.py    the memory estimator against the rows just measured
#                              -> results/<gpu>-training-estimator-vs-measured.jsonl
#   3. probe_speed.py          `peftpick probe` of the eight default candidates, Llama-3.2-3B, 4 x 768 (target <= 45 s)
#                              -> results/<gpu>-probe-speed.json
#   4. probe_vs_reference.py   probe peaks against a plain training loop (target: within 2 %)
#                              -> results/<gpu>-probe-vs-reference.jsonl
#
# Everything printed also goes to results/<gpu>-run-gpu.log. A step that fails (or misses its target) does not stop
# the ones after it; the script exits 1 at the end if any did.
#
# Environment:
#   PYTHON=...                 the interpreter (default: .venv/bin/python when present, else python3)
#   MEASURE_PEAKS_ARGS="..."   extra arguments for measure_peaks.py, e.g. "--archs llama-3.2-1b --methods full,ia3"
#   SKIP_MEASURE_PEAKS=1       skip steps 1 and 2 (the grid takes about a quarter of an hour)
#   LEVERS=1                   also measure the training stacks (measure_peaks.py --levers: QLoRA bases, 8-bit
#                              optimizers, Liger, Trainer, SFTTrainer; 54 runs) and compare them with the estimate
#                              -> results/<gpu>-lever-peaks.jsonl, results/<gpu>-lever-estimator-vs-measured.jsonl
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "run_gpu.sh: no CUDA GPU is available to torch (interpreter: $PYTHON)." >&2
    echo "These benchmarks measure GPU memory and speed: they need an NVIDIA GPU, its driver and a CUDA build" >&2
    echo "of torch. (For a CPU dry run of the probe scripts see benchmarks/README.md, section Probes.)" >&2
    exit 1
fi

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))") || exit 1
SLUG=$("$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from probe_speed import gpu_slug
print(gpu_slug(sys.argv[1]))" "$GPU") || exit 1
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG="$RESULTS/$SLUG-run-gpu.log"
: > "$LOG"
FAILED=()

say() { echo "$*" | tee -a "$LOG"; }

step() {  # step NAME COMMAND...: run it, print and log its output, remember a non-zero exit
    local name=$1
    shift
    say ""
    say "==== $name: $* ($(date -u +%H:%M:%SZ))"
    local started=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    say "==== $name: exit $status after $((SECONDS - started)) s"
    if [ "$status" -ne 0 ]; then FAILED+=("$name (exit $status)"); fi
    return 0
}

say "run_gpu.sh on $GPU ($STAMP), results in $RESULTS/$SLUG-*"
"$PYTHON" -c "import torch, transformers, peft
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, '
      f'peft {peft.__version__}')" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$LOG"

measure_and_compare() {  # measure_and_compare NAME FILE-STEM MEASURE_PEAKS_ARGS...: measure, then compare those rows
    local name=$1 stem=$2
    shift 2
    local peaks="$RESULTS/$SLUG-$stem-peaks.jsonl"
    if [ -e "$peaks" ]; then peaks="$RESULTS/$SLUG-$stem-peaks-$STAMP.jsonl"; fi  # measure_peaks.py appends
    step "measure_$name" "$PYTHON" benchmarks/measure_peaks.py --out "$peaks" "$@"
    if [ -s "$peaks" ]; then
        # only the rows just measured: a folder holding a copy of them, and no shared measurements
        local only_new
        only_new=$(mktemp -d)
        cp "$peaks" "$only_new/"
        step "compare_$name" "$PYTHON" benchmarks/compare_estimates.py --results "$only_new" \
            --shared "$only_new/no-shared-measurements" --save "$RESULTS/$SLUG-$stem-estimator-vs-measured.jsonl"
        rm -rf "$only_new"
    else
        say "compare_$name: skipped, measure_peaks.py wrote no rows"
        FAILED+=("compare_$name (no rows to compare)")
    fi
}

if [ "${SKIP_MEASURE_PEAKS:-0}" != "1" ]; then
    # shellcheck disable=SC2086  # MEASURE_PEAKS_ARGS is a list of words on purpose
    measure_and_compare peaks training ${MEASURE_PEAKS_ARGS:-}
fi
if [ "${LEVERS:-0}" = "1" ]; then
    measure_and_compare levers lever --levers
fi

GPU_COUNT=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$GPU_COUNT" -gt 1 ]; then
    # per-rank peaks of each multi-GPU strategy beside the per-GPU estimate (DeepSpeed's only where it is installed)
    step sharding "$PYTHON" benchmarks/measure_sharding.py --gpus "$GPU_COUNT" --out "$RESULTS/$SLUG-sharding.jsonl"
fi
step probe_speed "$PYTHON" benchmarks/probe_speed.py --save "$RESULTS/$SLUG-probe-speed.json"
step probe_vs_reference "$PYTHON" benchmarks/probe_vs_reference.py --save "$RESULTS/$SLUG-probe-vs-reference.jsonl"

say ""
if [ "${#FAILED[@]}" -eq 0 ]; then
    say "run_gpu.sh: every step finished; figures in $RESULTS/$SLUG-*, output in $LOG"
    exit 0
fi
say "run_gpu.sh: these steps failed or missed their target (see $LOG): ${FAILED[*]}"
exit 1
