#!/usr/bin/env python
"""Fig. 3: fc2 gradient L1 norm per layer over the first steps, Pre-LN vs NormFormer.

Trains both architectures (same shape, same data, same seed) for ``--train-iters`` AdamW steps with
a linear warmup, records the mean |grad| of every layer's fc2 weight after each backward, and writes
``grad_norms.json`` (per-layer series for both) and ``grad_norms.png``.

Example::

    python tools/analyze_grad_norms.py --data-path data/demo_text_document --num-layers 12 \\
        --hidden-size 256 --num-attention-heads 8 --train-iters 200 --output-dir analysis/
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    from megatron_normformer.analysis import common
    from megatron_normformer.analysis.grad_norms import default_layers, plot_grad_norms, record_fc2_grad_mean_abs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_analysis_args(parser)
    g = parser.add_argument_group("schedule")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-3, help="Peak LR (the paper's NormFormer-125M LR).")
    g.add_argument("--lr-warmup-iters", type=int, default=50,
                   help="Linear warmup steps (the paper's 500, scaled down).")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="Layers to plot (default 0, 1, middle, last-1, last); the JSON has all.")
    args = parser.parse_args(argv)
    try:
        source = common.TokenSource(args.data_path, args.vocab_size)
        cfg = common.config_from_args(args, source.vocab_size)
        layers = args.layers or default_layers(cfg.num_layers)
        if any(not 0 <= l < cfg.num_layers for l in layers):
            raise ConfigError(f"--layers must lie in [0, {cfg.num_layers})")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    runs = {}
    for name, arch in common.architecture_pair(cfg).items():
        runs[name] = record_fc2_grad_mean_abs(arch, source.batches(args.micro_batch_size, args.seq_length, args.seed),
                                        args.train_iters, args.lr, args.lr_warmup_iters, args.seed)
        last = {l: runs[name]["fc2_grad_mean_abs"][str(l)][-1] for l in layers}
        print(f"{name}: final loss {runs[name]['loss'][-1]:.4f}; fc2 mean|grad| at the last step "
              + ", ".join(f"L{l} {v:.3e}" for l, v in last.items()))
    result = {"metric": "mean absolute value of fc2.weight gradient", "steps": args.train_iters,
              "lr": args.lr, "warmup": args.lr_warmup_iters, "plotted_layers": layers,
              "model": cfg.to_dict(), "data": args.data_path or "mock", "runs": runs}
    out = args.output_dir
    common.write_json(os.path.join(out, "grad_norms.json"), result)
    plot_grad_norms(result, layers, os.path.join(out, "grad_norms.png"))
    print(f"wrote {os.path.join(out, 'grad_norms.json')} and grad_norms.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
