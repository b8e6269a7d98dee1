#!/usr/bin/env python
"""Table 4: the LR stability test for Pre-LN and NormFormer.

The learning rate is ``step * --lr-step`` (0, then one step more each iteration) until the loss, a
watched activation or a gradient stops being finite, or ``--max-steps``. Reports per architecture
the peak LR reached, the last good step and the first operation and layer that failed; writes
``lr_stability.json`` and ``lr_stability.png`` (loss vs LR). The paper's failures are fp16 overflows:
use ``--dtype fp16`` (autocast; works on CPU and GPU).

Example::

    python tools/lr_stability_test.py --data-path data/demo_text_document --dtype fp16 \\
        --lr-step 5e-5 --max-steps 2000 --output-dir analysis/
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    from megatron_normformer.analysis import common
    from megatron_normformer.analysis.lr_stability import DTYPES, plot_stability, run_stability_test
    from megatron_normformer.inference.cli import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_analysis_args(parser)
    g = parser.add_argument_group("stability test")
    g.add_argument("--lr-step", type=float, default=5e-5, help="LR added per iteration.")
    g.add_argument("--max-steps", type=int, default=1000, help="Give up (no divergence) after this.")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    args = parser.parse_args(argv)
    try:
        if args.lr_step <= 0 or args.max_steps < 1:
            raise ConfigError("--lr-step and --max-steps must be positive")
        source = common.TokenSource(args.data_path, args.vocab_size)
        cfg = common.config_from_args(args, source.vocab_size)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    device = resolve_device(args.device)
    runs = {}
    for name, arch in common.architecture_pair(cfg).items():
        batches = source.batches(args.micro_batch_size, args.seq_length, args.seed)
        run = run_stability_test(arch, batches, args.lr_step, args.max_steps, args.dtype, args.seed, device)
        runs[name] = run
        where = (f"failed at step {run['failed_step']}: {run['failed_op']} in "
                 f"{run['failed_module']} (layer {run['failed_layer']})" if run["diverged"]
                 else f"no failure in {args.max_steps} steps")
        print(f"{name:10s} peak LR {run['peak_lr']:.6g} | last step {run['last_step']} | {where}")
    result = {"dtype": args.dtype, "lr_step": args.lr_step, "max_steps": args.max_steps,
              "device": str(device), "model": cfg.to_dict(), "data": args.data_path or "mock",
              "runs": runs}
    common.write_json(os.path.join(args.output_dir, "lr_stability.json"), result)
    plot_stability(result, os.path.join(args.output_dir, "lr_stability.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
