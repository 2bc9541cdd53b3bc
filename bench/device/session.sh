#!/usr/bin/env bash
# The GPU checks and benchmarks on a lent GPU machine, from the repo root there, with .gpukit carried
# (built here by bench/device/kit.sh). Offline: nothing is fetched.
#
#   bash bench/device/session.sh [STEP ...]    STEP: tests | small | 8b | profile | quick | all (default: all)
#
# The device lends one GPU for 15 minutes of a session, start-up included, and one command may run 10 minutes; so
# `all` (tests small 8b profile) is planned as ONE call of under 10 minutes: `run` with carry [".gpukit"] and
# timeout_s 600. Step limits (each step is stopped there and the next still runs); the times measured on one H200
# on 2026-12-04 (machine start about 30 s more):
#   set-up  the wheels into /tmp/site, versions, nvidia-smi, pip check                     14-17 s
#   build   gpu-small-full's 1 GB and gpu-8b-lora's 16 GB random models, initialised on the GPU (`run.py
#           --build-model`), in the background while the tests run (they need the GPU little), so the benchmark
#           steps find them built                                                          58 s (beside tests)
#   (data)  the gpu-* workloads' synthetic rows come made, in .gpukit/bench-data (kit.sh makes them for the
#           default steps and peers; GPUKIT_* overrides that change them make them here, ~30-50 s)
#   tests   pytest tests/test_cuda.py                                                      58 s, limit 90 s
#   small   gpu-small-full: chatft vs trl, trl-packed, chatft-packed, trl-padding-free (in that order), 20 steps
#           (3 untimed), 1 repeat: 5 worker processes of 20-39 s + the device peak twice 159 s, limit 175 s
#   8b      gpu-8b-lora: chatft vs trl, chatft-packed, 8 steps (2 untimed), 1 repeat, activation checkpointing
#           off (the H200's 141 GB hold a 2 x 4096 micro-batch's activations; on means recomputing a third of the
#           forward, which model-FLOPs MFU does not count)                               121 s, limit 150 s
#   profile chatft and chatft-packed under torch.profiler (bench/profile.py: kernels only, over the training
#           steps only), 4 steps (1 untimed) of gpu-8b-lora then gpu-small-full; profile-work.tgz holds
#           <workload>-<system>-profile.txt: kernel time by kind, the busy share of the steps' wall clock and
#           the top kernels                                                        not yet measured, limit 150 s
#   quick   (not in `all`) both GPU workloads at toy size, to check the harness             limit 240 s
# The benchmark writes its report after every finished worker, so a step stopped at its limit keeps the systems
# that finished (`"partial": true` in the JSON); a system that fails is reported and the others still run.
# Override: GPUKIT_{SMALL,8B}_{STEPS,WARMUP,REPEATS,PEERS}, GPUKIT_PROFILE_STEPS, GPUKIT_8B_CHECKPOINTING (on|off),
# GPUKIT_LIMIT_{TESTS,QUICK,SMALL,8B,PROFILE,BUILD} (seconds), PYTHON.
#
# Output, in $OUT (the device's output folder; ./gpukit-out when unset), at most 8 files, what the device sends
# back: session.txt (machine, versions, the model build's log, step results), STEP.log for each step, and for each
# benchmark step STEP-work.tgz (WORKLOAD.json, WORKLOAD.md and the worker logs and raw records of WORKLOAD.work/,
# without rows or run dirs; the profile step's also the profiles). The benchmarks write to $GPUKIT_BENCH_OUT
# (/tmp/gpukit-bench) first: a .work dir holds more files than the device sends back. The exit status says
# whether every step passed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
KIT=$ROOT/.gpukit
PY=${PYTHON:-python3}
SITE=${GPUKIT_SITE:-/tmp/site}
OUT=${OUT:-$ROOT/gpukit-out}
BENCH_OUT=${GPUKIT_BENCH_OUT:-/tmp/gpukit-bench}
# shellcheck source=bench/device/defaults.sh
source "$ROOT/bench/device/defaults.sh"
LIMIT_TESTS=${GPUKIT_LIMIT_TESTS:-90} LIMIT_QUICK=${GPUKIT_LIMIT_QUICK:-240}
LIMIT_SMALL=${GPUKIT_LIMIT_SMALL:-175} LIMIT_8B=${GPUKIT_LIMIT_8B:-150} LIMIT_PROFILE=${GPUKIT_LIMIT_PROFILE:-150}

