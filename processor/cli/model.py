"""`guardstream make-test-model` and `guardstream score`: a test checkpoint; a conversation offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from processor.model.testmodel import TEST_MODEL_SIZES

    make = subparsers.add_parser(
        "make-test-model",
        help="write a random-weight checkpoint in the official layout, with a real Qwen3 tokenizer",
    )
    make.add_argument("dir", type=Path)
    make.add_argument("--size", choices=TEST_MODEL_SIZES, default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--shards", type=int, default=1, help="write N safetensors shards plus an index")
    make.set_defaults(handler=make_test_model)

    score = subparsers.add_parser("score", help="moderate one whole conversation offline (JSON lines)")
    score.add_argument("--model", required=True, help="checkpoint folder or hub id")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", type=Path, help="JSON list of templated token ids")
    source.add_argument("--messages", type=Path, help='JSON {"messages": [{"role", "content"}]}')
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    score.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)"
    )
    score.add_argument("--all-heads", action="store_true", help="add every head's class probabilities")
    score.add_argument("--chunk-size", type=int, default=None, help="feed K tokens at a time (KV cache)")
    score.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="as the worker's (auto: float16 where the C kernel runs, the model's dtype elsewhere), so "
        "that score gives a worker's numbers; float32: exact",
    )
    score.add_argument(
        "--attention-backend",
        default="auto",
        help="auto, sdpa, flex, paged_cpu or triton, as the worker's (auto: the C kernel on a CPU in "
        "float32, SDPA elsewhere; triton: CUDA, or a CPU under TRITON_INTERPRET=1)",
    )
    score.set_defaults(handler=score_command)


def make_test_model(args: argparse.Namespace) -> int:
    from processor.model.testmodel import write_test_model

    path = write_test_model(args.dir, size=args.size, seed=args.seed, shards=args.shards)
    print(f"wrote a random-weight {args.size} checkpoint to {path} (its verdicts are random)")
    return 0


def score_command(args: argparse.Namespace) -> int:
    from processor.model.loader import load_guard_model
    from processor.score import score_ids, template_messages

    if args.chunk_size is not None and args.chunk_size < 1:
        print("--chunk-size must be at least 1", file=sys.stderr)
        return 2
    model = load_guard_model(args.model, device=args.device, dtype=args.dtype)
    if args.ids is not None:
        token_ids = json.loads(args.ids.read_text())
        if not isinstance(token_ids, list) or not all(isinstance(token, int) for token in token_ids):
            print(f"{args.ids} must hold a JSON list of integer token ids", file=sys.stderr)
            return 2
    else:
        token_ids = template_messages(model, json.loads(args.messages.read_text())["messages"])
    out_of_vocabulary = [token for token in token_ids if not 0 <= token < model.config.vocab_size]
    if out_of_vocabulary:
        print(
            f"token ids outside the vocabulary (0..{model.config.vocab_size - 1}): {out_of_vocabulary[:5]}",
            file=sys.stderr,
        )
        return 2
    verdicts = score_ids(
        model,
        token_ids,
        chunk_size=args.chunk_size,
        all_heads=args.all_heads,
        kv_cache_dtype=args.kv_cache_dtype,
        attention_backend=args.attention_backend,
    )
    for verdict in verdicts:
        print(json.dumps(verdict.as_json()))
    return 0
