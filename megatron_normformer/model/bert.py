"""The NormFormer masked LM (RoBERTa-style encoder).

The same NormFormer layer with bidirectional attention and a padding mask, a final LayerNorm (Pre-LN),
and RoBERTa's LM head: dense -> gelu -> LayerNorm -> projection tied to the word embedding, plus a
vocab-parallel output bias. The loss is computed on the masked positions only: their hidden states
are selected before the head, so the vocabulary projection costs 15 % of a full one.

Written once (``bert_pieces``) for both forms, ``BertModel`` and ``build_bert_pipeline``, with the
same parameter names and the same forward of each piece over a ``BertFlow`` (``model/pipeline.py``).
Between pipeline stages travels ``(hidden, padding_mask, loss_mask)``: the layers need the padding
mask, the head the loss mask.
The masks are integer tensors, which DeepSpeed's pipeline engine sends along without gradients.
The pipeline's loss is the mean over the micro-batch's masked tokens, as without pipelining, and
the masked-token accuracy is kept beside it for the log.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import Embedding, vocab_projection
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.norms import Norm
from megatron_normformer.model.pipeline import Flow, Piece, Wire, build_pieces, build_pipeline, run_pieces
from megatron_normformer.parallel.cross_entropy import vocab_parallel_correct, vocab_parallel_cross_entropy
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_parallel, mark_vocab, vocab_range
from megatron_normformer.parallel.mappings import gather_from_tensor_parallel, gather_sequence


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
        padded = cfg.padded_vocab_size(pstate.tp_size)
        self.vocab_start, _ = vocab_range(padded, pstate.tp_rank, pstate.tp_size)
        d = cfg.hidden_size
        self.dense = _Dense(cfg, seed, device)
        self.layernorm = Norm(cfg, d, device)
        self.bias = mark_vocab(nn.Parameter(torch.zeros(padded // pstate.tp_size, device=device)))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """dense -> gelu -> LayerNorm: everything before the tied projection."""
        return self.layernorm(F.gelu(self.dense(hidden)))


def attention_mask(padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[b, s] padding mask (1 = token) -> [b, 1, 1, s] boolean, True = may attend: no query ever
    looks at padding."""
    return None if padding_mask is None else padding_mask.bool()[:, None, None, :]


class MaskedLMLoss:
    """The pipeline's loss: the mean over the micro-batch's masked tokens, from this rank's
    vocabulary slice of the logits.

    It also keeps each micro-batch's masked-token accuracy, which DeepSpeed's engine does not
    return: ``take_accuracies`` hands them over (on the last stage) and forgets them."""

    __name__ = "masked_lm_cross_entropy"

    def __init__(self, cfg: ModelConfig, pstate):
        self.vocab_size, self.group = cfg.vocab_size, pstate.tp_group
        self.vocab_start, _ = vocab_range(cfg.padded_vocab_size(pstate.tp_size), pstate.tp_rank,
                                          pstate.tp_size)
        self.accuracies: List[torch.Tensor] = []

    def __call__(self, local_logits, labels):
        target, loss_mask = labels
        selected = loss_mask.bool()
        target = target[selected]
        count = selected.sum().clamp(min=1)
        with torch.no_grad():
            correct = vocab_parallel_correct(local_logits, target, self.vocab_start, self.vocab_size, self.group)
            self.accuracies.append(correct.sum().double() / count)
        per_token = vocab_parallel_cross_entropy(local_logits, target, self.vocab_start, self.vocab_size,
                                                 self.group)
        return per_token.sum() / count.to(per_token.dtype)

    def take_accuracies(self) -> List[torch.Tensor]:
        out, self.accuracies = self.accuracies, []
        return out


# -- what each piece reads and sends ---------------------------------------------------------
@dataclass
class BertFlow(Flow):
    """What travels through the masked LM besides the hidden states."""

    padding_mask: Optional[torch.Tensor] = None  # [batch, seq], 1 = token; None: no padding
    loss_mask: Optional[torch.Tensor] = None     # [batch, seq] the positions the head predicts;
                                                 # None: every position
    output_bias: Optional[torch.Tensor] = None   # from the head to the tied projection


BERT_WIRE = Wire(BertFlow, ("hidden", "padding_mask", "loss_mask"))


def _embed(embedding: Embedding, flow: BertFlow) -> BertFlow:
    return replace(flow, hidden=embedding(flow.hidden))


def _layer(layer: NormFormerLayer, flow: BertFlow) -> BertFlow:
    return replace(flow, hidden=layer(flow.hidden, attention_mask(flow.padding_mask)))


def _final_layernorm(norm: nn.Module, flow: BertFlow) -> BertFlow:
    # Under sequence parallelism the head sees the whole sequence: it selects the masked positions.
    return replace(flow, hidden=gather_sequence(norm(flow.hidden), getattr(norm, "sp_group", None)))