mkdir -p "$OUT" "$BENCH_OUT"
SESSION=$OUT/session.txt
: >"$SESSION"
say() { echo "$*" | tee -a "$SESSION"; }

steps=()
for arg in "${@:-all}"; do
    case "$arg" in
        all) steps+=(tests small 8b profile) ;;
        tests|quick|small|8b|profile) steps+=("$arg") ;;
        *) echo "session.sh: unknown step '$arg' (tests, quick, small, 8b, profile, all)" >&2; exit 2 ;;
    esac
done

[ -d "$KIT/wheels" ] && [ -d "$KIT/tokenizer" ] || {
    say "session.sh: no .gpukit/wheels or .gpukit/tokenizer: run bench/device/kit.sh on the dev machine, carry .gpukit"
    exit 2
}

# ------------------------------------------------------------------ set-up
began=$SECONDS
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')
say "== session.sh ${steps[*]} on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit"
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    if cmp -s "$KIT/MANIFEST.txt" "$SITE/.gpukit-manifest"; then
        say "wheels: already installed in $SITE"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$KIT"/wheels/*.whl 2>&1 | tee -a "$SESSION"; then
        cp "$KIT/MANIFEST.txt" "$SITE/.gpukit-manifest"
        say "wheels: installed $(ls "$KIT"/wheels | wc -l) into $SITE"
    else
        say "session.sh: installing the wheels failed"
        exit 2
    fi
else
    say "wheels: not installed: they are for CPython 3.12 and $PY is $("$PY" -V 2>&1); using $SITE as it is"
fi
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg CHATFT_CACHE_DIR=${CHATFT_CACHE_DIR:-$HOME/.cache/chatft}
export CHATFT_BENCH_DATA=$KIT/bench-data  # the gpu-* workloads' synthetic rows, made by kit.sh

# bench/data.py and the tests read ../shared/data beside the checkout, else /work/shared/data: point one at the kit.
shared=$(dirname "$ROOT")/shared/data
if [ -f "$shared/alpaca_en_demo.json" ] || [ -f /work/shared/data/alpaca_en_demo.json ]; then
    say "shared data: present already"
else
    linked=""
    for target in "$shared" /work/shared/data; do
        [ -e "$target" ] && continue
        if mkdir -p "$(dirname "$target")" 2>/dev/null && ln -s "$KIT/data" "$target" 2>/dev/null; then
            linked=$target
            break
        fi
    done
    say "shared data: ${linked:+$linked -> $KIT/data}${linked:-not linked (only the cpu-* workloads need it)}"
fi

