"""The NormFormer GPT: embedding, N NormFormer layers, final LN, (tied) vocab-parallel LM head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import LayerRecompute, NormFormerLayer, forward_layers
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_vocab
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel, gather_from_tensor_parallel


class LMHead(nn.Module):
    """Final LayerNorm, then logits over this rank's vocabulary slice and the vocab-parallel loss.

    With tied embeddings the projection weight is the word-embedding shard, passed at call time.
    """

    def __init__(self, cfg: ModelConfig, pstate, seed: int, device=None):
        super().__init__()
        self.cfg, self.tp_group = cfg, pstate.tp_group
        padded = cfg.padded_vocab_size(pstate.tp_size)
        self.vocab_start = pstate.tp_rank * (padded // pstate.tp_size)
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, device)
        if cfg.untie_embeddings_and_output_weights:
            self.weight = mark_vocab(nn.Parameter(
                torch.empty(padded // pstate.tp_size, cfg.hidden_size, device=device)))
            fill_shard(self.weight, WeightInit(cfg, seed).embedding("output_layer.weight"),
                       (padded, cfg.hidden_size), 0, pstate.tp_rank, pstate.tp_size)
        else:
            self.register_parameter("weight", None)

    def logits(self, hidden: torch.Tensor, tied_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's slice of the logits [batch, seq, padded_vocab / TP]."""
        weight = self.weight if self.weight is not None else tied_weight
        h = copy_to_tensor_parallel(self.final_layernorm(hidden), self.tp_group)
        return F.linear(h, weight)

    def loss(self, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(local_logits, labels, self.vocab_start,
                                            self.cfg.vocab_size, self.tp_group)


class GPTModel(nn.Module):
    """Causal NormFormer LM.

    ``forward(tokens, labels)`` returns the per-token loss [batch, seq] (fp32); without labels it
    returns this rank's vocabulary slice of the logits (``gather_logits`` for the full real vocab).
    """

    def __init__(self, cfg: ModelConfig, pstate, seed: int = 1234, device=None):
        super().__init__()
        cfg.validate(pstate.tp_size)
        self.cfg = cfg
        self.tp_group = pstate.tp_group
        self.embedding = Embedding(cfg, pstate, seed, device)
        self.layers = nn.ModuleList(
            NormFormerLayer(cfg, i, pstate, seed, device) for i in range(cfg.num_layers))
        self.head = LMHead(cfg, pstate, seed, device)
        # Set by the trainer for full activation recomputation.
        self.recompute: Optional[LayerRecompute] = None

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask=None, kv_cache=None):
        """``attention_mask``: None for causal attention over the whole sequence, else a boolean
        [batch, 1, seq, seq] mask (True = may attend) that already includes causality, e.g.
        ``model.attention.document_causal_mask``. ``kv_cache`` (an ``inference.KVCache``) turns on incremental decoding: ``tokens`` are
        the positions after those already cached, and positions default to continue from them."""
        if kv_cache is not None and position_ids is None:
            position_ids = kv_cache.position_ids(tokens.size(1), tokens.device)
        x = self.embedding(tokens, position_ids)
        if kv_cache is not None:
            for layer in self.layers:
                x = layer(x, attention_mask, kv_cache=kv_cache)
        else:
            x = forward_layers(self.layers, x, attention_mask, self.recompute if self.training else None)
        logits = self.head.logits(x, self.embedding.word_embeddings.weight)
        if labels is None:
            return logits
        return self.head.loss(logits, labels)

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full logits over the real vocabulary (padding dropped), on every TP rank."""
        return gather_from_tensor_parallel(local_logits, self.tp_group)[..., : self.cfg.vocab_size]
