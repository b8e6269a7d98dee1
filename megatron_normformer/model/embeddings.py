"""Token embedding (vocab-parallel) plus sinusoidal or learned positions, and the vocabulary projection.

With rotary positions (``--position-embedding-type rope``) the embedding adds none: the attention
rotates q and k (``model/rotary.py``), and nothing bounds the sequence length here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import VocabParallelEmbedding, mark_parallel
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel, scatter_to_sequence_parallel


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim]: for i < dim/2, freq_i = exp(-i ln(10000) / (dim/2 - 1));
    each row is [sin(p freq), cos(p freq)] concatenated (fairseq / Shortformer layout)."""
    # numpy, not torch: under deepspeed.zero.Init torch's factory functions build in the training
    # dtype, which would change the table's rounding with the ZeRO stage.
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
    return torch.from_numpy(table)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.sp_group = pstate.sp_group
        init = WeightInit(cfg, seed)
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size(pstate.tp_size), cfg.vocab_size, cfg.hidden_size,
            pstate.tp_group, pstate.tp_rank, pstate.tp_size, device=device,
            init=init.embedding("embedding.word_embeddings.weight"))
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        # Position p reads row p + offset (fairseq's tables start at its padding index + 1).
        self.position_offset = cfg.position_embedding_offset
        rows = cfg.max_position_embeddings + self.position_offset
        self.register_parameter("position_embeddings", None)
        self.register_buffer("sinusoid", None)  # rotary positions: neither a table nor a buffer
        if cfg.position_embedding_type == "learned":
            self.position_embeddings = mark_parallel(nn.Parameter(
                torch.empty(rows, cfg.hidden_size, device=device)), None)
            fill_shard(self.position_embeddings, init.embedding("embedding.position_embeddings.weight"),
                       self.position_embeddings.shape)
        elif cfg.position_embedding_type == "sinusoidal":
            self.register_buffer(
                "sinusoid", sinusoidal_positions(rows, cfg.hidden_size).to(device),
                persistent=False)

    def forward(self, tokens: torch.Tensor, position_ids=None) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        table = self.position_embeddings if self.position_embeddings is not None else self.sinusoid
        if table is not None:
            seq = tokens.size(1)
            if seq > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence length {seq} exceeds --max-position-embeddings "
                                 f"({self.cfg.max_position_embeddings})")
            table = table[self.position_offset:]
            positions = table[:seq].unsqueeze(0) if position_ids is None else table[position_ids]
            x = x + positions.to(x.dtype)
        x = F.dropout(x, self.cfg.hidden_dropout, self.training)
        # Under sequence parallelism the layers take this rank's slice of the sequence.
        return scatter_to_sequence_parallel(x, self.sp_group)


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor, tp_group, bias=None) -> torch.Tensor:
    """This rank's vocabulary slice of the logits: ``hidden`` times its shard of the output (or
    tied word-embedding) weight, [rows of padded vocab / TP, hidden]."""
    return F.linear(copy_to_tensor_parallel(hidden, tp_group), weight, bias)