{
    echo "-- nvidia-smi"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo "-- python and packages (first on the path wins: $SITE, then src, then the image)"
    "$PY" - <<'PYEOF' 2>&1
import importlib
import importlib.metadata as md
import platform

print("python", platform.python_version())
for module, dist in [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("trl", "trl"),
                     ("accelerate", "accelerate"), ("datasets", "datasets"), ("tokenizers", "tokenizers"),
                     ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"), ("pydantic", "pydantic"),
                     ("omegaconf", "omegaconf"), ("typing_extensions", "typing-extensions"), ("fsspec", "fsspec"),
                     ("pyarrow", "pyarrow"), ("pandas", "pandas"), ("numpy", "numpy"), ("flash_attn", "flash-attn"),
                     ("chatft", None)]:
    try:
        mod = importlib.import_module(module)
        version = getattr(mod, "__version__", None) or (md.version(dist) if dist else "?")
        print(f"{module:18} {version:24} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # a missing or broken package is a finding, not a stop
        print(f"{module:18} {'-':24} {type(exc).__name__}: {str(exc)[:150]}")
try:
    import torch
except ImportError:
    torch = None
if torch is not None and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
else:
    print("torch sees no CUDA device")
PYEOF
    echo "-- pip check (conflicts among what is on the path)"
    "$PY" -m pip check 2>&1 | head -40
    echo "-- disk and memory"
    mkdir -p "$CHATFT_CACHE_DIR"
    df -h "$CHATFT_CACHE_DIR" "$BENCH_OUT" /tmp 2>&1
    free -g 2>&1 | head -2
    nproc
} 2>&1 | tee -a "$SESSION"
say "set-up: $((SECONDS - began)) s"

# ------------------------------------------------------------------ steps
results=()
failed=0
command -v timeout >/dev/null || timeout() { shift 2; "$@"; }  # no coreutils timeout: steps run unlimited
run_step() {  # NAME LIMIT_S COMMAND...: output to stdout and $OUT/NAME.log; killed (with its children) at the limit
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    say "== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && say "$name: stopped at its ${limit}s limit"
    results+=("$(printf '%-6s rc %-3s %5s s' "$name" "$rc" $((SECONDS - start)))")
    say "== $name: rc $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || failed=1
}

collect() {  # STEP DIR ITEM...: one $OUT/STEP-work.tgz of DIR's ITEMs (WORKLOAD.json, .md, .work/, profiles)
    local step=$1 dir=$2 item items=()
    shift 2
    for item in "$@"; do
        [ -e "$dir/$item" ] && items+=("$item")
    done
    [ ${#items[@]} -gt 0 ] || return 0
    tar -czf "$OUT/$step-work.tgz" -C "$dir" --exclude='run_*' --exclude='*.jsonl' --exclude='model' \
        --exclude='probe' --exclude='*.safetensors' "${items[@]}"
    if [ "$(stat -c %s "$OUT/$step-work.tgz")" -gt $((15 * 1024 * 1024)) ]; then
        rm -f "$OUT/$step-work.tgz"
        say "$step-work.tgz was over 15 MiB and was left out"
    fi
}

bench() {  # WORKLOAD PEERS [bench/run.py options...]; into $BENCH_DIR ($BENCH_OUT unless set)
    local workload=$1 peers=$2 dir=${BENCH_DIR:-$BENCH_OUT}
    shift 2
    rm -rf "$dir/$workload.json" "$dir/$workload.md" "$dir/$workload.work"
    echo "+ $PY bench/run.py --workload $workload --peers $peers --model $KIT/tokenizer --out $dir $*"
    "$PY" bench/run.py --workload "$workload" --peers "$peers" --model "$KIT/tokenizer" --out "$dir" "$@"
}
quick_benches() {  # both workloads at toy size; both run even if the first fails
    local rc=0
    bench gpu-small-full trl,trl-packed,trl-padding-free --quick || rc=1
    bench gpu-8b-lora trl --quick || rc=1
    return $rc
}
small_bench() {
    bench gpu-small-full "$SMALL_PEERS" --steps "$SMALL_STEPS" --warmup "$SMALL_WARMUP" --repeats "$SMALL_REPEATS"
}
profile_benches() {  # chatft's default and packed layouts under torch.profiler, the big workload first
    local rc=0 workload
    rm -rf "$PROFILE_OUT"
    mkdir -p "$PROFILE_OUT/profiles"
    for workload in gpu-8b-lora gpu-small-full; do
        BENCH_DIR=$PROFILE_OUT CHATFT_BENCH_PROFILE=$PROFILE_OUT/profiles bench "$workload" "$PROFILE_PEERS" \
            --steps "$PROFILE_STEPS" --warmup 1 --repeats 1 || rc=1
    done
    return $rc
}
big_bench() {
    bench gpu-8b-lora "$B8_PEERS" --steps "$B8_STEPS" --warmup "$B8_WARMUP" --repeats "$B8_REPEATS" \
        --activation-checkpointing "$B8_CHECKPOINTING"
}
# `timeout` runs programs, not shell functions: the steps run in a child bash that gets these.
export -f bench quick_benches small_bench big_bench profile_benches
PROFILE_OUT=$BENCH_OUT/profile
export PY KIT BENCH_OUT PROFILE_OUT PROFILE_STEPS PROFILE_PEERS SMALL_STEPS SMALL_WARMUP SMALL_REPEATS B8_STEPS B8_WARMUP B8_REPEATS SMALL_PEERS B8_PEERS \
    B8_CHECKPOINTING

# The gpu-* workloads' random models are built on the GPU in the background from the start, beside the steps
# before them (gpu-small-full's 1 GB, then gpu-8b-lora's 16 GB). The first benchmark step waits for the build to
# end: a build beside a benchmark would disturb its timings, and one started by the benchmark itself would race it.
build_pid=""
BUILD_LOG=$BENCH_OUT/build.log
BUILD_LIMIT=${GPUKIT_LIMIT_BUILD:-300}  # seconds from the build's start; then it is stopped and 8b builds on CPU
builds=()
[[ " ${steps[*]} " == *" small "* ]] && builds+=(gpu-small-full)
[[ " ${steps[*]} " == *" 8b "* || " ${steps[*]} " == *" profile "* ]] && builds+=(gpu-8b-lora)
[[ " ${steps[*]} " == *" profile "* && ! " ${builds[*]} " == *" gpu-small-full "* ]] && builds+=(gpu-small-full)
if [ ${#builds[@]} -gt 0 ]; then
    say "== build: the random models of ${builds[*]}, in the background ($BUILD_LOG)"
    build_began=$SECONDS
    (
        for workload in "${builds[@]}"; do
            "$PY" bench/run.py --workload "$workload" --build-model --model "$KIT/tokenizer" || exit $?
        done
    ) >"$BUILD_LOG" 2>&1 &
    build_pid=$!
fi
wait_for_build() {
    [ -n "$build_pid" ] || return 0
    local rc=0
    while kill -0 "$build_pid" 2>/dev/null && [ $((SECONDS - build_began)) -lt "$BUILD_LIMIT" ]; do sleep 2; done
    if kill -0 "$build_pid" 2>/dev/null; then
        say "build: still running after ${BUILD_LIMIT}s: stopped"
        pkill -P "$build_pid" 2>/dev/null
        kill "$build_pid" 2>/dev/null
    fi
    wait "$build_pid" || rc=$?
    say "== build: rc $rc, $((SECONDS - build_began)) s from its start; its log:"
    tail -n 15 "$BUILD_LOG" | tee -a "$SESSION"
    build_pid=""
}

for step in "${steps[@]}"; do
    case "$step" in
        tests) run_step tests "$LIMIT_TESTS" "$PY" -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py ;;
        quick) run_step quick "$LIMIT_QUICK" bash -c quick_benches
               collect quick "$BENCH_OUT" gpu-small-full.{json,md,work} gpu-8b-lora.{json,md,work} ;;
        small) wait_for_build; run_step small "$LIMIT_SMALL" bash -c small_bench
               collect small "$BENCH_OUT" gpu-small-full.{json,md,work} ;;
        8b) wait_for_build; run_step 8b "$LIMIT_8B" bash -c big_bench; collect 8b "$BENCH_OUT" gpu-8b-lora.{json,md,work} ;;
        profile) wait_for_build; run_step profile "$LIMIT_PROFILE" bash -c profile_benches
                 collect profile "$PROFILE_OUT" profiles gpu-8b-lora.{json,md,work} gpu-small-full.{json,md,work} ;;
    esac
done

say "== summary (${steps[*]}), $((SECONDS - began)) s in all"
for line in "${results[@]}"; do say "  $line"; done
files=$(find "$OUT" -type f | wc -l)
say "  $OUT: $files files$([ "$files" -gt 8 ] && echo ' (the device sends back at most 8: run fewer steps per call)')"
exit $failed
