#!/usr/bin/env python
"""Generate text from a trained checkpoint: greedy, temperature, top-k and top-p, with a KV cache.

Prompts come from ``--prompt``, ``--prompt-file`` (one per line) or, with neither, stdin (one per
line until EOF; interactive in a terminal). Generation stops at the tokenizer's end-of-document
token or after ``--max-new-tokens``.

Examples::

    python tools/generate.py --load ckpt/release --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model sp.model --prompt "The module" --top-p 0.9 --temperature 0.8
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt/ ... --greedy   # TP=2
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402
from megatron_normformer.inference import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(parser)
    cli.add_tokenizer_args(parser)
    g = parser.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", help="A prompt (repeatable).")
    g.add_argument("--prompt-file", help="A text file with one prompt per line.")
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="Argmax decoding.")
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy.")
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter.")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter.")
    g.add_argument("--seed", type=int, default=1234, help="Seed of the sampling generator.")
    g.add_argument("--batch-size", type=int, default=8, help="Prompts decoded together.")
    g.add_argument("--no-kv-cache", action="store_true",
                   help="Recompute the whole sequence every step (slow; a reference).")
    g.add_argument("--json", action="store_true",
                   help="One JSON object per prompt: prompt, text, tokens, finish_reason.")
    return parser


def read_prompts(args):
    if args.prompt and args.prompt_file:
        raise ConfigError("give --prompt or --prompt-file, not both")
    if args.prompt:
        yield from args.prompt
    elif args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ConfigError(f"--prompt-file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    else:
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("prompt> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                yield line.rstrip("\n")


def main(argv=None) -> int:
    from megatron_normformer.inference.generation import generate
    from megatron_normformer.inference.cli import check_tokenizer
    from megatron_normformer.inference.sampling import SamplingConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling = SamplingConfig(args.greedy, args.temperature, args.top_k, args.top_p).validate()
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
        tokenizer = cli.tokenizer_from_args(args)
        pstate = cli.parallel_state_from_env()
        model, cfg = cli.load_model_from_args(args, pstate)
        check_tokenizer(tokenizer, cfg)
        prompts = read_prompts(args)
        is_printer = pstate.rank == 0
        # stdin prompts go one at a time (interactive); listed prompts in batches.
        batch_size = args.batch_size if (args.prompt or args.prompt_file) else 1
        pending = []

        def flush():
            ids = [tokenizer.encode(p) or [tokenizer.eod] for p in pending]
            result = generate(model, ids, args.max_new_tokens, sampling, eod=tokenizer.eod,
                              use_cache=not args.no_kv_cache, seed=args.seed)
            for prompt, prompt_ids, tokens, reason in zip(pending, ids, result.tokens,
                                                          result.finish_reasons):
                # Decode with the prompt and cut it off: pieces that start a word carry their
                # leading space only in context (SentencePiece, byte-level BPE).
                prefix = tokenizer.decode(prompt_ids)
                full = tokenizer.decode(prompt_ids + list(tokens))
                text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(tokens)
                if not is_printer:
                    continue
                if args.json:
                    print(json.dumps({"prompt": prompt, "text": text, "tokens": tokens,
                                      "finish_reason": reason}), flush=True)
                else:
                    print(prompt + text, flush=True)
            pending.clear()

        for prompt in prompts:
            pending.append(prompt)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
