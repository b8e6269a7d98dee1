"""The NormFormer GPT as a DeepSpeed ``PipelineModule`` (1F1B through DeepSpeed's pipeline engine).

The stages see the model as a flat sequence, cut by the rule in ``model/pipeline.py``:

    EmbeddingPipe (tied) | NormFormer layer 0 .. L-1 | final LayerNorm | LM head (tied to the embedding)

Only the hidden states travel between stages (causal attention needs no mask). Under
``--reset-attention-mask`` the segment ids travel with them ([batch, seq] integers, no gradient)
and each layer builds the block-diagonal causal mask from them; under ``--reset-position-ids`` the
first stage also takes the position ids; under ``--eod-mask-loss`` the last stage's labels come
with the loss mask (``training/tasks.py`` builds the matching batch).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.attention import document_causal_mask
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.model.pipeline import TIED_EMBEDDING_KEY, build_pipeline_module
from megatron_normformer.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_vocab
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel


class EmbeddingPipe(Embedding):
    def forward(self, tokens):  # noqa: D102 - the pipeline feeds one tensor between stages
        return super().forward(tokens)


class DocumentEmbeddingPipe(Embedding):
    """The first stage under the document flags: (tokens, [position_ids], [segment_ids]) in,
    hidden (and the segment ids) out."""

    def __init__(self, cfg: ModelConfig, pstate, seed: int, reset_position_ids: bool,
                 reset_attention_mask: bool):
        super().__init__(cfg, pstate, seed)
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask

    def forward(self, inputs):
        tokens, *rest = inputs
        position_ids = rest.pop(0) if self.reset_position_ids else None
        hidden = super().forward(tokens, position_ids)
        return (hidden, rest[0]) if self.reset_attention_mask else hidden


class DocumentLayerPipe(NormFormerLayer):
    def forward(self, inputs):  # noqa: D102 - (hidden, segment ids) in and out
        hidden, segment_ids = inputs
        return super().forward(hidden, document_causal_mask(segment_ids)), segment_ids


class DocumentFinalLayerNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int):
        super().__init__()
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)

    def forward(self, inputs):
        return self.final_layernorm(inputs[0])


def _tied_lm_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(copy_to_tensor_parallel(hidden, embedding.word_embeddings.tp_group),
                    embedding.word_embeddings.weight)


class NormFormerLayerPipe(NormFormerLayer):
    def forward(self, hidden):  # noqa: D102 - causal: no mask travels between stages
        return super().forward(hidden, None)


class FinalLayerNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int):
        super().__init__()
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)

    def forward(self, hidden):
        return self.final_layernorm(hidden)


class UntiedOutputPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int):
        super().__init__()
        self.tp_group = pstate.tp_group
        padded = cfg.padded_vocab_size(pstate.tp_size)
        self.weight = mark_vocab(nn.Parameter(torch.empty(padded // pstate.tp_size, cfg.hidden_size)))
        fill_shard(self.weight, WeightInit(cfg, seed).embedding("output_layer.weight"),
                   (padded, cfg.hidden_size), 0, pstate.tp_rank, pstate.tp_size)

    def forward(self, hidden):
        return F.linear(copy_to_tensor_parallel(hidden, self.tp_group), self.weight)


class VocabParallelLoss:
    """Pipeline loss: mean token loss from this rank's vocabulary slice of the logits."""

    __name__ = "vocab_parallel_cross_entropy"

    def __init__(self, cfg: ModelConfig, pstate):
        self.vocab_size, self.group = cfg.vocab_size, pstate.tp_group
        self.vocab_start = pstate.tp_rank * (cfg.padded_vocab_size(pstate.tp_size) // pstate.tp_size)

    def __call__(self, local_logits, labels):
        loss_mask = None
        if isinstance(labels, (tuple, list)):  # --eod-mask-loss
            labels, loss_mask = labels
        per_token = vocab_parallel_cross_entropy(local_logits, labels, self.vocab_start,
                                                 self.vocab_size, self.group)
        return per_token.mean() if loss_mask is None else masked_mean(per_token, loss_mask)


def build_gpt_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                       activation_checkpoint_interval: int = 0, reset_position_ids: bool = False,
                       reset_attention_mask: bool = False, eod_mask_loss: bool = False):
    """A ``PipelineModule`` over ``pstate``'s layout (TP fastest, then DP, then PP). The reset
    flags change what travels between stages; ``eod_mask_loss`` needs nothing here (the loss
    reads the mask beside the labels)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg.validate(pstate.tp_size)
    tied = not cfg.untie_embeddings_and_output_weights
    first, first_args, layer, final = EmbeddingPipe, (), NormFormerLayerPipe, FinalLayerNormPipe
    if reset_position_ids or reset_attention_mask:
        first, first_args = DocumentEmbeddingPipe, (reset_position_ids, reset_attention_mask)
    if reset_attention_mask:
        layer, final = DocumentLayerPipe, DocumentFinalLayerNormPipe
    specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, first, cfg, pstate, seed, *first_args,
                           tied_weight_attr=["word_embeddings.weight"]) if tied
             else LayerSpec(first, cfg, pstate, seed, *first_args)]
    specs += [LayerSpec(layer, cfg, i, pstate, seed) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(final, cfg, pstate, seed))
    specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, cfg, pstate, seed,
                               forward_fn=_tied_lm_head, tied_weight_attr=["word_embeddings.weight"])
                 if tied else LayerSpec(UntiedOutputPipe, cfg, pstate, seed))
    return build_pipeline_module(specs, cfg.num_layers, pstate, VocabParallelLoss(cfg, pstate),
                                 activation_checkpoint_interval, layer.__name__)
