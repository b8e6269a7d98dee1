#!/usr/bin/env python
"""Pretrain a NormFormer masked LM (RoBERTa-style encoder) on DeepSpeed.

    deepspeed --num_gpus 8 pretrain_bert.py --model-size bert-base --scale-attn --scale-fc ...
    torchrun --nproc-per-node 8 pretrain_bert.py ...

Same flags, launchers, ZeRO stages, tensor parallelism and checkpoints as pretrain_gpt.py; no
pipeline parallelism. See docs/training.md and examples/pretrain_bert_base.sh.
"""
from megatron_normformer.training.pretrain import launch

if __name__ == "__main__":
    launch(task="bert")
