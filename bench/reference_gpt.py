"""The same NormFormer GPT written as plain single-process PyTorch: the yardstick for our model.

No tensor parallelism, no custom autograd functions, no Philox initialisation: ``nn.Linear``,
``nn.LayerNorm``, ``F.scaled_dot_product_attention`` and ``F.cross_entropy``, top to bottom in one
file. The architecture and the FLOPs are those of ``megatron_normformer.model.gpt.GPTModel`` for the
same :class:`ModelConfig` (TP = 1):

- the embedding has the padded vocabulary (``cfg.padded_vocab_size(1)``) so the parameter count is
  identical; the logits are taken over the real vocabulary only, which is the same loss as ours
  (our padded columns are masked out of the softmax). With a vocabulary that needs no padding
  (51,200, the benchmarks' default) the FLOPs are identical too;
- the QKV projection's output rows are laid out ``[heads, (q, k, v), head_dim]`` like ours;
- module and parameter names follow ours, so ``ref.load_state_dict(ours.state_dict())`` copies
  the weights (tests/test_bench.py uses this to prove both compute the same loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import sinusoidal_positions

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "relu_squared": lambda x: F.relu(x).square()}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.head_scale = nn.Parameter(torch.ones(self.heads)) if cfg.scale_heads else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, self.heads, 3, self.head_dim).unbind(dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        p = self.cfg.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [b, heads, s, hd]
        pre_proj = self.cfg.head_scale_position == "pre-proj"
        if self.head_scale is not None and pre_proj:
            y = y * self.head_scale.view(1, -1, 1, 1)
        y = self.dense(y.transpose(1, 2).reshape(b, s, d))
        if self.head_scale is not None and not pre_proj:
            y = (y.view(b, s, self.heads, self.head_dim) * self.head_scale.view(-1, 1)).view(b, s, d)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation_fn]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_hidden_size, eps=cfg.layernorm_epsilon) if cfg.scale_fc else None
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.act(self.fc1(x))
        if self.ffn_layernorm is not None:
            u = self.ffn_layernorm(u)
        return self.fc2(u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layernorm_epsilon
        self.p = cfg.hidden_dropout
        self.input_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps) if cfg.scale_attn else None
        self.pre_mlp_layernorm = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(cfg)
        self.resid_scale = nn.Parameter(torch.ones(d)) if cfg.scale_resids else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(self.input_layernorm(x))
        if self.post_attention_layernorm is not None:
            a = self.post_attention_layernorm(a)
        x = x + F.dropout(a, self.p, self.training)
        y = F.dropout(self.mlp(self.pre_mlp_layernorm(x)), self.p, self.training)
        return (x * self.resid_scale if self.resid_scale is not None else x) + y


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size(1), cfg.hidden_size)
        if cfg.position_embedding_type == "learned":
            self.position_embeddings = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
        else:
            self.position_embeddings = None
            self.register_buffer("sinusoid", sinusoidal_positions(cfg.max_position_embeddings,
                                                                  cfg.hidden_size), persistent=False)
        self.scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens) * self.scale
        table = self.position_embeddings if self.position_embeddings is not None else self.sinusoid
        return F.dropout(x + table[: tokens.size(1)], self.cfg.hidden_dropout, self.training)


class Head(nn.Module):
    """Final LN; the output weight is the tied embedding unless untied."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        untied = cfg.untie_embeddings_and_output_weights
        self.weight = nn.Parameter(torch.empty(cfg.padded_vocab_size(1), cfg.hidden_size)) if untied else None


class ReferenceGPT(nn.Module):
    """``forward(tokens, labels)`` -> per-token loss [batch, seq]; without labels, the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bidirectional:
            raise ValueError("the reference model is causal only")
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_method_std, self.cfg.init_method_std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # biases zero; LN gains, HeadScale and ResScale one
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
            else:
                p.normal_(0.0, out_std if name.endswith(("dense.weight", "fc2.weight")) else std)
        self.embedding.word_embeddings.weight[self.cfg.vocab_size:].zero_()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        x = self.head.final_layernorm(x)
        weight = self.head.weight if self.head.weight is not None else self.embedding.word_embeddings.weight
        logits = F.linear(x, weight[: self.cfg.vocab_size])  # the real vocabulary; a contiguous view
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.reshape(-1), reduction="none")
        return loss.view_as(labels)
