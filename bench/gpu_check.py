"""GPU correctness in one short run (the device is lent by the minute), on a random-weight test
checkpoint (the `small` shape: 4 layers, GQA groups of 2), one mixed ragged batch (prompts, chunks and
single tokens of several conversations in shared steps):

1. float32 on CUDA against float32 on the CPU (sdpa), max |dp| < 1e-4: every CUDA attention backend
   eager, and triton with CUDA graphs (every step in a bucket; and with small buckets, so that steps
   fall back to eager in between);
2. bf16 on CUDA, triton eager and triton with graphs against eager sdpa in bf16: argmax labels
   identical for at least 99.5% of the tokens and heads, max |dp| <= 0.02.

    python bench/gpu_check.py                 # exit status 1 when a check fails
    python bench/gpu_check.py --device cpu    # the plumbing on a CPU: float32 sdpa against itself
    TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu   # and the triton variants, interpreted
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from processor.engine import EngineConfig, GuardEngine
from processor.engine.kv_cache import bytes_per_token
from processor.model import load_guard_model
from processor.model.attention import triton_interpreted
from processor.model.loader import GuardModel
from processor.model.testmodel import CHECKPOINT_SHAPES, _write_weights, checkpoint_config, tensor_specs
from processor.model.tokenizer import SpecialTokenIds

# Qwen3's special ids written out: the GPU machine lacks the package that builds the tokenizer, and
# the check feeds token ids only.
QWEN3_IDS = SpecialTokenIds(151644, 151645, 151643, 151667, 151668, 198, 271, 872, 77091)
FLOAT32_TOLERANCE = 1e-4
BF16_LABEL_AGREEMENT = 0.995
BF16_TOLERANCE = 0.02
# name -> engine settings; "graphs, small buckets" leaves many steps to the eager fallback.
VARIANTS: dict[str, dict] = {
    "sdpa": {"attention_backend": "sdpa"},
    "flex": {"attention_backend": "flex"},
    "triton": {"attention_backend": "triton"},
    "triton + graphs": {"attention_backend": "triton", "cuda_graphs": True},
    "triton + graphs, small buckets": {
        "attention_backend": "triton",
        "cuda_graphs": True,
        "cuda_graph_max_conversations": 4,
        "cuda_graph_max_tokens": 32,
    },
}


def write_checkpoint(folder: Path, size: str = "small") -> Path:
    """The test checkpoint's config and weights (no tokenizer files)."""
    shape = CHECKPOINT_SHAPES[size]
    (folder / "config.json").write_text(json.dumps(checkpoint_config(shape, QWEN3_IDS)))
    _write_weights(folder, tensor_specs(shape), seed=0, shards=1)
    return folder


def mixed_batch(model: GuardModel, settings: dict) -> tuple[dict[str, list[list[float]]], int, int]:
    """Every head's probabilities, token after token of every conversation (head -> rows), and the
    engine's graph and eager step counts."""
    rng = random.Random(11)
    engine = GuardEngine(
        model,
        EngineConfig(
            block_size=8,
            kv_cache_bytes=4096 * bytes_per_token(model.config, torch.float32),
            kv_cache_dtype="float32" if model.dtype == torch.float32 else "auto",
            keep_probabilities=True,
            **settings,
        ),
    )
    conversations = {f"c{i}": [rng.randrange(150_000) for _ in range(rng.randint(5, 200))] for i in range(8)}
    rows: dict[str, dict[str, list[list[float]]]] = {name: {} for name in conversations}
    fed = dict.fromkeys(conversations, 0)
    while any(fed[name] < len(tokens) for name, tokens in conversations.items()):
        for name in rng.sample(sorted(conversations), rng.randint(1, len(conversations))):
            tokens, size = conversations[name], rng.choice([1, 1, 2, 5, 9, 40])
            if fed[name] < len(tokens):
                engine.submit(name, tokens[fed[name] : fed[name] + size])
                fed[name] += size
        for result in engine.run_until_idle():
            for head, head_rows in result.probabilities.items():
                rows[result.conversation_id].setdefault(head, []).extend(head_rows)
    by_head: dict[str, list[list[float]]] = {}
    for name in sorted(conversations):
        for head, head_rows in rows[name].items():
            by_head.setdefault(head, []).extend(head_rows)
    stats = engine.stats()
    return by_head, stats.graph_steps, stats.eager_steps


