#!/usr/bin/env python
"""Move checkpoints between layouts, or export the release format.

    # any (TP, PP, ZeRO) training checkpoint -> one consolidated fp32 safetensors file + config JSON
    python tools/convert_checkpoint.py --load runs/ckpt --output-consolidated release/model

    # a training checkpoint -> a checkpoint for another (TP, PP), optimizer state included
    python tools/convert_checkpoint.py --load runs/ckpt --save runs/ckpt_tp4 --target-tp 4 --target-pp 1
    # (Megatron-LM's names work too: --target-tensor-parallel-size, --target-pipeline-parallel-size)

    # a consolidated file -> a checkpoint to start training from (fresh optimizer)
    python tools/convert_checkpoint.py --load release/model.safetensors --save runs/init --target-tp 2

``pretrain_gpt.py --load`` also resumes a training checkpoint in a different layout directly; the
re-sharded copy saves every rank from reading the full tensors at start-up.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="A training checkpoint directory (its 'latest' tag) or a consolidated "
                             ".safetensors file.")
    parser.add_argument("--tag", default=None, help="Checkpoint tag to read instead of 'latest'.")
    parser.add_argument("--output-consolidated", default=None, metavar="PATH",
                        help="Write PATH.safetensors (full fp32 tensors) and PATH.json (model config).")
    parser.add_argument("--save", default=None, help="Write a checkpoint for --target-tp/--target-pp here.")
    parser.add_argument("--target-tensor-parallel-size", "--target-tp", dest="target_tp", type=int,
                        default=1, help="Tensor-parallel degree of --save (Megatron-LM's name, or "
                                        "--target-tp).")
    parser.add_argument("--target-pipeline-parallel-size", "--target-pp", dest="target_pp", type=int,
                        default=1, help="Pipeline-parallel degree of --save (Megatron-LM's name, or "
                                        "--target-pp).")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.output_consolidated) == bool(args.save):
        parser.error("give exactly one of --output-consolidated and --save")
    if args.target_tp < 1 or args.target_pp < 1:
        parser.error("--target-tp and --target-pp must be positive")

    from megatron_normformer.checkpoint import convert as cc

    consolidated_input = args.load.endswith(".safetensors") or os.path.isfile(args.load + ".safetensors")
    try:
        if args.output_consolidated:
            if consolidated_input:
                parser.error("--load is already a consolidated file")
            path = cc.to_consolidated(args.load, args.output_consolidated, args.tag)
            print(f"wrote {path} and its config JSON")
        elif consolidated_input:
            tag = cc.from_consolidated(args.load, args.save, args.target_tp, args.target_pp)
            print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp} (fresh optimizer)")
        else:
            tag = cc.reshard(args.load, args.save, args.target_tp, args.target_pp, args.tag)
            print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp}")
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
