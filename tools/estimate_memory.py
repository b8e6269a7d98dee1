#!/usr/bin/env python
"""Per-rank memory of a pretrain_gpt.py / pretrain_bert.py run, from the same flags, without
starting anything: weights, gradients, optimizer state, activations, logits, communication
buffers, the total and whether it fits (docs/memory.md).

    python tools/estimate_memory.py --model-size 1.3B --bf16 --seq-length 2048 --micro-batch-size 4 \\
        --tensor-model-parallel-size 2 --zero-stage 1 --num-gpus 8 --device-memory-gb 80
    python tools/estimate_memory.py --model-size 6.7B --bf16 --seq-length 2048 --micro-batch-size 1 \\
        --num-gpus 8 --device-memory-gb 80 --search          # every layout, those that fit first

Every pretrain_gpt.py flag is accepted (a launch script's flags can be pasted); the data and run
length are not needed. The vocabulary comes from --vocab-size, or the tokenizer's files when they
exist, or GPT-2's 50,257 for --tokenizer-type GPT2BPETokenizer.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args  # noqa: E402
from megatron_normformer.config import ConfigError  # noqa: E402
from megatron_normformer.memory import GIB, estimate, format_bytes, search  # noqa: E402

GPT2_VOCAB = 50257


def build_parser():
    parser = build_pretrain_parser("Per-rank memory of a training run (docs/memory.md)")
    g = parser.add_argument_group("memory planner")
    g.add_argument("--world-size", "--num-gpus", type=int, default=None, dest="world_size",
                   help="Ranks of the run (TP x PP x DP); TP x PP when unset.")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="Memory of one device in GiB: say whether the busiest rank fits.")
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: GPU kernels and allocations (default); cpu: what a CPU run touches "
                        "(the validation's measure, docs/memory.md).")
    g.add_argument("--search", action="store_true",
                   help="List every TP x PP x DP x ZeRO x recompute x SP layout of --world-size "
                        "ranks with its peak, those that fit --device-memory-gb first.")
    g.add_argument("--bert", action="store_true", help="The masked LM (pretrain_bert.py).")
    g.add_argument("--json", action="store_true", help="Print the estimate as JSON.")
    return parser


def _vocab(args):
    if args.vocab_size is not None:
        return None
    kind = args.tokenizer_type or ("GPT2BPETokenizer" if args.vocab_file and args.merge_file else None)
    if kind is None:
        raise ConfigError("give --vocab-size (or a --tokenizer-type whose files exist)")
    files = [f for f in (args.tokenizer_model, args.vocab_file, args.merge_file) if f]
    if files and all(os.path.exists(f) for f in files):
        from megatron_normformer.data import build_tokenizer

        return build_tokenizer(kind, args.tokenizer_model, args.vocab_file, args.merge_file,
                               args.vocab_size).vocab_size
    if kind == "GPT2BPETokenizer":
        return GPT2_VOCAB
    raise ConfigError(f"--tokenizer-type {kind}: its files are not here; give --vocab-size")


def resolve(parser, argv):
    """(args, run config, world size) from pretrain flags plus the planner's."""
    args = parser.parse_args(argv)
    # What the planner does not need may be left out: run length, data.
    if args.train_iters is None and args.train_samples is None and args.train_tokens is None:
        args.train_iters = 1
    if not (args.data_path or args.train_data_path):
        args.mock_data = True
    run = run_config_from_args(args, _vocab(args), bidirectional=args.bert)
    model_parallel = run.parallel.tensor_model_parallel_size * run.parallel.pipeline_model_parallel_size
    world = args.world_size if args.world_size is not None else model_parallel
    if world <= 0:
        raise ConfigError(f"--world-size must be positive, got {world}")
    run.batch_layout(world)  # the world must divide into TP x PP x DP, the batch into DP
    if args.search and args.device_memory_gb is None:
        raise ConfigError("--search needs --device-memory-gb")
    return args, run, world


def print_estimate(est, args) -> None:
    lay = est.layout
    print(f"{est.total_parameters / 1e6:,.1f}M parameters; TP {lay.tp} x PP {lay.pp} x DP {lay.dp}, "
          f"ZeRO-{lay.zero_stage}{' + CPU offload' if lay.cpu_offload else ''}, {lay.mixed}, micro "
          f"batch {lay.micro_batch} x seq {lay.seq_length}, accumulation {lay.gas}, recompute "
          f"{lay.recompute.granularity if lay.recompute else 'none'}"
          f"{', sequence parallel' if lay.sequence_parallel else ''}; device {lay.device}")
    names = ("parameters", "weights", "gradients", "optimizer", "activations", "logits",
             "communication", "host", "total")
    print(f"{'stage':>5} " + " ".join(f"{n:>13}" for n in names))
    for s in est.stages:
        cells = [f"{s.parameters / 1e6:,.1f}M"] + [format_bytes(getattr(s, n)) for n in names[1:]]
        print(f"{s.stage:>5} " + " ".join(f"{c:>13}" for c in cells))
    peak = est.peak
    line = f"busiest rank (stage {peak.stage}): {format_bytes(peak.total)}"
    if est.fits is not None:
        line += (f" {'fits' if est.fits else 'does NOT fit'} in {args.device_memory_gb:g} GiB")
    print(line)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, run, world = resolve(parser, argv)
        if args.search:
            rows = search(run, world, args.device_memory_gb, args.device)
            if args.json:
                print(json.dumps(rows, indent=1))
                return 0
            print(f"{world} ranks, {args.device_memory_gb:g} GiB each: {sum(r['fits'] for r in rows)} "
                  f"of {len(rows)} layouts fit")
            print(f"{'TP':>3} {'PP':>3} {'DP':>3} {'ZeRO':>4} {'recompute':>10} {'SP':>3} {'GiB/rank':>9}  fits")
            for r in rows:
                print(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>3} {r['zero_stage']:>4} {r['recompute']:>10} "
                      f"{'yes' if r['sequence_parallel'] else 'no':>3} {r['peak_gib']:>9.1f}  "
                      f"{'yes' if r['fits'] else 'no'}")
            return 0
        est = estimate(run, world, args.device, args.device_memory_gb)
    except ConfigError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(est.to_dict(), indent=1))
    else:
        print_estimate(est, args)
    return 0 if est.fits in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
