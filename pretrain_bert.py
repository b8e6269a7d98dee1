#!/usr/bin/env python
"""Pretrain a NormFormer masked LM (RoBERTa-style encoder) on DeepSpeed.

    deepspeed --num_gpus 8 pretrain_bert.py --model-size bert-base --scale-attn --scale-fc ...
    torchrun --nproc-per-node 8 pretrain_bert.py ...

Same flags, launchers, ZeRO stages, tensor, pipeline and sequence parallelism and checkpoints as
pretrain_gpt.py. See docs/bert.md, docs/training.md and examples/pretrain_bert_base.sh.
"""
if __name__ == "__main__":
    # First, before torch and DeepSpeed load: a signal during start-up then ends the process
    # with one line (training/interrupts.py).
    from megatron_normformer.training import interrupts

    interrupts.install("pretrain_bert.py")
    from megatron_normformer.training.pretrain import launch

    launch(task="bert")
