"""Layout-independent training state: resume into another (TP, PP, ZeRO) and continue the curve."""
import dataclasses
import os

import pytest
import torch

from megatron_normformer.config import ModelConfig
from megatron_normformer.testing import spawn

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                  vocab_size=100, max_position_embeddings=16, hidden_dropout=0.0,
                  attention_dropout=0.0, scale_attn=True, scale_fc=True, scale_heads=True,
                  scale_resids=True)
GLOBAL, MICRO, SEQ, LR = 8, 2, 8, 3e-3


def _micro_batches(dp, dp_rank, step):
    """The same global batch at any data-parallel degree, split into micro-batches."""
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, CFG.vocab_size, (GLOBAL, SEQ + 1), generator=g)
    mine = tokens.view(GLOBAL // (dp * MICRO), dp, MICRO, SEQ + 1)[:, dp_rank]
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in mine]


def _engine(tp, pp, zero):
    import deepspeed

    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.model.gpt import build_gpt_pipeline
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    deepspeed.init_distributed(dist_backend="gloo")
    pstate = ParallelState(tp, pp)
    seed_everything(1, pstate.tp_rank, pstate.pp_rank)
    accum = GLOBAL // (MICRO * pstate.dp_size)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              # ZeRO-3: matrices partitioned, vectors kept whole (both code paths of the loader).
              "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 1000}}
    if pp > 1:
        module = build_gpt_pipeline(CFG, pstate, seed=3)
    elif zero == 3:
        with deepspeed.zero.Init(mpu=pstate, config_dict_or_path=config):
            module = GPTModel(CFG, pstate, seed=3)
        deepspeed.zero.register_external_parameter(module, module.embedding.word_embeddings.weight)
    else:
        module = GPTModel(CFG, pstate, seed=3)
    decay = [p for n, p in module.named_parameters() if len(getattr(p, "ds_shape", p.shape)) > 1]
    no_decay = [p for n, p in module.named_parameters() if len(getattr(p, "ds_shape", p.shape)) <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.98), eps=1e-8)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                      mpu=None if pp > 1 else pstate)

    def train_step(step):
        batches = _micro_batches(pstate.dp_size, pstate.dp_rank, step)
        if pp > 1:
            return engine.train_batch(iter(batches)).item()
        total = torch.zeros(())
        for x, y in batches:
            loss = engine(x, y).mean()
            engine.backward(loss)
            engine.step()
            total += loss.detach() / accum
        torch.distributed.all_reduce(total, group=pstate.dp_group)
        return (total / pstate.dp_size).item()

    return engine, module, pstate, train_step


def _run(tp, pp, zero, steps, save_dir=None, load_dir=None, first_step=0):
    from megatron_normformer.checkpoint.universal import load_universal, save_universal
    from megatron_normformer.training.step import zero_learning_rate

    engine, module, pstate, train_step = _engine(tp, pp, zero)
    if load_dir:
        with zero_learning_rate(engine.optimizer):
            train_step(10_000)  # DeepSpeed creates the optimizer state that the load overwrites
        load_universal(engine, module, pstate, CFG, load_dir, with_optimizer=True)
    losses = [train_step(first_step + s) for s in range(steps)]
    if save_dir:
        save_universal(engine, module, pstate, CFG, save_dir)
    return losses


@pytest.fixture(scope="module")
def straight():
    return spawn(_run, 1, 1, 1, 0, 6)[0]


@pytest.mark.parametrize("src,dst", [
    ((2, 1, 0), (1, 1, 0)),   # TP=2 -> TP=1, no ZeRO
    ((2, 2, 0), (1, 1, 3)),   # TP=2 x PP=2 -> one process at ZeRO-3
    ((2, 2, 1), (4, 1, 1)),   # TP=2 x PP=2 ZeRO-1 -> TP=4
    ((1, 1, 3), (2, 2, 0)),   # DP=2 ZeRO-3 (2 ranks) -> TP=2 x PP=2
], ids=["tp2-to-tp1", "tp2pp2-to-zero3", "tp2pp2z1-to-tp4", "dp2z3-to-tp2pp2"])
def test_resume_into_another_layout_continues_the_curve(tmp_path, straight, src, dst):
    def world(tp, pp, zero):
        return tp * pp * (2 if (tp, pp) == (1, 1) and zero == 3 else 1)

    first = spawn(_run, world(*src), *src, 3, str(tmp_path))[0]
    second = spawn(_run, world(*dst), *dst, 3, None, str(tmp_path), 3)[0]
    got = first + second
    for a, b in zip(got, straight):
        assert abs(a - b) <= 1e-5 * abs(b), (got, straight)
    assert os.path.isfile(tmp_path / "universal" / "meta.json")
