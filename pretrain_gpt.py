#!/usr/bin/env python
"""Pretrain a NormFormer GPT on DeepSpeed.

    deepspeed --num_gpus 8 pretrain_gpt.py --model-size 125M --scale-attn --scale-fc ...
    torchrun --nproc-per-node 8 pretrain_gpt.py ...
    mpirun -np 8 python pretrain_gpt.py ...

See docs/training.md and examples/.
"""
if __name__ == "__main__":
    # First, before torch and DeepSpeed load: a signal during start-up then ends the process
    # with one line (training/interrupts.py).
    from megatron_normformer.training import interrupts

    interrupts.install("pretrain_gpt.py")
    from megatron_normformer.training.pretrain import launch

    launch()
