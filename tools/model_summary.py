#!/usr/bin/env python
"""Parameter counts of a NormFormer / Pre-LN model, built on the meta device (no memory, seconds).

    python tools/model_summary.py --model-size 355M --vocab-size 51200 --scale-attn --scale-fc \
        --scale-heads --scale-resids
    python tools/model_summary.py --model-size 2.7B --activation-fn relu_squared --json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.arguments import (  # noqa: E402
    add_model_args, add_parallel_args, model_config_from_args, parse_or_exit)
from megatron_normformer.model.summary import summarize  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_parallel_args(parser)
    parser.add_argument("--json", action="store_true", help="Print one JSON line instead of a table.")
    args, cfg = parse_or_exit(parser, model_config_from_args, argv)
    summary = summarize(cfg, args.tensor_model_parallel_size)
    if args.json:
        print(json.dumps(summary))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
