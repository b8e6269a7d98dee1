"""``pretrain_gpt.py`` with a fault injected: the tests' way to make a launch fail at a chosen
moment under any launcher, without a hook in the product.

    CRASH_AT_ITERATION=N CRASH_ON_RANKS=0,1 faulty_pretrain_gpt.py FLAGS...
    SLOW_RANK_0=SECONDS faulty_pretrain_gpt.py FLAGS...

runs as ``pretrain_gpt.py FLAGS`` and either raises ``RuntimeError("injected failure at iteration
N")`` when the training loop starts iteration N on each rank of CRASH_ON_RANKS (DataLoader workers
busy), or holds rank 0 back SECONDS before it loads the checkpoint and before it builds the
datasets, as a rank 0 with more to do or a slower disk than the others would be: a start-up error
found there is then found by the other ranks first.
Environment variables, not arguments: the deepspeed launcher puts ``--local_rank=R`` first.
"""
import os
import sys
import time

if __name__ == "__main__":
    from megatron_normformer.deepspeed_repairs import deepspeed_runner
    from megatron_normformer.runtime import signals

    signals.install("pretrain_gpt.py", deepspeed_runner)
    import torch.distributed as dist

    from megatron_normformer.training import loop
    from megatron_normformer.training.pretrain import launch

    sys.argv[0] = "pretrain_gpt.py"
    if "CRASH_AT_ITERATION" in os.environ:
        at = int(os.environ["CRASH_AT_ITERATION"])
        ranks = {int(r) for r in os.environ["CRASH_ON_RANKS"].split(",")}
        real_step, started = loop.train_iteration, [0]

        def failing_step(*args, **kwargs):
            started[0] += 1
            if started[0] == at and dist.get_rank() in ranks:
                raise RuntimeError(f"injected failure at iteration {at}")
            return real_step(*args, **kwargs)

        loop.train_iteration = failing_step
    if "SLOW_RANK_0" in os.environ:
        def held_back(step):
            def step_on_rank_0_later(*args, **kwargs):
                if dist.get_rank() == 0:
                    time.sleep(float(os.environ["SLOW_RANK_0"]))
                return step(*args, **kwargs)
            return step_on_rank_0_later

        loop.checkpointing.load_checkpoint = held_back(loop.checkpointing.load_checkpoint)
        loop.build_datasets = held_back(loop.build_datasets)
    launch()
