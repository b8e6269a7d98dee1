"""TP=1 vs 2 vs 4, with and without sequence parallelism, from one seed: identical logits, loss and
every gathered parameter gradient."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.testing import spawn
from train_utils import rel_error, step_in_full

BASE = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                   vocab_size=100, max_position_embeddings=32, hidden_dropout=0.0,
                   attention_dropout=0.0)
NORMFORMER = dict(scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True)
CONFIGS = {
    "baseline": {},
    "normformer": NORMFORMER,
    "scale_attn": dict(scale_attn=True),
    "scale_fc": dict(scale_fc=True),
    "scale_heads": dict(scale_heads=True),
    "scale_resids": dict(scale_resids=True),
    "relu_squared": dict(NORMFORMER, activation_fn="relu_squared"),
    "relu": dict(activation_fn="relu", scale_fc=True),
    "head_scale_post_proj": dict(NORMFORMER, head_scale_position="post-proj"),
    "learned_untied_scaled": dict(NORMFORMER, position_embedding_type="learned",
                                  untie_embeddings_and_output_weights=True, scale_embedding=True),
    "megatron_init": dict(NORMFORMER, init_scheme="megatron"),
}


def _run_configs(tp, sequence_parallel=False):
    import torch.distributed as dist

    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    out = {}
    for name, overrides in CONFIGS.items():
        cfg = dataclasses.replace(BASE, **overrides)
        seed_everything(7, pstate.tp_rank)
        model = GPTModel(cfg, pstate, seed=11)
        # Train-mode forward (dropout is 0): exercises the training code path. 16 positions: the
        # sequence splits evenly over 2 and 4 ranks under sequence parallelism.
        tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))
        out[name] = step_in_full(model, cfg, pstate, tokens)
    dist.barrier()
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def results():
    out = {tp: spawn(_run_configs, tp, tp)[0] for tp in (1, 2, 4)}
    out.update({f"sp{tp}": spawn(_run_configs, tp, tp, True)[0] for tp in (2, 4)})
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("tp", [2, 4, "sp2", "sp4"])
def test_tp_matches_single_process(results, config, tp):
    ref, got = results[1][config], results[tp][config]
    # Initialisation is layout-invariant: bit-identical full weights.
    assert ref["weights"].keys() == got["weights"].keys()
    for name in ref["weights"]:
        assert torch.equal(ref["weights"][name], got["weights"][name]), name
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert rel_error(got["logits"], ref["logits"]) < 1e-5
    for name in ref["grads"]:
        assert rel_error(got["grads"][name], ref["grads"][name]) < 1e-5, name


def test_normformer_parameters_receive_gradients(results):
    grads = results[1]["normformer"]["grads"]
    for suffix in ("head_scale", "post_attention_layernorm.weight", "ffn_layernorm.weight",
                   "resid_scale"):
        matching = [n for n in grads if n.endswith(suffix)]
        assert len(matching) == BASE.num_layers, suffix
        assert all(grads[n].abs().sum() > 0 for n in matching), suffix


def test_loss_matches_reference_cross_entropy(results):
    r = results[1]["baseline"]
    tokens = torch.randint(0, BASE.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))
    ref = F.cross_entropy(r["logits"].flatten(0, 1), tokens[:, 1:].flatten())
    # logits were taken in eval mode after the step's backward; same weights, no dropout.
    assert abs(ref.item() - r["loss"]) < 1e-5 * abs(r["loss"])
