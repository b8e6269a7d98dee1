"""The masked-LM encoder: TP invariance, padding never attended to, loss on masked positions only."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.testing import spawn

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  vocab_size=90, max_position_embeddings=24, hidden_dropout=0.0,
                  attention_dropout=0.0, position_embedding_type="learned", bidirectional=True,
                  scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True)
PAD = 1


def _batch():
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(4, CFG.vocab_size, (3, 20), generator=g)
    padding_mask = torch.ones_like(tokens)
    padding_mask[0, 15:] = 0
    padding_mask[2, 7:] = 0
    tokens[padding_mask == 0] = PAD
    loss_mask = (torch.rand(tokens.shape, generator=g) < 0.3).long() * padding_mask
    labels = torch.where(loss_mask.bool(), torch.randint(4, CFG.vocab_size, tokens.shape, generator=g), -100)
    return tokens, padding_mask, labels, loss_mask


def _run(tp, sequence_parallel=False):
    import torch.distributed as dist

    from megatron_normformer.model.bert import BertModel
    from megatron_normformer.checkpoint.shards import full_tensor
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    seed_everything(3, pstate.tp_rank)
    model = BertModel(CFG, pstate, seed=5)
    tokens, padding_mask, labels, loss_mask = _batch()
    loss = model(tokens, padding_mask, labels, loss_mask)
    loss.mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = full_tensor(p, p.grad, pstate.tp_group)
        grads[name] = g[: CFG.vocab_size] if name in ("embedding.word_embeddings.weight", "lm_head.bias") else g

    # Same batch with different contents in the padding: nothing may change.
    other = tokens.clone()
    other[padding_mask == 0] = torch.randint(4, CFG.vocab_size, (int((padding_mask == 0).sum()),))
    with torch.no_grad():
        loss_other = model(other, padding_mask, labels, loss_mask)
        logits = model.gather_logits(model(tokens, padding_mask))
        logits_other = model.gather_logits(model(other, padding_mask))
    real = padding_mask.bool()
    return dict(loss=loss.detach(), grads=grads if dist.get_rank() == 0 else None,
                pad_loss_delta=(loss_other - loss.detach()).abs().max().item(),
                pad_logit_delta=(logits_other[real] - logits[real]).abs().max().item(),
                logits=logits)


@pytest.fixture(scope="module")
def results():
    out = {tp: spawn(_run, tp, tp)[0] for tp in (1, 2)}
    out["sp2"] = spawn(_run, 2, 2, True)[0]
    return out


@pytest.mark.parametrize("layout", [2, "sp2"])
def test_bert_tp2_matches_tp1(results, layout):
    ref, got = results[1], results[layout]
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=0)
    for name, g in ref["grads"].items():
        rel = ((got["grads"][name] - g).norm() / g.norm()).item()
        assert rel < 1e-5, (name, rel)


def test_padding_is_never_attended_to(results):
    for r in results.values():
        assert r["pad_loss_delta"] == 0.0
        assert r["pad_logit_delta"] == 0.0


def test_loss_is_cross_entropy_of_masked_positions(results):
    tokens, padding_mask, labels, loss_mask = _batch()
    logits = results[1]["logits"]
    ref = F.cross_entropy(logits[loss_mask.bool()], labels[loss_mask.bool()], reduction="none")
    torch.testing.assert_close(results[1]["loss"], ref, rtol=1e-5, atol=1e-6)
    assert results[1]["loss"].numel() == int(loss_mask.sum())