def max_difference(left: dict, right: dict) -> float:
    return max((torch.tensor(left[head]) - torch.tensor(right[head])).abs().max().item() for head in right)


def label_agreement(left: dict, right: dict) -> float:
    agree = total = 0
    for head in right:
        agree += (torch.tensor(left[head]).argmax(-1) == torch.tensor(right[head]).argmax(-1)).sum().item()
        total += len(right[head])
    return agree / total


def check_float32(model: GuardModel, reference: dict, names: list[str]) -> int:
    """Each variant's float32 probabilities against the CPU's; returns the number that failed."""
    failures = 0
    for name in names:
        try:
            probabilities, graph_steps, eager_steps = mixed_batch(model, VARIANTS[name])
            difference = max_difference(probabilities, reference)
        except Exception as error:  # one broken variant must not hide the others' results
            print(f"{model.device.type} float32 {name:32} FAIL {type(error).__name__}: {error}")
            failures += 1
            continue
        ok = difference < FLOAT32_TOLERANCE
        failures += not ok
        verdict = "OK" if ok else "FAIL"
        print(
            f"{model.device.type} float32 {name:32} vs cpu float32: max |dp| {difference:.2e}, "
            f"graph/eager steps {graph_steps}/{eager_steps} {verdict}"
        )
    return failures


def check_bf16(model: GuardModel, reference: dict) -> int:
    """triton, eager and graphed, against eager sdpa, all in bf16; returns the number that failed."""
    failures = 0
    baseline, _, _ = mixed_batch(model, VARIANTS["sdpa"])
    agreement = label_agreement(baseline, reference)
    print(f"cuda bf16 sdpa vs cpu float32: labels {agreement:.2%} identical (random weights: for scale)")
    for name in ("triton", "triton + graphs", "triton + graphs, small buckets"):
        try:
            probabilities, graph_steps, eager_steps = mixed_batch(model, VARIANTS[name])
        except Exception as error:
            print(f"cuda bf16 {name:32} FAIL {type(error).__name__}: {error}")
            failures += 1
            continue
        agreement = label_agreement(probabilities, baseline)
        difference = max_difference(probabilities, baseline)
        ok = agreement >= BF16_LABEL_AGREEMENT and difference <= BF16_TOLERANCE
        failures += not ok
        print(
            f"cuda bf16 {name:32} vs cuda bf16 sdpa: labels {agreement:.2%} identical, max |dp| "
            f"{difference:.3f}, graph/eager steps {graph_steps}/{eager_steps} {'OK' if ok else 'FAIL'}"
        )
    return failures


def main(device: str) -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_checkpoint(Path(folder))
        reference, _, _ = mixed_batch(
            load_guard_model(checkpoint, device="cpu", dtype="float32"), VARIANTS["sdpa"]
        )
        float32 = load_guard_model(checkpoint, device=device, dtype="float32")
        names = [name for name in VARIANTS if name != "flex"] if device == "cuda" else ["sdpa"]
        if device == "cpu" and triton_interpreted():  # the triton variants' plumbing, slowly
            names += [name for name in VARIANTS if name.startswith("triton")]
        failures += check_float32(float32, reference, names)
        if device == "cuda":
            failures += check_bf16(load_guard_model(checkpoint, device=device, dtype="bfloat16"), reference)
            # Last: torch.compile's first build of the flex kernel is the slowest step here.
            failures += check_float32(float32, reference, ["flex"])
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    sys.exit(main(args.device))
