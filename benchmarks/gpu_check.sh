#!/usr/bin/env bash
# Checks the project on a GPU machine, from the repository root, in under 9 minutes:
#
#   nvidia_smi        nvidia-smi (into env.txt)
#   env               Python, JAX (backend, devices), PyTorch/CUDA and package versions (into env.txt)
#   wheels            the Python packages the machine lacks, from a folder of wheels, into $OUT/pylib
#   data              the MNIST IDX folder: given, shared/data/mnist, or the test suite's synthetic MNIST
#   tests             tests/test_sampler.py and tests/test_grads.py with JAX on the GPU
#   bench_sampler     benchmarks/sampler.py --device gpu (affine grid + sampling vs torch's CUDA grid_sample)
#   bench_train_step  benchmarks/train_step.py --device gpu (CNN / ST-CNN steps vs the same models in PyTorch)
#   train_<cell>      distorted-MNIST Table 1 cells (python -m experiments.train, batch 256, the paper's
#                     per-step settings, --config.total_steps=$GPU_CHECK_STEPS), in order, while time is left
#   train_summary     runs.tsv: last step, training images/s and test error of every run
#
# Each step has its own log (logs/<step>.log) and a time limit (`timeout`); a failing step does not stop the
# others. summary.tsv lists every step: name, status (its exit code, 124 when it ran out of time, or
# "skipped"), seconds, note. Everything goes under $OUT (default gpu_check_out/). The script exits 1 if
# any step failed.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run            # the same steps at tiny sizes, on any CPU (~1-2 min)
#   OUT=/tmp/check bash benchmarks/gpu_check.sh --mnist /data/mnist --steps 5000 --cells "rts,cnn tc,cnn"
#
# Options (or environment variables): --out DIR (OUT), --mnist DIR (GPU_CHECK_MNIST), --wheels DIR
# (GPU_CHECK_WHEELS, default benchmarks/wheels), --steps N (GPU_CHECK_STEPS, default 3000), --cells "LIST"
# (GPU_CHECK_CELLS, configs/distorted_mnist.py arguments), --budget SECONDS (GPU_CHECK_BUDGET, default 500:
# no step but the last, train_summary, starts or runs beyond it), --dry-run; PYTHON picks the interpreter (default .venv/bin/python if
# present, else python3).
#
# The GPU machine needs jax with CUDA, flax, optax, orbax-checkpoint, numpy, scipy and (for the reference)
# torch with CUDA; the other packages come from wheels carried in the tree, installed with
# `pip install --no-index --no-deps --target $OUT/pylib` (only those it lacks; its jax and torch are never
# touched). Prepare the folder beforehand on a machine with the index, from the repository root (versions
# of requirements.txt; ml_collections needs absl-py and PyYAML, tensorboardX packaging and protobuf, pytest
# pluggy, iniconfig and pygments; pillow is the only one built per Python version: add one for each Python
# the GPU machine may run, x86-64 here):
#
#   pip download --only-binary=:all: --no-deps -d benchmarks/wheels \
#       ml_collections==1.1.0 absl-py==2.5.1 PyYAML==6.0.4 tensorboardX==2.6.2.2 tqdm==4.70.1 \
#       protobuf==7.36.2 packaging==26.4 pillow==13.0.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
#       pygments==2.21.0
#   for v in 3.12 3.13 3.14; do
#       pip download --only-binary=:all: --no-deps -d benchmarks/wheels \
#           --platform manylinux2014_x86_64 --python-version "$v" pillow
#   done
#
# benchmarks/wheels/ (about 34 MB) is ignored by git: copy it to the GPU machine with the tree.

set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0
OUT="${OUT:-gpu_check_out}"
MNIST="${GPU_CHECK_MNIST:-}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}"
STEPS="${GPU_CHECK_STEPS:-3000}"
CELLS="${GPU_CHECK_CELLS:-}"
BUDGET="${GPU_CHECK_BUDGET:-500}"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$ROOT/benchmarks/gpu_check.sh"; }
need_value() { [ "$#" -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) need_value "$@"; OUT="$2"; shift ;;
        --mnist) need_value "$@"; MNIST="$2"; shift ;;
        --wheels) need_value "$@"; WHEELS="$2"; shift ;;
        --steps) need_value "$@"; STEPS="$2"; shift ;;
        --cells) need_value "$@"; CELLS="$2"; shift ;;
        --budget) need_value "$@"; BUDGET="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1; then PYTHON=python3
    else PYTHON=python; fi
