#!/usr/bin/env python
"""Validation perplexity of a checkpoint on a preprocessed dataset.

Samples are built exactly as in training (``--data-path``, ``--split``, ``--seq-length``; seed
``--seed``) and the ``--eval-split`` part is scored: ``--eval-iters`` micro-batches, or one full
pass over it when ``--eval-iters`` is 0. Prints the mean token loss and its exponential.

Example::

    python tools/evaluate_ppl.py --load ckpt/release --data-path data/demo_text_document \\
        --split 98,1,1 --seq-length 1024 --micro-batch-size 8 --json-output ppl.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402
from megatron_normformer.inference import cli  # noqa: E402

SPLITS = ("train", "valid", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="Dataset prefix(es), optionally weighted: [w1] p1 [w2] p2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test document proportions.")
    g.add_argument("--eval-split", choices=SPLITS, default="valid", help="Which split to score.")
    g.add_argument("--seq-length", type=int, default=None,
                   help="Tokens per sample (default: the model's max_position_embeddings).")
    g.add_argument("--eval-iters", type=int, default=0,
                   help="Micro-batches to score; 0 = one full pass over the split.")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--seed", type=int, default=1234, help="Seed of the sample shuffle.")
    g.add_argument("--data-cache-path", default=None, help="Where the sample index arrays live.")
    g.add_argument("--json-output", default=None, help="Also write the numbers as JSON here.")
    return parser


def main(argv=None) -> int:
    from megatron_normformer.data import build_train_valid_test_datasets
    from megatron_normformer.inference.perplexity import evaluate_perplexity

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.eval_iters < 0 or args.micro_batch_size < 1:
            raise ConfigError("--eval-iters must be >= 0 and --micro-batch-size positive")
        pstate = cli.parallel_state_from_env()
        model, cfg = cli.load_model_from_args(args, pstate)
        seq_length = args.seq_length or cfg.max_position_embeddings
        if cfg.max_sequence_length is not None and seq_length > cfg.max_sequence_length:
            raise ConfigError(f"--seq-length ({seq_length}) exceeds the checkpoint's "
                              f"max_position_embeddings ({cfg.max_position_embeddings})")
        wanted = [0, 0, 0]
        which = SPLITS.index(args.eval_split)
        wanted[which] = args.eval_iters * args.micro_batch_size if args.eval_iters else None
        try:
            datasets = build_train_valid_test_datasets(
                args.data_path, args.split, seq_length, args.seed, wanted, args.data_cache_path)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from None
        dataset = datasets[which]
        if dataset is None:
            raise ConfigError(f"--split {args.split} leaves the {args.eval_split} split empty")
        result = evaluate_perplexity(model, dataset, args.micro_batch_size, args.eval_iters or None)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    result.update(load=args.load, data_path=args.data_path, split=args.split,
                  eval_split=args.eval_split, seq_length=seq_length)
    if pstate.rank == 0:
        print(f"{args.eval_split} loss {result['loss']:.6f} | ppl {result['ppl']:.4f} | "
              f"{result['tokens']} tokens in {result['samples']} samples")
        if args.json_output:
            with open(args.json_output, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
