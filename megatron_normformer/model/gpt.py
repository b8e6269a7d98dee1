"""The NormFormer GPT: embedding, N NormFormer layers, final LN, (tied) vocab-parallel LM head.

Written once (``gpt_pieces``) for both forms: ``GPTModel`` (one pipeline stage) and
``build_gpt_pipeline`` (DeepSpeed's 1F1B engine), with the same parameter names and the same
forward of each piece over a ``GPTFlow`` (``model/pipeline.py``). Between pipeline stages travel the
hidden states only (causal attention needs no mask). Under ``--reset-attention-mask`` the segment
ids travel with them ([batch, seq] integers, no gradient) and each layer builds the block-diagonal
causal mask from them; under ``--reset-position-ids`` the position ids travel likewise, from the
first stage's input on; under ``--eod-mask-loss`` the last stage's labels come with the loss mask
(``training/tasks.py`` builds the matching batch).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
import torch.nn as nn

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.attention import document_causal_mask
from megatron_normformer.model.embeddings import Embedding, vocab_projection
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.model.layer import LayerRecompute, NormFormerLayer
from megatron_normformer.model.norms import Norm
from megatron_normformer.model.pipeline import Flow, Piece, Wire, build_pieces, build_pipeline, run_pieces
from megatron_normformer.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_vocab, vocab_range
from megatron_normformer.parallel.mappings import gather_from_tensor_parallel, gather_sequence


class LMHead(nn.Module):
    """Final LayerNorm (unless ``--no-decoder-final-norm``), then the logits over this rank's
    vocabulary slice.

    With tied embeddings the projection is the embedding's, a piece of its own (``_tied_output``).
    """

    def __init__(self, cfg: ModelConfig, pstate, seed: int, device=None):
        super().__init__()
        self.tp_group, self.sp_group = pstate.tp_group, pstate.sp_group
        padded = cfg.padded_vocab_size(pstate.tp_size)
        self.final_layernorm = (Norm(cfg, cfg.hidden_size, device, self.sp_group)
                                if cfg.final_layernorm else None)
        if cfg.untie_embeddings_and_output_weights:
            self.weight = mark_vocab(nn.Parameter(
                torch.empty(padded // pstate.tp_size, cfg.hidden_size, device=device)))
            fill_shard(self.weight, WeightInit(cfg, seed).embedding("output_layer.weight"),
                       (padded, cfg.hidden_size), 0, pstate.tp_rank, pstate.tp_size)
        else:
            self.register_parameter("weight", None)

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm, over the whole sequence (gathered under sequence parallelism)."""
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return gather_sequence(hidden, self.sp_group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits [batch, seq, padded_vocab / TP] (untied weights)."""
        return vocab_projection(self.norm(hidden), self.weight, self.tp_group)


class VocabParallelLoss:
    """Cross entropy from this rank's vocabulary slice of the logits. Called, it is the pipeline's
    loss: the micro-batch mean (over the unmasked tokens under ``--eod-mask-loss``)."""

    __name__ = "vocab_parallel_cross_entropy"

    def __init__(self, cfg: ModelConfig, pstate):
        self.vocab_size, self.group = cfg.vocab_size, pstate.tp_group
        self.vocab_start, _ = vocab_range(cfg.padded_vocab_size(pstate.tp_size), pstate.tp_rank,
                                          pstate.tp_size)

    def per_token(self, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(local_logits, labels, self.vocab_start, self.vocab_size,
                                            self.group)

    def __call__(self, local_logits, labels):
        loss_mask = None
        if isinstance(labels, (tuple, list)):  # --eod-mask-loss
            labels, loss_mask = labels
        per_token = self.per_token(local_logits, labels)
        return per_token.mean() if loss_mask is None else masked_mean(per_token, loss_mask)


# -- what each piece reads and sends ---------------------------------------------------------
@dataclass
class GPTFlow(Flow):
    """What travels through the GPT besides the hidden states."""

    position_ids: Optional[torch.Tensor] = None    # [batch, seq]; None: 0, 1, 2, ...
    segment_ids: Optional[torch.Tensor] = None     # [batch, seq] documents of each row
    attention_mask: Optional[torch.Tensor] = None  # a ready mask (plain-model callers)
    kv_cache: Optional[object] = None              # incremental decoding (never between stages)

    def mask(self) -> Optional[torch.Tensor]:
        """What the layers' attention reads: None for plain causal attention."""
        if self.segment_ids is not None:
            return document_causal_mask(self.segment_ids)
        return self.attention_mask


def gpt_wire(reset_position_ids: bool = False, reset_attention_mask: bool = False) -> Wire:
    """Between pipeline stages: the hidden states, with the position ids under
    ``--reset-position-ids`` and the segment ids under ``--reset-attention-mask``."""
    return Wire(GPTFlow, ("hidden",) + ("position_ids",) * reset_position_ids
                + ("segment_ids",) * reset_attention_mask)


def _embed(embedding: Embedding, flow: GPTFlow) -> GPTFlow:
    return replace(flow, hidden=embedding(flow.hidden, flow.position_ids))


def _layer(layer: NormFormerLayer, flow: GPTFlow) -> GPTFlow:
    return replace(flow, hidden=layer(flow.hidden, flow.mask(), kv_cache=flow.kv_cache,
                                      position_ids=flow.position_ids))


def _head(head: LMHead, flow: GPTFlow):
    """The final LayerNorm; the logits too when the output layer has its own weight."""
    if head.weight is None:
        return replace(flow, hidden=head.norm(flow.hidden))
    return head.logits(flow.hidden)


def _tied_output(embedding: Embedding, flow: GPTFlow) -> torch.Tensor:
    word = embedding.word_embeddings
    return vocab_projection(flow.hidden, word.weight, word.tp_group)


def gpt_pieces(cfg: ModelConfig, pstate, seed: int, device=None) -> List[Piece]:
    """The GPT, written once: embedding | layers 0 .. L-1 | head [| the tied output projection]."""
    tied = not cfg.untie_embeddings_and_output_weights
    pieces = [Piece("embedding", Embedding, (cfg, pstate, seed, device), _embed, tied=tied)]
    pieces += [Piece(f"layers.{i}", NormFormerLayer, (cfg, i, pstate, seed, device), _layer,
                     transformer_layer=True) for i in range(cfg.num_layers)]
    pieces.append(Piece("head", LMHead, (cfg, pstate, seed, device), _head))
    if tied:
        pieces.append(Piece("embedding", Embedding, (cfg, pstate, seed, device), _tied_output,
                            reuses=True, tied=True))
    return pieces


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
        self.embedding: Embedding
        self.layers: nn.ModuleList
        self.head: LMHead
        self.pieces = gpt_pieces(cfg, pstate, seed, device)
        build_pieces(self, self.pieces)
        self.loss_fn = VocabParallelLoss(cfg, pstate)
        # Set by the trainer for full activation recomputation.
        self.recompute: Optional[LayerRecompute] = None

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask=None, kv_cache=None):
        """``attention_mask``: None for causal attention over the whole sequence, else a boolean
        [batch, 1, seq, seq] mask (True = may attend) that already includes causality, e.g.
        ``model.attention.document_causal_mask``. ``kv_cache`` (an ``inference.KVCache``) turns on
        incremental decoding: ``tokens`` are the positions after those already cached, and
        positions default to continue from them."""
        if kv_cache is not None and position_ids is None:
            position_ids = kv_cache.position_ids(tokens.size(1), tokens.device)
        flow = GPTFlow(tokens, position_ids, attention_mask=attention_mask, kv_cache=kv_cache)
        recompute = self.recompute if self.training and kv_cache is None else None
        logits = run_pieces(self, self.pieces, flow, recompute)
        if labels is None:
            return logits
        return self.loss_fn.per_token(logits, labels)

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full logits over the real vocabulary (padding dropped), on every TP rank."""
        return gather_from_tensor_parallel(local_logits, self.tp_group)[..., : self.cfg.vocab_size]


def build_gpt_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                       activation_checkpoint_interval: int = 0, reset_position_ids: bool = False,
                       reset_attention_mask: bool = False):
    """The GPT as a ``PipelineModule`` over ``pstate``'s layout. The reset flags change what travels
    between stages; ``--eod-mask-loss`` needs nothing here (the loss reads the mask beside the
    labels)."""
    cfg.validate(pstate.tp_size)
    return build_pipeline(gpt_pieces(cfg, pstate, seed), gpt_wire(reset_position_ids, reset_attention_mask),
                          pstate, VocabParallelLoss(cfg, pstate), activation_checkpoint_interval)
