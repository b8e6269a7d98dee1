#!/usr/bin/env python
"""Fig. 4: the learned NormFormer scales of a checkpoint, per layer.

Box plots of FFN-LN gamma, post-attention-LN gamma, HeadScale gamma and ResScale lambda (those the
checkpoint has) per layer in ``scales.png``; per-layer n, mean, std, min, max and 5/25/50/75/95 %
quantiles in ``scales.json``.

Example::

    python tools/analyze_scales.py --load ckpt/release --output-dir analysis/
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    from megatron_normformer.analysis.common import write_json
    from megatron_normformer.analysis.scales import plot_scales, scale_report
    from megatron_normformer.checkpoint.inference import load_full_state

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True,
                        help="Consolidated checkpoint (PATH.safetensors or base) or training checkpoint dir.")
    parser.add_argument("--ckpt-tag", default=None, help="Iteration tag in a training checkpoint dir.")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    try:
        full, cfg = load_full_state(args.load, args.ckpt_tag)
        report = scale_report(full, cfg)
        if not report["kinds"]:
            raise ConfigError(f"--load {args.load}: the model has no NormFormer scale parameters "
                              "(trained without --scale-attn/--scale-fc/--scale-heads/--scale-resids)")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    report["load"] = args.load
    write_json(os.path.join(args.output_dir, "scales.json"), report)
    plot_scales(full, cfg, os.path.join(args.output_dir, "scales.png"))
    for kind, rows in report["kinds"].items():
        print(f"{kind:13s} mean per layer: " + " ".join(f"{r['mean']:.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
