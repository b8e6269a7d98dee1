"""The flags of the benchmarks that train on text: the data (the demo corpus of `make demo` by
default, any preprocessed dataset with its tokenizer otherwise, random tokens for the tests) and
the small model's shape."""
from __future__ import annotations

import argparse
import os
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "data", "demo_text_document")
DEMO_SENTENCES = os.path.join(ROOT, "data", "demo_text_sentence")
DEMO_SPM = os.path.join(ROOT, "data", "demo_spm.model")


def add_data_args(parser: argparse.ArgumentParser, mock: bool = False) -> None:
    d = parser.add_argument_group("data (default: the demo corpus that `make demo` builds)")
    d.add_argument("--data-path", default=None)
    d.add_argument("--tokenizer-type", default=None)
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--vocab-file", default=None)
    d.add_argument("--merge-file", default=None)
    d.add_argument("--split", default="95,5,0")
    if mock:
        d.add_argument("--mock-data", action="store_true", help="random tokens (tests); needs --vocab-size")
    d.add_argument("--vocab-size", type=int, default=None, help="with --mock-data or the NullTokenizer")


def data_flags(args, sentences: bool = False) -> List[str]:
    """The ``pretrain_gpt.py`` / ``pretrain_bert.py`` flags of the data (fills in the demo corpus
    when none is given: its documents, or with ``sentences`` its sentence-split form for the masked
    LM)."""
    if getattr(args, "mock_data", False):
        if not args.vocab_size:
            raise SystemExit("error: --mock-data needs --vocab-size")
        return ["--mock-data", "--vocab-size", str(args.vocab_size)]
    if args.data_path is None:
        args.data_path = DEMO_SENTENCES if sentences else DEMO_DATA
        args.tokenizer_type = args.tokenizer_type or "SentencePieceTokenizer"
        args.tokenizer_model = args.tokenizer_model or DEMO_SPM
        if not os.path.exists(args.data_path + ".idx"):
            how = ("tools/preprocess_data.py --input data/demo.jsonl --split-sentences --tokenizer-type "
                   "SentencePieceTokenizer --tokenizer-model data/demo_spm.model --output-prefix data/demo"
                   if sentences else "`make demo` (or python tools/demo.py)")
            raise SystemExit(f"error: {args.data_path}.idx is missing: run {how} first, or give "
                             "--data-path and tokenizer flags")
    if not os.path.exists(args.data_path + ".idx"):
        raise SystemExit(f"error: --data-path {args.data_path}: no {args.data_path}.idx")
    if args.tokenizer_type is None:
        raise SystemExit("error: --tokenizer-type is required with --data-path")
    flags = ["--data-path", args.data_path, "--tokenizer-type", args.tokenizer_type]
    for name in ("tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
        if getattr(args, name):
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return flags + ["--split", args.split]


def vocab_size(args) -> int:
    if getattr(args, "mock_data", False):
        return args.vocab_size
    from megatron_normformer.data import build_tokenizer

    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                           args.merge_file, args.vocab_size).vocab_size


def add_model_shape_args(parser: argparse.ArgumentParser, title: str):
    """The small model both benchmarks train (4 x 128, 4 heads, sequence 128, micro batch 8);
    returns the group for the benchmark's own recipe flags."""
    m = parser.add_argument_group(title)
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--seq-length", type=int, default=128)
    m.add_argument("--micro-batch-size", type=int, default=8)
    return m
