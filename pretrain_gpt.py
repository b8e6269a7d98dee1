#!/usr/bin/env python
"""Pretrain a NormFormer GPT on DeepSpeed.

    deepspeed --num_gpus 8 pretrain_gpt.py --model-size 125M --scale-attn --scale-fc ...
    torchrun --nproc-per-node 8 pretrain_gpt.py ...
    mpirun -np 8 python pretrain_gpt.py ...

See docs/training.md and examples/.
"""
if __name__ == "__main__":
    # First, before torch and DeepSpeed load: a signal during start-up then ends the process
    # with one line (runtime/signals.py). The deepspeed runner forwards no signal: its exit
    # counts as a SIGTERM (deepspeed_repairs.deepspeed_runner).
    from megatron_normformer.deepspeed_repairs import deepspeed_runner
    from megatron_normformer.runtime import signals

    signals.install("pretrain_gpt.py", deepspeed_runner)
    from megatron_normformer.training.pretrain import launch

    launch()
