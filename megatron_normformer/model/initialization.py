"""Initial values of every weight, by scheme (``--init-scheme``).

``fairseq`` is the paper's model: fairseq's ``transformer_lm`` (arch ``transformer_lm_gpt``), with
d = hidden size and F = FFN size,

    token embedding   N(0, d^-0.5), multiplied by sqrt(d) in the forward (see ``scale_embedding``)
    learned positions N(0, d^-0.5)
    Q, K, V           xavier_uniform with gain 1/sqrt(2): U(+-sqrt(3 / (2d))); biases U(+-d^-0.5)
    W_O               xavier_uniform: U(+-sqrt(3 / d)); bias 0
    W_1, W_2          torch's nn.Linear default: U(+-fan_in^-0.5), biases likewise
    untied output     N(0, d^-0.5)
    LayerNorms 1 / 0, NormFormer's gammas and lambdas 1

so token vectors (RMS 1 after the sqrt(d) scale) and sinusoidal positions (RMS 0.71) enter the
first layer at the same scale.

``megatron`` is Megatron-LM's: every weight N(0, std) with std = ``--init-method-std``, the two
output projections (W_O, W_2) N(0, std / sqrt(2 L)), biases 0, no embedding scale. It is the default
of the masked LM (RoBERTa's ``init_bert_params`` is the same up to the 1/sqrt(2L)).

Every draw is a named Philox stream (``parallel/init.py``), so both schemes give the same full
weights at any tensor- or pipeline-parallel layout.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from megatron_normformer.config import ModelConfig
from megatron_normformer.parallel.init import InitSpec

SpecPair = Tuple[InitSpec, Optional[InitSpec]]  # weight, bias (None: zeros)


class WeightInit:
    """The :class:`InitSpec` of each weight of the model described by ``cfg``."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.fairseq = cfg.init_scheme == "fairseq"
        self.std = cfg.init_method_std
        self.output_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)

    def _normal(self, name: str, std: float, logical_shape=None) -> InitSpec:
        return InitSpec(self.seed, name, std, logical_shape)

    def _uniform(self, name: str, bound: float, logical_shape=None) -> InitSpec:
        return InitSpec(self.seed, name, bound, logical_shape, distribution="uniform")

    def embedding(self, name: str) -> InitSpec:
        """Token and learned position embeddings, and an untied output layer."""
        if self.fairseq:
            return self._normal(name, self.cfg.hidden_size ** -0.5)
        return self._normal(name, self.std)

    def qkv(self, prefix: str) -> SpecPair:
        """The fused QKV projection, drawn in its group-major layout [groups, (H/G queries, k, v),
        head_dim] with the groups (the TP partition) outermost: with G = H that is
        [heads, (q, k, v), head_dim], so a multi-head model draws what it always drew."""
        cfg = self.cfg
        groups = cfg.query_groups
        logical = (groups, cfg.num_attention_heads // groups + 2, cfg.head_dim)
        weight, bias = f"{prefix}.weight", f"{prefix}.bias"
        if self.fairseq:
            d = cfg.hidden_size
            return (self._uniform(weight, math.sqrt(3.0 / (2.0 * d)), logical + (d,)),
                    self._uniform(bias, d ** -0.5, logical))
        return self._normal(weight, self.std, logical + (cfg.hidden_size,)), None

    def attention_output(self, prefix: str) -> SpecPair:
        if self.fairseq:
            return self._uniform(f"{prefix}.weight", math.sqrt(3.0 / self.cfg.hidden_size)), None
        return self._normal(f"{prefix}.weight", self.output_std), None

    def linear(self, prefix: str, fan_in: int, output: bool) -> SpecPair:
        """An FFN projection (``output``: W_2, the one writing into the residual stream) or another
        dense layer with bias."""
        if self.fairseq:
            bound = fan_in ** -0.5
            return self._uniform(f"{prefix}.weight", bound), self._uniform(f"{prefix}.bias", bound)
        return self._normal(f"{prefix}.weight", self.output_std if output else self.std), None
