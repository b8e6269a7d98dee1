"""Self-attention with NormFormer's HeadScale, heads split across the TP group.

H query heads share G key/value heads (``--num-query-groups``; G = H is plain multi-head
attention, G = 1 multi-query attention), each K/V head serving H / G consecutive query heads. The
fused QKV projection is laid out group-major: for each group its H / G query heads, then its key
head, then its value head (head_dim rows each); with G = H that is [heads, (q, k, v), head_dim].
Each rank owns G / TP whole groups: its contiguous slice of the QKV projection (column-parallel),
its query heads' HeadScale gammas, and its input columns of the row-parallel output projection W_O.
With the paper's placement (pre-proj) HeadScale therefore needs no communication.

After the split, ``--qk-layernorm`` normalises each query and key head over head_dim (one norm for
the queries, one for the keys, replicated: their gradients are summed over the TP group, whose ranks
hold different heads). Then, with rotary positions (``--position-embedding-type rope``,
``model/rotary.py``), q and k are rotated at the positions given (``--reset-position-ids``, or a KV
cache's continuing ones), else 0 .. s - 1 of the whole sequence (also under sequence parallelism,
where the QKV output is the whole sequence).

Incremental decoding: ``forward(x, kv_cache=cache)`` appends this call's keys and values to
``cache`` (an :class:`megatron_normformer.inference.kv_cache.KVCache`) and attends over everything
cached so far; ``x`` then holds only the new positions. The cache holds the G / TP local key/value
heads, not one per query head: that memory is what grouped-query attention saves. Without a cache
nothing changes.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.model.norms import Norm
from megatron_normformer.model.rotary import apply_rotary, rotary_cos_sin
from megatron_normformer.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    mark_parallel,
    sequence_parallel_param,
)
from megatron_normformer.parallel.random import get_rng_tracker


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask (True = may attend) of causal attention within documents:
    position i sees position j <= i of the same segment. ``segment_ids`` [batch, seq] numbers the
    documents of each row (``data/document_masks.py``)."""
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    s = segment_ids.size(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, pstate, seed: int, device=None):
        super().__init__()
        tp = pstate.tp_size
        self.cfg = cfg
        self.layer_number = layer_number
        groups = cfg.query_groups
        self.local_heads = cfg.num_attention_heads // tp
        self.local_groups = groups // tp
        self.heads_per_group = cfg.num_attention_heads // groups
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim if cfg.position_embedding_type == "rope" else 0
        prefix = f"layers.{layer_number}.attention"
        init = WeightInit(cfg, seed)
        tp_args = (pstate.tp_group, pstate.tp_rank, tp)
        self.sp_group = pstate.sp_group
        bias = cfg.add_bias_linear
        weight, bias_init = init.qkv(f"{prefix}.qkv")
        qkv_size = (cfg.num_attention_heads + 2 * groups) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, *tp_args, device=device,
                                        init=weight, bias=bias, bias_init=bias_init,
                                        sp_group=self.sp_group)
        weight, bias_init = init.attention_output(f"{prefix}.dense")
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, *tp_args, device=device,
                                       init=weight, bias=bias, bias_init=bias_init,
                                       sp_group=self.sp_group)
        if cfg.qk_layernorm:
            # The group a replicated parameter's gradient is summed over when its ranks see
            # different tokens (sequence parallelism) serves as well for different heads.
            head_group = pstate.tp_group if tp > 1 else None
            self.q_layernorm = Norm(cfg, cfg.head_dim, device, head_group)
            self.k_layernorm = Norm(cfg, cfg.head_dim, device, head_group)
        else:
            self.q_layernorm = self.k_layernorm = None
        if cfg.scale_heads:
            # HeadScale gamma (init 1): sharded with the heads before W_O, replicated after it.
            pre = cfg.head_scale_position == "pre-proj"
            n = self.local_heads if pre else cfg.num_attention_heads
            self.head_scale = mark_parallel(nn.Parameter(torch.ones(n, device=device)), 0 if pre else None)
        else:
            self.register_parameter("head_scale", None)
        # Set by the trainer for selective recomputation: checkpoint(fn, *args) keeps only fn's
        # inputs and reruns it in the backward pass.
        self.recompute_core = None

    def _core_attention(self, q, k, v, attention_mask, causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v with attention dropout: what selective
        recomputation (``--recompute-granularity selective``) recomputes."""
        dropout = self.cfg.attention_dropout if self.training else 0.0
        # Each K/V head serves its group's query heads inside SDPA (no repeated copy of k and v is
        # built; on CPU its output equals attention over repeat_interleave'd k/v bit for bit). Plain
        # multi-head attention makes the call it always made.
        gqa = {"enable_gqa": True} if self.heads_per_group > 1 else {}
        if dropout > 0.0:
            with get_rng_tracker().fork():  # this rank's heads get their own dropout stream
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                                      dropout_p=dropout, is_causal=causal, **gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                              **gqa)

    def _split_qkv(self, qkv: torch.Tensor):
        """[b, s, local groups x (H/G + 2) x head_dim] -> q [b, local heads, s, head_dim] and
        k, v [b, local groups, s, head_dim]."""
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :self.heads_per_group].reshape(b, s, self.local_heads, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        return (t.transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, attention_mask=None, kv_cache=None,
                position_ids=None) -> torch.Tensor:
        """x: [batch, seq, hidden] (replicated) -> [batch, seq, hidden] (replicated); under sequence
        parallelism this rank's slice of the sequence in and out.

        ``attention_mask``: None for causal attention, else a boolean [batch, 1, 1|seq, seq] mask
        where True means "may attend": padding for bidirectional models, the block-diagonal causal
        mask of :func:`document_causal_mask` for causal ones.
        ``kv_cache``: optional cache for incremental (causal) decoding; it supplies the mask.
        ``position_ids``: [batch | 1, seq] positions of the rotary embedding (None: 0 .. seq - 1);
        unused with table positions.
        """
        qkv = self.qkv(x)
        b, s, _ = qkv.shape  # the whole sequence, also when x is this rank's slice of it
        q, k, v = self._split_qkv(qkv)  # [b, heads | groups, s, head_dim]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(position_ids, s, self.rotary_dim, self.cfg.rotary_base,
                                      q.dtype, q.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # A causal model's explicit mask already holds causality (document_causal_mask); without
        # one SDPA's is_causal path (flash attention on GPUs) does the masking.
        causal = not self.cfg.bidirectional and attention_mask is None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)
            # Queries sit at the end of the cached keys, so SDPA's top-left causal mask is wrong
            # unless nothing was cached before: the cache builds the mask (None = plain causal).
            attention_mask = kv_cache.attention_mask(s, k.size(2), x.device)
            causal = attention_mask is None and s == k.size(2)
        if self.recompute_core is not None and self.training:
            core = functools.partial(self._core_attention, causal=causal)
            context = self.recompute_core(core, q, k, v, attention_mask)
        else:
            context = self._core_attention(q, k, v, attention_mask, causal)
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        head_scale = None
        if self.head_scale is not None and self.cfg.head_scale_position == "pre-proj":
            # Scaling head i's output by gamma_i is scaling W_O's input columns of head i.
            head_scale = self.head_scale.repeat_interleave(self.head_dim)
        out = self.dense(context, input_scale=head_scale)
        if self.head_scale is not None and self.cfg.head_scale_position == "post-proj":
            head_scale = sequence_parallel_param(self.head_scale, self.sp_group)
            shape = out.shape
            out = (out.view(*shape[:2], -1, self.head_dim) * head_scale.view(-1, 1).to(out.dtype)).view(shape)
        return out
