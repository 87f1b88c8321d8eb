#!/usr/bin/env bash
# Every GPU check and benchmark in one run of at most 8 minutes, for a lent GPU machine (device time is
# counted by the minute). That machine has torch and triton but no package index; nothing here needs
# more than the project's runtime dependencies (transformers and safetensors among them): the checks
# build their random-weight checkpoint from token ids (no tokenizer package), and the benchmarks build
# theirs in memory. Anything else it lacks would travel in .gpu/ (64 MiB at most): .gpu/wheels/*.whl
# are installed first, when there are any.
#
#     bash bench/gpu_session.sh OUT_DIR        # logs and JSON land in OUT_DIR; a summary is printed last
#     GPU_SESSION_DRY_RUN=1 bash bench/gpu_session.sh OUT_DIR   # on a CPU: each step's plumbing, briefly
#
# Steps, each under a time limit that keeps the whole within 8 minutes:
#   1. gpu_check (150 s): float32 on CUDA against the CPU (max |dp| < 1e-4), eager backends and triton with
#      CUDA graphs; bf16 triton, eager and graphed, against eager sdpa (>= 99.5% labels, max |dp| <= 0.02).
#   2. gpu_steps (270 s, its rows stop at 240 s): eager sdpa, triton eager and triton + graphs side by side:
#      0.6b-shape at 64/256/1,024 conversations and context 64/512, worker-shaped steps (1-9 tokens,
#      200 conversations, context 256/1,024), 4b-shape at 256/context 64: tokens/s, ms a step, GPU ms,
#      host ms, graph hit rate, capture time and memory, fraction of the HBM roofline.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1  # a step cut off by its time limit keeps what it printed
dry=${GPU_SESSION_DRY_RUN:-0}
summary=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, record pass/fail
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - started))")")
    tail -n 40 "$out/$name.log"
}

if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
fi
if [ "$dry" = 1 ]; then
    python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, "dry run on the CPU")'
    step gpu_check 300 python3 bench/gpu_check.py --device cpu
    step gpu_steps 300 python3 bench/gpu_steps.py --device cpu --quick --out "$out/gpu-steps.json"
else
    nvidia-smi -L
    python3 -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())'
    step gpu_check 150 python3 bench/gpu_check.py
    step gpu_steps 270 python3 bench/gpu_steps.py --deadline 240 --out "$out/gpu-steps.json"
fi
printf '%s\n' "${summary[@]}"
