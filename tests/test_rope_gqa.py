"""Rotary positions and grouped-query attention (issue 24).

- RoPE equals a pair-by-pair restatement written here in the rotate-half pairing Hugging Face's
  Llama uses (dimension i turns with i + rot_dim / 2 by p * base^(-2i / rot_dim)), partial rotation
  included.
- The attention equals an independent grouped-query attention written here (G = 1: multi-query),
  outputs and gradients, with --qk-layernorm of either kind too; with G = H it is the multi-head
  attention of before, bit for bit (weights, outputs, gradients). --qk-layernorm at TP=2 (ranks
  holding different heads) gives one process's logits and gradients.
- KV-cache generation equals recomputation for RoPE + GQA, left-padded batches included, past
  --max-position-embeddings (rotary positions have no table); the cache holds the G key/value heads.
- --reset-position-ids: packed documents equal the documents alone, and the position ids reach every
  layer on both pipeline stages (PP=2 equals one process, and the positions change the loss).
- The masked LM with rotary positions: padding at the end leaves the real tokens' logits unchanged.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.data.document_masks import DocumentMasking
from megatron_normformer.inference.generation import generate
from megatron_normformer.inference.kv_cache import KVCache
from megatron_normformer.model.attention import ParallelAttention, document_causal_mask
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.model.rotary import apply_rotary, rotary_cos_sin
from megatron_normformer.parallel.init import random_shard
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.testing import spawn

ROPE = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=128,
                   vocab_size=128, max_position_embeddings=8, hidden_dropout=0.0,
                   attention_dropout=0.0, position_embedding_type="rope", scale_attn=True,
                   scale_fc=True, scale_heads=True, scale_resids=True)
EOD = 127


def restated_rope(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """x [b, heads, s, head_dim] (float64), positions [b, s]: each pair (i, i + rot_dim/2) of the
    first rot_dim dims turned by p * base^(-2i / rot_dim); the other dims untouched."""
    out = x.clone()
    half = rot_dim // 2
    for i in range(half):
        theta = positions.double()[:, None, :] * base ** (-2.0 * i / rot_dim)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * torch.cos(theta) - b * torch.sin(theta)
        out[..., i + half] = b * torch.cos(theta) + a * torch.sin(theta)
    return out


@pytest.mark.parametrize("rot_dim,base", [(16, 10000), (8, 500000), (4, 10000)])
def test_rotary_equals_the_pairwise_restatement(rot_dim, base):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [5, 0, 17, 1, 63, 2, 40]])
    cos, sin = rotary_cos_sin(positions, 7, rot_dim, base, torch.float32)
    got = apply_rotary(x, cos, sin)
    want = restated_rope(x.double(), positions, rot_dim, base)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    # Without position ids: 0 .. s - 1.
    cos0, sin0 = rotary_cos_sin(None, 7, rot_dim, base, torch.float32)
    assert torch.equal(apply_rotary(x[:1], cos0, sin0), got[:1])
    if rot_dim < 16:
        assert torch.equal(got[..., rot_dim:], x[..., rot_dim:])  # partial: the rest passes


def _attention(cfg, seed=5):
    attn = ParallelAttention(cfg, 0, SingleProcessState(), seed)
    with torch.no_grad():  # HeadScale away from 1 so that a head mix-up shows
        if attn.head_scale is not None:
            attn.head_scale.copy_(torch.linspace(0.5, 1.5, attn.head_scale.numel()))
    return attn


def _head_norm(norm, x):
    """A q/k norm over head_dim, restated in float64 (LayerNorm or RMSNorm)."""
    if norm is None:
        return x
    w = norm.weight.double()
    if getattr(norm, "bias", None) is None:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * w
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + norm.eps) * w + norm.bias.double()


def reference_grouped_attention(attn, x, positions, heads, groups, rot_dim, base):
    """Grouped-query attention from the module's weights, head by head, in float64: query head h
    reads key/value head h // (heads / groups); q/k rows in the group-major layout; q/k norms
    (if any) before the rotation."""
    per = heads // groups
    d = x.size(-1)
    hd = d // heads
    w = attn.qkv.weight.double().view(groups, per + 2, hd, d)
    bias = attn.qkv.bias.double().view(groups, per + 2, hd)
    xs = x.double()
    b, s, _ = x.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    contexts = []
    for h in range(heads):
        grp, j = divmod(h, per)
        q = xs @ w[grp, j].T + bias[grp, j]
        k = xs @ w[grp, per].T + bias[grp, per]
        v = xs @ w[grp, per + 1].T + bias[grp, per + 1]
        q, k = _head_norm(attn.q_layernorm, q), _head_norm(attn.k_layernorm, k)
        q = restated_rope(q[:, None], positions, rot_dim, base)[:, 0]
        k = restated_rope(k[:, None], positions, rot_dim, base)[:, 0]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        context = scores.softmax(-1) @ v
        gamma = attn.head_scale[h].double() if attn.head_scale is not None else 1.0
        contexts.append(context * gamma)
    out = torch.cat(contexts, dim=-1) @ attn.dense.weight.double().T + attn.dense.bias.double()
    return out


@pytest.mark.parametrize("groups,rotary_percent,qk_norm", [
    (1, 1.0, None), (2, 0.5, None), (8, 1.0, None), (2, 1.0, "LayerNorm"), (1, 0.5, "RMSNorm")])
def test_attention_equals_independent_grouped_query_attention(groups, rotary_percent, qk_norm):
    cfg = dataclasses.replace(ROPE, num_query_groups=groups, rotary_percent=rotary_percent,
                              rotary_base=1000, qk_layernorm=qk_norm is not None,
                              normalization=qk_norm or "LayerNorm")
    attn = _attention(cfg)
    if qk_norm:
        assert sorted(n for n, _ in attn.named_parameters() if "_layernorm" in n) == sorted(
            [f"{qk}_layernorm.{p}" for qk in "qk" for p in ("weight", "bias")[:1 + (qk_norm == "LayerNorm")]])
        with torch.no_grad():  # away from 1 and 0, different for q and k
            for i, p in enumerate(p for n, p in attn.named_parameters() if "_layernorm" in n):
                p.copy_(torch.linspace(0.5, 1.5, 8) * (1 + i) - 0.3 * i)
    assert attn.qkv.weight.shape == ((8 + 2 * groups) * 8, 64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 64, generator=g)
    positions = torch.tensor([list(range(11)), [3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5]])
    for pos in (None, positions):
        out = attn(x, position_ids=pos)
        ref = reference_grouped_attention(attn, x, torch.arange(11).expand(2, 11) if pos is None else pos,
                                          8, groups, cfg.rotary_dim, 1000)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    # Gradients too (SDPA shares each K/V head among its group's query heads).
    weight = attn.qkv.weight
    (attn(x, position_ids=positions) ** 2).sum().backward()
    got = weight.grad.clone()
    weight.grad = None
    (reference_grouped_attention(attn, x, positions, 8, groups, cfg.rotary_dim, 1000) ** 2).sum().backward()
    want = weight.grad.double()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def _old_multi_head_attention(attn, x):
    """The attention core as it was before grouped-query attention: [heads, (q, k, v), head_dim]."""
    qkv = attn.qkv(x)
    b, s, _ = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, attn.local_heads, 3, attn.head_dim).unbind(3))
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    context = context.transpose(1, 2).reshape(b, s, -1)
    return attn.dense(context, input_scale=attn.head_scale.repeat_interleave(attn.head_dim))


@pytest.mark.parametrize("init_scheme", ["fairseq", "megatron"])
def test_groups_equal_heads_is_multi_head_attention_bit_for_bit(init_scheme):
    mha = dataclasses.replace(ROPE, position_embedding_type="sinusoidal", max_position_embeddings=16,
                              init_scheme=init_scheme)
    gqa = dataclasses.replace(mha, num_query_groups=8)
    # The draws of before: the stream enumerated as [heads, 3, head_dim, hidden].
    attn = _attention(gqa)
    scale = math.sqrt(3.0 / (2.0 * 64)) if init_scheme == "fairseq" else 0.02
    old = random_shard(5, "layers.0.attention.qkv.weight", (8, 3, 8, 64), scale,
                       distribution="uniform" if init_scheme == "fairseq" else "normal")
    assert torch.equal(attn.qkv.weight, old.view(192, 64))
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    out_new, out_old = attn(x), _old_multi_head_attention(attn, x)
    assert torch.equal(out_new, out_old)
    grads = []
    for out in (attn(x), _old_multi_head_attention(attn, x)):
        attn.zero_grad()
        (out ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    # Whole models: the same parameters, logits and gradients.
    tokens = torch.randint(0, 127, (2, 13), generator=torch.Generator().manual_seed(3))
    results = []
    for cfg in (mha, gqa):
        model = GPTModel(cfg, SingleProcessState(), seed=4)
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        results.append({n: (p.detach(), p.grad) for n, p in model.named_parameters()})
        results[-1]["logits"] = (model(tokens).detach(), None)
    assert results[0].keys() == results[1].keys()
    for name, (value, grad) in results[0].items():
        assert torch.equal(value, results[1][name][0]), name
        assert grad is None or torch.equal(grad, results[1][name][1]), name


def test_kv_cache_generation_equals_recomputation_with_rope_and_gqa():
    cfg = dataclasses.replace(ROPE, num_query_groups=2, rotary_percent=0.5)
    model = GPTModel(cfg, SingleProcessState(), seed=6).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 127, (n,), generator=g).tolist() for n in (3, 7, 5)]
    new = 14  # the longest prompt plus new tokens pass --max-position-embeddings (8)
    cached = generate(model, prompts, new, use_cache=True, return_logits=True)
    recomputed = generate(model, prompts, new, use_cache=False, return_logits=True)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == new for t in cached.tokens)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for i, p in enumerate(prompts):  # a left-padded row decodes what its prompt decodes alone
        alone = generate(model, [p], new, use_cache=False, return_logits=True)
        assert alone.tokens[0] == cached.tokens[i]
        torch.testing.assert_close(alone.logits[0], cached.logits[i], rtol=0, atol=1e-5)
    # The cache holds the G key/value heads, not one per query head.
    cache = KVCache(cfg.num_layers)
    with torch.no_grad():
        model(torch.tensor([prompts[1]]), kv_cache=cache)
    assert cache.keys[0].shape == (1, 2, 7, 8) and cache.values[1].shape == (1, 2, 7, 8)


def test_packed_documents_equal_documents_alone_with_rope():
    cfg = dataclasses.replace(ROPE, num_query_groups=4, max_position_embeddings=4)
    model = GPTModel(cfg, SingleProcessState(), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    doc_a = torch.cat([torch.randint(0, EOD, (6,), generator=g), torch.tensor([EOD])])
    doc_b = torch.randint(0, EOD, (10,), generator=g)
    inputs = torch.cat([doc_a, doc_b])[None, :-1]
    fields = DocumentMasking(EOD, False, True, True).fields(inputs)
    assert fields["position_ids"][0].tolist() == list(range(7)) + list(range(9))
    with torch.no_grad():
        packed = model.gather_logits(model(inputs, position_ids=fields["position_ids"],
                                           attention_mask=document_causal_mask(fields["segment_ids"])))
        alone_a = model.gather_logits(model(doc_a[None]))
        alone_b = model.gather_logits(model(doc_b[None, :-1]))
        # Without the document mask B sees A, and then the restarted positions matter.
        restarted = model(inputs, position_ids=fields["position_ids"])
        running = model(inputs)
    torch.testing.assert_close(packed[0, :7], alone_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[0, 7:], alone_b[0], rtol=0, atol=1e-5)
    assert (restarted[0, 7:] - running[0, 7:]).abs().max() > 1e-3
    assert torch.equal(restarted[0, :7], running[0, :7])  # A's positions are 0..6 either way


PIPE = dataclasses.replace(ROPE, num_layers=2, hidden_size=32, num_attention_heads=4,
                           num_query_groups=2, ffn_hidden_size=64)


def _pipeline_batches(cfg):
    """Two micro-batches of rows packing two documents each, with restarted positions."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, EOD, (4, 13), generator=g)
    tokens[:2, 4] = EOD
    tokens[2:, 7] = EOD
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = DocumentMasking(EOD, False, True, False).fields(inputs)["position_ids"]
    return [((inputs[i:i + 2], positions[i:i + 2].contiguous()), labels[i:i + 2]) for i in (0, 2)]