def _head_transform(head: RobertaLMHead, flow: BertFlow) -> BertFlow:
    """The head up to the tied projection, on the predicted positions; hands on its output bias."""
    hidden = flow.hidden if flow.loss_mask is None else flow.hidden[flow.loss_mask.bool()]
    return replace(flow, hidden=head.transform(hidden), output_bias=head.bias)


def _tied_output(embedding: Embedding, flow: BertFlow) -> torch.Tensor:
    word = embedding.word_embeddings
    return vocab_projection(flow.hidden, word.weight, word.tp_group, flow.output_bias)


def bert_pieces(cfg: ModelConfig, pstate, seed: int, device=None) -> List[Piece]:
    """The masked LM, written once: embedding | layers 0 .. L-1 | final LayerNorm | LM head |
    the tied output projection."""
    if not cfg.bidirectional:
        raise ValueError("the masked LM needs a config with bidirectional=True")
    pieces = [Piece("embedding", Embedding, (cfg, pstate, seed, device), _embed, tied=True)]
    pieces += [Piece(f"layers.{i}", NormFormerLayer, (cfg, i, pstate, seed, device), _layer,
                     transformer_layer=True) for i in range(cfg.num_layers)]
    pieces += [Piece("final_layernorm", Norm, (cfg, cfg.hidden_size, device, pstate.sp_group),
                     _final_layernorm),
               Piece("lm_head", RobertaLMHead, (cfg, pstate, seed, device), _head_transform),
               Piece("embedding", Embedding, (cfg, pstate, seed, device), _tied_output,
                     reuses=True, tied=True)]
    return pieces


class BertModel(nn.Module):
    """Bidirectional NormFormer encoder with a RoBERTa LM head.

    ``forward(tokens, padding_mask, labels, loss_mask)`` returns the per-token loss of the masked
    positions, flattened to [num_masked] (fp32), in row-major order of ``loss_mask``. Without labels
    it returns this rank's vocabulary slice of the logits at every position.
    """

    def __init__(self, cfg: ModelConfig, pstate, seed: int = 1234, device=None):
        super().__init__()
        cfg.validate(pstate.tp_size)
        self.cfg, self.tp_group = cfg, pstate.tp_group
        self.embedding: Embedding
        self.layers: nn.ModuleList
        self.final_layernorm: nn.Module
        self.lm_head: RobertaLMHead
        self.pieces = bert_pieces(cfg, pstate, seed, device)
        build_pieces(self, self.pieces)
        self.recompute = None  # LayerRecompute, set by the trainer

    def local_logits(self, tokens, padding_mask, loss_mask=None) -> torch.Tensor:
        """This rank's vocabulary slice of the logits at the positions of ``loss_mask`` (all when
        None), in row-major order."""
        flow = BertFlow(tokens, padding_mask, loss_mask)
        return run_pieces(self, self.pieces, flow, self.recompute if self.training else None)

    def forward(self, tokens, padding_mask=None, labels=None, loss_mask=None):
        if labels is None:
            return self.local_logits(tokens, padding_mask)
        selected = loss_mask.bool() if loss_mask is not None else labels >= 0
        logits = self.local_logits(tokens, padding_mask, selected)
        return vocab_parallel_cross_entropy(logits, labels[selected], self.lm_head.vocab_start,
                                            self.cfg.vocab_size, self.tp_group)

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel(local_logits, self.tp_group)[..., : self.cfg.vocab_size]


class MaskedLMModel(BertModel):
    """``BertModel`` whose training forward also says which masked tokens it predicted right.

    ``forward(tokens, padding_mask, labels, loss_mask)`` returns ``(per-token loss, correct)``, both
    [num_masked] in row-major order of ``loss_mask``. Parameter names are BertModel's, so its
    checkpoints are BertModel checkpoints.
    """

    def forward(self, tokens, padding_mask, labels, loss_mask):
        selected = loss_mask.bool()
        target = labels[selected]
        logits = self.local_logits(tokens, padding_mask, selected)
        start, vocab = self.lm_head.vocab_start, self.cfg.vocab_size
        correct = vocab_parallel_correct(logits, target, start, vocab, self.tp_group)
        return vocab_parallel_cross_entropy(logits, target, start, vocab, self.tp_group), correct


def build_bert_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                        activation_checkpoint_interval: int = 0):
    """The masked LM as a ``PipelineModule`` over ``pstate``'s layout."""
    cfg.validate(pstate.tp_size)
    return build_pipeline(bert_pieces(cfg, pstate, seed), BERT_WIRE, pstate, MaskedLMLoss(cfg, pstate),
                          activation_checkpoint_interval)
