#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a local corpus (nothing is downloaded).

The model defines ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2 (cls), ``</s>`` = 3 (eod and sep) and
a ``<mask>`` control symbol, so it serves both GPT (eod) and masked-LM (cls/sep/pad/mask) data.

Example::

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8000 --output-prefix tok/sp
"""
import argparse
import json
import os
import sys
from typing import Iterator, Sequence

SPECIALS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
CONTROL_SYMBOLS = ["<mask>"]


def iter_lines(path: str, json_keys: Sequence[str]) -> Iterator[str]:
    """Non-empty text lines of a .txt file or of the ``json_keys`` fields of a .jsonl file."""
    is_jsonl = path.endswith((".jsonl", ".json", ".jsonl.gz"))
    opener = __import__("gzip").open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not is_jsonl:
                texts = [line]
            elif not line.strip():
                continue
            else:
                try:
                    record = json.loads(line)
                    texts = [record[key] for key in json_keys]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{lineno}: cannot read {list(json_keys)} ({error})") from None
            for text in texts:
                for piece in str(text).split("\n"):
                    if piece.strip():
                        yield piece.strip()


def train(input_path: str, output_prefix: str, vocab_size: int, model_type: str,
          json_keys: Sequence[str] = ("text",), character_coverage: float = 0.9995,
          max_sentences: int = 2_000_000, byte_fallback: bool = True) -> str:
    """Train and write ``{output_prefix}.model`` (and ``.vocab``); returns the model path."""
    import sentencepiece

    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter_lines(input_path, json_keys),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        # Characters outside the vocabulary become their UTF-8 bytes (<0x..> pieces), so every
        # text round-trips instead of decoding as the unknown piece.
        byte_fallback=byte_fallback,
        control_symbols=CONTROL_SYMBOLS,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **SPECIALS,
    )
    return output_prefix + ".model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help=".jsonl (text under --json-keys) or .txt")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--no-byte-fallback", action="store_false", dest="byte_fallback",
                        help="Map characters outside the vocabulary to <unk> instead of their UTF-8 "
                             "bytes (byte fallback needs 256 of the --vocab-size pieces)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: file not found", file=sys.stderr)
        return 1
    try:
        model = train(args.input, args.output_prefix, args.vocab_size, args.model_type,
                      args.json_keys, args.character_coverage, byte_fallback=args.byte_fallback)
    except (ValueError, RuntimeError) as error:
        print(f"error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"wrote {model}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