def _pp2_loss(cfg):
    import deepspeed

    from megatron_normformer.model.gpt import build_gpt_pipeline
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(1, 2)
    seed_everything(1, pstate.tp_rank, pstate.pp_rank)
    module = build_gpt_pipeline(cfg, pstate, seed=3, reset_position_ids=True)
    engine, *_ = deepspeed.initialize(model=module, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 0}})
    return engine.eval_batch(iter(_pipeline_batches(cfg))).item()


def test_position_ids_reach_the_layers_of_every_pipeline_stage():
    model = GPTModel(PIPE, SingleProcessState(), seed=3).eval()
    with torch.no_grad():
        restarted = [model(x, y, position_ids=pos).mean().item() for (x, pos), y in _pipeline_batches(PIPE)]
        running = [model(x, y).mean().item() for (x, _), y in _pipeline_batches(PIPE)]
    pipelined = spawn(_pp2_loss, 2, PIPE)[1]  # the last stage's
    assert abs(pipelined - sum(restarted) / 2) <= 1e-5
    assert abs(sum(running) / 2 - sum(restarted) / 2) > 1e-4


def test_masked_lm_with_rotary_positions():
    cfg = dataclasses.replace(ROPE, bidirectional=True, num_query_groups=2, final_layernorm=True)
    model = BertModel(cfg, SingleProcessState(), seed=3).eval()
    assert not [n for n, _ in model.named_parameters() if "position" in n]
    assert not list(model.embedding.buffers())
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, EOD, (1, 12), generator=g)
    padded = torch.cat([row, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model.gather_logits(model(row))
        with_padding = model.gather_logits(model(padded, mask))
        other = row.clone()
        other[0, -1] = (other[0, -1] + 1) % EOD
        changed = model.gather_logits(model(other))
    torch.testing.assert_close(with_padding[:, :12], alone, rtol=0, atol=1e-5)
    assert (changed[0, 0] - alone[0, 0]).abs().max() > 1e-4  # bidirectional: the first sees the last


QK_NORM = {kind: dataclasses.replace(ROPE, num_query_groups=2, qk_layernorm=True, normalization=kind,
                                     untie_embeddings_and_output_weights=True)
           for kind in ("LayerNorm", "RMSNorm")}


def _qk_norm_tp(tp):
    import torch.distributed as dist

    from megatron_normformer.checkpoint.shards import full_tensor
    from megatron_normformer.parallel.state import ParallelState

    pstate = ParallelState(tensor_model_parallel_size=tp)
    out = {}
    for kind, cfg in QK_NORM.items():
        model = GPTModel(cfg, pstate, seed=8)
        tokens = torch.randint(0, 127, (2, 11), generator=torch.Generator().manual_seed(9))
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        grads = {n: full_tensor(p, p.grad, pstate.tp_group) for n, p in model.named_parameters()}
        with torch.no_grad():
            logits = model.gather_logits(model(tokens))
        out[kind] = dict(loss=loss.item(), logits=logits, grads=grads)
    dist.barrier()
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def qk_norm_runs():
    return spawn(_qk_norm_tp, 1, 1)[0], spawn(_qk_norm_tp, 2, 2)[0]


@pytest.mark.parametrize("normalization", list(QK_NORM))
def test_qk_layernorm_across_tensor_parallel_ranks(qk_norm_runs, normalization):
    cfg = QK_NORM[normalization]
    one, two = (run[normalization] for run in qk_norm_runs)
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(one["loss"])
    torch.testing.assert_close(two["logits"], one["logits"], rtol=0, atol=1e-5)
    norms = [n for n in one["grads"] if ".attention.q_layernorm." in n or ".attention.k_layernorm." in n]
    assert len(norms) == 2 * cfg.num_layers * (1 + (normalization == "LayerNorm"))
    for name, grad in one["grads"].items():
        if name.endswith(("word_embeddings.weight", "head.weight")):
            grad, other = grad[:cfg.vocab_size], two["grads"][name][:cfg.vocab_size]
        else:
            other = two["grads"][name]
        torch.testing.assert_close(other, grad, rtol=0, atol=1e-5 * grad.abs().max().item() + 1e-7,
                                   msg=name)
