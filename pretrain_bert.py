#!/usr/bin/env python
"""Pretrain a NormFormer masked LM (RoBERTa-style encoder) on DeepSpeed.

    deepspeed --num_gpus 8 pretrain_bert.py --model-size bert-base --scale-attn --scale-fc ...
    torchrun --nproc-per-node 8 pretrain_bert.py ...

Same flags, launchers, ZeRO stages, tensor, pipeline and sequence parallelism and checkpoints as
pretrain_gpt.py. See docs/bert.md, docs/training.md and examples/pretrain_bert_base.sh.
"""
if __name__ == "__main__":
    # First, before torch and DeepSpeed load: a signal during start-up then ends the process
    # with one line (runtime/signals.py). The deepspeed runner forwards no signal: its exit
    # counts as a SIGTERM (deepspeed_repairs.deepspeed_runner).
    from megatron_normformer.deepspeed_repairs import deepspeed_runner
    from megatron_normformer.runtime import signals

    signals.install("pretrain_bert.py", deepspeed_runner)
    from megatron_normformer.training.pretrain import launch

    launch(task="bert")
