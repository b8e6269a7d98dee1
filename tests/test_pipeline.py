"""Pipeline parallelism on DeepSpeed's PipelineModule: the same losses as one process."""
import dataclasses

import pytest
import torch

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.pipeline import stage_layer_counts
from megatron_normformer.testing import spawn

NORMFORMER = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                         vocab_size=100, max_position_embeddings=16, hidden_dropout=0.0,
                         attention_dropout=0.0, scale_attn=True, scale_fc=True, scale_heads=True,
                         scale_resids=True)
UNTIED = dataclasses.replace(NORMFORMER, untie_embeddings_and_output_weights=True,
                             position_embedding_type="learned", activation_fn="relu_squared")
MICRO, ACCUM, SEQ, ITERS, LR = 2, 2, 8, 5, 1e-3


def _micro_batches(cfg, dp, dp_rank, step):
    """Micro-batches of one step for one data-parallel rank (the global batch is split evenly)."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (ACCUM * dp * MICRO, SEQ + 1), generator=g)
    mine = tokens.view(ACCUM, dp, MICRO, SEQ + 1)[:, dp_rank]
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in mine]


def _adam(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def _pipeline_losses(cfg, tp, pp):
    import deepspeed

    from megatron_normformer.deepspeed_repairs import release_last_stage_buffers
    from megatron_normformer.model.gpt import build_gpt_pipeline
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(tp, pp)
    seed_everything(1, pstate.tp_rank, pstate.pp_rank)
    module = build_gpt_pipeline(cfg, pstate, seed=3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=_adam(module.parameters()), config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 0}})
    release_last_stage_buffers(engine)  # as the trainer's engine (training/engine.py)
    losses = [engine.train_batch(iter(_micro_batches(cfg, pstate.dp_size, pstate.dp_rank, step))).item()
              for step in range(ITERS)]
    if engine.is_last_stage():  # neither the logits nor the last micro-batch's graph outlive it
        assert all(out is None for out in engine.pipe_buffers["outputs"])
        assert engine.loss.grad_fn is None
    return losses


def _single_process_losses(cfg):
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    seed_everything(1)
    model = GPTModel(cfg, ParallelState(1, 1), seed=3)
    optimizer = _adam(model.parameters())
    losses = []
    for step in range(ITERS):
        total = 0.0
        for x, y in _micro_batches(cfg, 1, 0, step):
            loss = model(x, y).mean() / ACCUM
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def _assert_same(got, ref):
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (got, ref)
    assert len(got) == len(ref) == ITERS
    assert len(set(round(x, 4) for x in ref)) > 1  # the model did train


def test_pp2_matches_one_process():
    ref = spawn(_single_process_losses, 1, NORMFORMER)[0]
    for losses in spawn(_pipeline_losses, 2, NORMFORMER, 1, 2):
        _assert_same(losses, ref)


def test_tp2_pp2_matches_one_process_untied():
    ref = spawn(_single_process_losses, 1, UNTIED)[0]
    for losses in spawn(_pipeline_losses, 4, UNTIED, 2, 2):
        _assert_same(losses, ref)


def test_uneven_split_rule():
    assert stage_layer_counts(5, 2) == [3, 2]
    assert stage_layer_counts(10, 4) == [3, 3, 2, 2]
    assert stage_layer_counts(24, 4) == [6, 6, 6, 6]
    assert stage_layer_counts(7, 3) == [3, 2, 2]
    assert stage_layer_counts(40, 8) == [5] * 8
    with pytest.raises(ValueError, match="--num-layers"):
        stage_layer_counts(1, 2)


def _pipeline_parameters(cfg, order):
    """Every stage's parameters by name, from pipelines over ``cfg``'s pieces as listed and with
    the layers in ``order`` (a reordered list must not move a tensor to another name)."""
    from megatron_normformer.model.gpt import gpt_pieces, gpt_wire
    from megatron_normformer.model.pipeline import build_pipeline
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(1, 2)
    pieces = gpt_pieces(cfg, pstate, seed=3)
    layers = [p for p in pieces if p.transformer_layer]
    reordered = pieces[:1] + [layers[i] for i in order] + pieces[1 + len(layers):]
    out = {}
    for name, listed in (("as listed", pieces), ("reordered", reordered)):
        module = build_pipeline(listed, gpt_wire(), pstate, loss_fn=None)
        out[name] = {n: p.detach().clone() for n, p in module.named_parameters()}
    return out


@pytest.mark.parametrize("cfg", [NORMFORMER, UNTIED], ids=["tied", "untied"])
def test_pipeline_parameters_have_the_plain_models_names(cfg):
    """Both forms are built from one definition: every parameter of every stage has the plain
    model's name and value, whatever the stage cut or the order of the layer list."""
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState

    plain = {n: p.detach() for n, p in GPTModel(cfg, SingleProcessState(), seed=3).named_parameters()}
    stages = spawn(_pipeline_parameters, 2, cfg, [2, 0, 1])
    for form in ("as listed", "reordered"):
        seen = set()
        for stage in stages:
            for name, value in stage[form].items():
                assert name in plain, (form, name)
                torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=f"{form}: {name}")
                seen.add(name)
        assert seen == set(plain), (form, set(plain) - seen)
    # The stage cut differs between the two lists: layer 2 moved to the first stage.
    assert not any(n.startswith("layers.2.") for n in stages[0]["as listed"])
    assert any(n.startswith("layers.2.") for n in stages[0]["reordered"])
