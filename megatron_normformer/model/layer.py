"""The NormFormer layer (paper Sec. 2, Fig. 1): Pre-LN plus four switchable operations.

    h = LN_in(x)
    a = Attention(h)                     HeadScale (--scale-heads) inside, per head
    a = LN_post_attn(a)                  --scale-attn
    x = x + dropout(a)
    y = MLP(LN_pre_mlp(x))               FFN LN over all of F inside (--scale-fc)
    x = lambda * x + dropout(y)          ResScale (--scale-resids), FFN residual only

With all four off this is the plain Pre-LN transformer layer. Every LN above is the kind
``--normalization`` chooses (LayerNorm or RMSNorm; ``model/norms.Norm``).

Under sequence parallelism (``--sequence-parallel``) x, the LayerNorms, ResScale, the dropouts and
the residual adds see this rank's slice of the sequence; attention and the MLP gather it on entry
and reduce-scatter on exit. Their dropout masks then come from the tensor-parallel RNG stream (each
rank drops its own tokens), as in Megatron.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.attention import ParallelAttention
from megatron_normformer.model.mlp import ParallelMLP
from megatron_normformer.model.norms import Norm
from megatron_normformer.parallel.layers import mark_parallel, sequence_parallel_param
from megatron_normformer.parallel.random import get_rng_tracker


class NormFormerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, pstate, seed: int, device=None):
        super().__init__()
        d, sp = cfg.hidden_size, pstate.sp_group
        self.layer_number = layer_number
        self.hidden_dropout = cfg.hidden_dropout
        self.sp_group = sp
        self.input_layernorm = Norm(cfg, d, device, sp)
        self.attention = ParallelAttention(cfg, layer_number, pstate, seed, device)
        self.post_attention_layernorm = Norm(cfg, d, device, sp) if cfg.scale_attn else None
        self.pre_mlp_layernorm = Norm(cfg, d, device, sp)
        self.mlp = ParallelMLP(cfg, layer_number, pstate, seed, device)
        if cfg.scale_resids:
            self.resid_scale = mark_parallel(nn.Parameter(torch.ones(d, device=device)), None)
        else:
            self.register_parameter("resid_scale", None)

    def forward(self, x: torch.Tensor, attention_mask=None, kv_cache=None,
                position_ids=None) -> torch.Tensor:
        a = self.attention(self.input_layernorm(x), attention_mask, kv_cache=kv_cache,
                           position_ids=position_ids)
        if self.post_attention_layernorm is not None:
            a = self.post_attention_layernorm(a)
        x = x + self._dropout(a)

        y = self._dropout(self.mlp(self.pre_mlp_layernorm(x)))
        if self.resid_scale is None:
            return x + y
        # lambda * x + y in one pass
        return torch.addcmul(y, x, sequence_parallel_param(self.resid_scale, self.sp_group))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0.0:
            return x
        if self.sp_group is None:
            return F.dropout(x, self.hidden_dropout, True)
        with get_rng_tracker().fork():  # this rank's tokens get their own stream
            return F.dropout(x, self.hidden_dropout, True)


class LayerRecompute(NamedTuple):
    """Full activation recomputation of a layer stack (set by the trainer on the model):
    ``checkpoint(fn, *args)`` runs ``fn`` keeping only its inputs; ``method`` "uniform" recomputes
    chunks of ``num_layers`` layers, "block" the first ``num_layers`` layers one by one."""

    checkpoint: Callable
    method: str = "uniform"
    num_layers: int = 1


Step = Callable[[torch.Tensor], torch.Tensor]


def _chunk(steps: Sequence[Step]) -> Step:
    def forward(x):
        for step in steps:
            x = step(x)
        return x
    return forward


def forward_layers(steps: Sequence[Step], x: torch.Tensor,
                   recompute: Optional[LayerRecompute] = None) -> torch.Tensor:
    """Run the layer stack, each layer a function of the hidden states alone (its other inputs
    bound: ``model/pipeline.run_pieces``), recomputing activations in the backward pass as
    ``recompute`` says. Only the hidden states are the recomputed chunks' inputs: the rest
    (masks, positions) carry no gradient and stay the same across the stack."""
    if recompute is None:
        return _chunk(steps)(x)
    n = recompute.num_layers
    if recompute.method == "block":
        for i, step in enumerate(steps):
            x = recompute.checkpoint(step, x) if i < n else step(x)
        return x
    for start in range(0, len(steps), n):
        x = recompute.checkpoint(_chunk(steps[start:start + n]), x)
    return x
