"""GPU checks in one short run (the device is lent by the minute):
1. the engine on CUDA gives the CPU's float32 results (tiny checkpoint, mixed ragged batch);
2. every attention backend on CUDA gives the portable backend's results;
3. bf16 on CUDA agrees with float32 on labels for most tokens (random weights: a sanity bound only).

    python bench/gpu_check.py CHECKPOINT_DIR
    python bench/gpu_check.py CHECKPOINT_DIR --compiled   # the same with the worker's mypyc-compiled
                                                           # modules (processor/compiled.py), as it runs

--compiled exits 2, saying why, where they cannot be built (no mypy, no C compiler, no Python headers).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def max_difference(left: dict, right: dict) -> float:
    return max((torch.tensor(left[name]) - torch.tensor(right[name])).abs().max().item() for name in left)


def main(checkpoint: str) -> int:
    # Imported here, not above: with --compiled the compiled modules must be active before the engine's
    # first import.
    from processor.model import load_guard_model
    from processor.model.attention import ATTENTION_BACKENDS, CPU_ONLY_BACKENDS
    from tests.engine.test_attention_backends import run_mixed_batch

    cpu = run_mixed_batch(load_guard_model(checkpoint, device="cpu", dtype="float32"), "sdpa")
    cuda_model = load_guard_model(checkpoint, device="cuda", dtype="float32")
    failures = 0
    for backend in sorted(set(ATTENTION_BACKENDS) - CPU_ONLY_BACKENDS):
        difference = max_difference(cpu, run_mixed_batch(cuda_model, backend))
        ok = difference < 1e-4
        failures += not ok
        verdict = "OK" if ok else "FAIL"
        print(f"cuda float32 {backend:5} vs cpu float32 sdpa: max |dp| = {difference:.2e} {verdict}")
    bf16 = run_mixed_batch(load_guard_model(checkpoint, device="cuda", dtype="bfloat16"), "sdpa")
    agree = total = 0
    for name in cpu:
        for exact, low in zip(cpu[name], bf16[name], strict=True):
            agree += exact.index(max(exact)) == low.index(max(low))
            total += 1
    worst = max_difference(cpu, bf16)
    print(f"cuda bf16 vs cpu float32: argmax agrees on {agree}/{total} tokens; max |dp| = {worst:.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--compiled", action="store_true", help="with the compiled modules active")
    args = parser.parse_args()
    if args.compiled:
        logging.basicConfig(level=logging.INFO)  # activate() says why when it cannot build
        from processor import compiled

        if not compiled.activate():
            print("FAIL: the compiled modules are not active (the reason is logged above)")
            sys.exit(2)
        print("compiled modules active:", ", ".join(compiled.HOT_MODULES))
    sys.exit(main(args.checkpoint))