fi
if ! command -v timeout >/dev/null 2>&1; then
    echo "gpu_check.sh: needs coreutils' timeout" >&2
    exit 2
fi

# Relative paths are relative to where the script was started; the steps run in the repository root.
mkdir -p "$OUT/logs" "$OUT/runs" || exit 2
OUT="$(cd "$OUT" && pwd)"
case "$WHEELS" in /*) ;; *) WHEELS="$PWD/$WHEELS" ;; esac
case "$MNIST" in /*|"") ;; *) MNIST="$PWD/$MNIST" ;; esac
cd "$ROOT" || exit 2
SUMMARY="$OUT/summary.tsv"
printf 'step\tstatus\tseconds\tnote\n' > "$SUMMARY"
PYLIB="$OUT/pylib"
TOOLS="$ROOT/benchmarks/gpu_check_tools.py"
export PYTHONPATH="$PYLIB:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = 1 ]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    DEVICE=cpu
    : "${CELLS:=rts,cnn rts,st_cnn,affine}"
    TRAIN_FLAGS=(--config.total_steps=2 --config.batch_size=8 --config.eval_every=2 --config.checkpoint_every=2
                 --config.log_every=1 --config.data.test_size=32 --config.eval_batch_size=32)
    TEST_ARGS=(-k "identity_grid_reproduces_image_exactly or 1xN_image or nearest_gradients")
    SAMPLER_ARGS=(--cases mnist60 --systems torch stn_jax --rounds 1 --reps 1)
    TRAIN_STEP_ARGS=(--batch 8 --rounds 1 --reps 1)
    REQUIRE_GPU=()
else
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"  # the GPU first; the data pipeline draws on the CPU
    DEVICE=gpu
    : "${CELLS:=rts,cnn rts,st_cnn,affine rts,fcn rts,st_fcn,affine rts,st_cnn,tps r,cnn r,st_cnn,affine}"
    TRAIN_FLAGS=("--config.total_steps=$STEPS" "--config.eval_every=$STEPS" "--config.checkpoint_every=$STEPS")
    TEST_ARGS=()
    SAMPLER_ARGS=(--systems torch stn_jax map_coordinates --rounds 5 --reps 5)
    TRAIN_STEP_ARGS=(--rounds 5 --reps 10)
    REQUIRE_GPU=(--require-gpu)
fi

START="$(date +%s)"
DEADLINE=$((START + BUDGET))
MIN_STEP=15    # seconds: a step is skipped when fewer remain
MIN_TRAIN=60   # seconds: no training run starts with fewer
FAILED=0

now() { date +%s.%N; }
record() {  # record STEP STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
    printf '%-28s %-8s %7ss  %s\n' "$1" "$2" "$3" "$4"
}
skip() {  # skip STEP REASON
    echo "skipped: $2" > "$OUT/logs/$1.log"
    record "$1" skipped 0 "$2"
}
run_step() {  # run_step STEP CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left) into logs/STEP.log
    local name="$1" cap="$2"
    shift 2
    local log="$OUT/logs/$name.log" left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "${ANY_TIME:-0}" = 1 ]; then limit="$cap"; fi  # a few seconds' bookkeeping, beyond the budget
    if [ "$limit" -lt "$MIN_STEP" ]; then
        skip "$name" "out of time (${left}s of the ${BUDGET}s budget left)"
        return
    fi
    printf '$ %s\n(limit %ss)\n' "$*" "$limit" > "$log"
    local t0 rc seconds note=""
    t0="$(now)"
    timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    seconds="$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${limit}s"; fi
    if [ "$rc" != 0 ]; then
        FAILED=$((FAILED + 1))
        [ -n "$note" ] || note="failed: see logs/$name.log"
    fi
    echo "exit code $rc after ${seconds}s" >> "$log"
    record "$name" "$rc" "$seconds" "$note"
}

echo "gpu_check: $([ "$DRY_RUN" = 1 ] && echo "dry run (tiny sizes, CPU)" || echo "GPU run"), results in $OUT"

# 1. The machine.
if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia_smi 30 nvidia-smi
else
    skip nvidia_smi "nvidia-smi not found (no NVIDIA driver on this machine)"
fi
run_step env 90 "$PYTHON" "$TOOLS" versions ${REQUIRE_GPU[@]+"${REQUIRE_GPU[@]}"}
{
    echo "## nvidia-smi"; cat "$OUT/logs/nvidia_smi.log"; echo
    echo "## versions"; cat "$OUT/logs/env.log"
} > "$OUT/env.txt"

# Packages the machine lacks, from the carried wheels.
if [ -d "$WHEELS" ]; then
    run_step wheels 90 "$PYTHON" "$TOOLS" install "$WHEELS" "$PYLIB"
else
    skip wheels "no wheel folder $WHEELS (missing here: $("$PYTHON" "$TOOLS" missing 2>&1 | tail -n 1))"
fi

# The MNIST IDX folder: --mnist, else shared/data/mnist, else a synthetic one.
if [ -z "$MNIST" ] && [ -f "$ROOT/shared/data/mnist/train-images-idx3-ubyte.gz" ]; then MNIST="$ROOT/shared/data/mnist"; fi
if [ -n "$MNIST" ]; then
    DATA_KIND="$MNIST"
    run_step data 60 "$PYTHON" "$TOOLS" mnist "$MNIST"
else
    MNIST="$OUT/data/mnist_synthetic"
    DATA_KIND="synthetic (tests/conftest.py)"
    run_step data 60 "$PYTHON" "$TOOLS" mnist "$MNIST" --synthetic
fi

# 2. The sampler's tests, JAX on the accelerator.
run_step tests 180 "$PYTHON" "$TOOLS" on "$DEVICE" -m pytest tests/test_sampler.py tests/test_grads.py -q -rfE \
    --junitxml="$OUT/tests.xml" ${TEST_ARGS[@]+"${TEST_ARGS[@]}"}

# 3-4. Benchmarks against PyTorch, both on the same device (JAX leaves PyTorch half of the GPU's memory).
run_step bench_sampler 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 "$PYTHON" benchmarks/sampler.py \
    --device "$DEVICE" "${SAMPLER_ARGS[@]}" --json "$OUT/sampler.json"
run_step bench_train_step 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 "$PYTHON" benchmarks/train_step.py \
    --device "$DEVICE" "${TRAIN_STEP_ARGS[@]}" --json "$OUT/train_step.json"

# 5. Table 1 cells while time is left (a cell cut short still leaves its metrics.jsonl).
for cell in $CELLS; do
    name="train_${cell//,/_}"
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt "$MIN_TRAIN" ]; then
        skip "$name" "out of time (${left}s of the ${BUDGET}s budget left)"
        continue
    fi
    run_step "$name" 180 "$PYTHON" "$TOOLS" on "$DEVICE" -m experiments.train --config "configs/distorted_mnist.py:$cell" \
        --workdir "$OUT/runs/${cell//,/_}" --config.data.source="$MNIST" "${TRAIN_FLAGS[@]}"
done
ANY_TIME=1 run_step train_summary 15 "$PYTHON" "$TOOLS" runs "$OUT/runs" "$OUT/runs.tsv"

echo
echo "data: $DATA_KIND; wall time $(($(date +%s) - START))s; $FAILED step(s) failed"
echo "results in $OUT: summary.tsv, env.txt, logs/<step>.log; from the steps that ran: tests.xml,"
echo "sampler.json, train_step.json, runs.tsv and runs/<cell>/ (metrics.jsonl, TensorBoard events, checkpoints)"
[ "$FAILED" = 0 ]
