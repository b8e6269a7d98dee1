#!/usr/bin/env python
"""Tokenise a jsonl corpus into Megatron-compatible ``.bin``/``.idx`` datasets.

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2

writes ``data/corpus_text_document.bin/.idx``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.data.preprocess import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    format_summary,
    preprocess,
)
from megatron_normformer.data.tokenizers import TokenizerError, add_tokenizer_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="jsonl file, optionally .gz")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenise")
    group.add_argument("--split-sentences", action="store_true", help="one sequence per sentence")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed lines (counted in the summary) instead of stopping")
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output data")
    group.add_argument("--append-eod", action="store_true", help="end every document with <eod>")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokeniser processes")
    group.add_argument("--log-interval", type=int, default=10000, help="lines between reports")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        json_keys=tuple(args.json_keys),
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        workers=args.workers,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
    )
    try:
        summary = preprocess(config)
    except (PreprocessError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    print(format_summary(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
