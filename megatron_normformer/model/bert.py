"""The NormFormer masked LM (RoBERTa-style encoder).

The same NormFormer layer with bidirectional attention and a padding mask, a final LayerNorm (Pre-LN),
and RoBERTa's LM head: dense -> gelu -> LayerNorm -> projection tied to the word embedding, plus a
vocab-parallel output bias. The loss is computed on the masked positions only: their hidden states
are selected before the head, so the vocabulary projection costs 15 % of a full one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import NormFormerLayer, forward_layers
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_parallel, mark_vocab
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel, gather_from_tensor_parallel


class _Dense(nn.Module):
    """Replicated h x h linear layer, initialised inside its own ``__init__`` (ZeRO-3's zero.Init
    partitions a module's parameters as soon as its constructor returns)."""

    def __init__(self, cfg: ModelConfig, seed: int, device=None):
        super().__init__()
        d = cfg.hidden_size
        self.weight = mark_parallel(nn.Parameter(torch.empty(d, d, device=device)), None)
        self.bias = mark_parallel(nn.Parameter(torch.zeros(d, device=device)), None)
        weight, bias = WeightInit(cfg, seed).linear("lm_head.dense", d, output=False)
        fill_shard(self.weight, weight, (d, d))
        if bias is not None:
            fill_shard(self.bias, bias, (d,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RobertaLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int, device=None):
        super().__init__()
        self.cfg, self.tp_group = cfg, pstate.tp_group
        padded = cfg.padded_vocab_size(pstate.tp_size)
        self.vocab_start = pstate.tp_rank * (padded // pstate.tp_size)
        d = cfg.hidden_size
        self.dense = _Dense(cfg, seed, device)
        self.layernorm = LayerNorm(d, cfg.layernorm_epsilon, device)
        self.bias = mark_vocab(nn.Parameter(torch.zeros(padded // pstate.tp_size, device=device)))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """dense -> gelu -> LayerNorm: everything before the tied projection."""
        return self.layernorm(F.gelu(self.dense(hidden)))

    def logits(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return tied_projection(self.transform(hidden), embedding_weight, self.bias, self.tp_group)


def tied_projection(h: torch.Tensor, embedding_weight: torch.Tensor, bias: torch.Tensor, tp_group):
    """This rank's vocabulary slice of the logits: the word embedding's shard as the output layer."""
    return F.linear(copy_to_tensor_parallel(h, tp_group), embedding_weight, bias)


def attention_mask(padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[b, s] padding mask (1 = token) -> [b, 1, 1, s] boolean, True = may attend: no query ever
    looks at padding."""
    return None if padding_mask is None else padding_mask.bool()[:, None, None, :]


class BertModel(nn.Module):
    """Bidirectional NormFormer encoder with a RoBERTa LM head.

    ``forward(tokens, padding_mask, labels, loss_mask)`` returns the per-token loss of the masked
    positions, flattened to [num_masked] (fp32), in row-major order of ``loss_mask``. Without labels
    it returns this rank's vocabulary slice of the logits at every position.
    """

    def __init__(self, cfg: ModelConfig, pstate, seed: int = 1234, device=None):
        super().__init__()
        if not cfg.bidirectional:
            raise ValueError("BertModel needs a config with bidirectional=True")
        cfg.validate(pstate.tp_size)
        self.cfg, self.tp_group = cfg, pstate.tp_group
        self.embedding = Embedding(cfg, pstate, seed, device)
        self.layers = nn.ModuleList(
            NormFormerLayer(cfg, i, pstate, seed, device) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, device)
        self.lm_head = RobertaLMHead(cfg, pstate, seed, device)
        self.recompute = None  # LayerRecompute, set by the trainer

    def encode(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        mask = attention_mask(padding_mask)
        x = self.embedding(tokens)
        x = forward_layers(self.layers, x, mask, self.recompute if self.training else None)
        return self.final_layernorm(x)

    def forward(self, tokens, padding_mask=None, labels=None, loss_mask=None):
        hidden = self.encode(tokens, padding_mask)
        weight = self.embedding.word_embeddings.weight
        if labels is None:
            return self.lm_head.logits(hidden, weight)
        selected = loss_mask.bool() if loss_mask is not None else labels >= 0
        logits = self.lm_head.logits(hidden[selected], weight)
        return vocab_parallel_cross_entropy(logits, labels[selected], self.lm_head.vocab_start,
                                            self.cfg.vocab_size, self.tp_group)

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel(local_logits, self.tp_group)[..., : self.cfg.vocab_size]
