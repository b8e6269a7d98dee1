"""The NormFormer GPT as a DeepSpeed ``PipelineModule`` (1F1B through DeepSpeed's pipeline engine).

The stages see the model as a flat sequence, cut by the rule in ``model/pipeline.py``:

    EmbeddingPipe (tied) | NormFormer layer 0 .. L-1 | final LayerNorm | LM head (tied to the embedding)

Only the hidden states travel between stages (causal attention needs no mask).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.model.pipeline import TIED_EMBEDDING_KEY, build_pipeline_module
from megatron_normformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.init import fill_shard
from megatron_normformer.parallel.layers import mark_vocab
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel


class EmbeddingPipe(Embedding):
    def forward(self, tokens):  # noqa: D102 - the pipeline feeds one tensor between stages
        return super().forward(tokens)


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
        return vocab_parallel_cross_entropy(local_logits, labels, self.vocab_start, self.vocab_size,
                                            self.group).mean()


def build_gpt_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                       activation_checkpoint_interval: int = 0):
    """A ``PipelineModule`` over ``pstate``'s layout (TP fastest, then DP, then PP)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg.validate(pstate.tp_size)
    tied = not cfg.untie_embeddings_and_output_weights
    specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, cfg, pstate, seed,
                           tied_weight_attr=["word_embeddings.weight"]) if tied
             else LayerSpec(EmbeddingPipe, cfg, pstate, seed)]
    specs += [LayerSpec(NormFormerLayerPipe, cfg, i, pstate, seed) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalLayerNormPipe, cfg, pstate, seed))
    specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, cfg, pstate, seed,
                               forward_fn=_tied_lm_head, tied_weight_attr=["word_embeddings.weight"])
                 if tied else LayerSpec(UntiedOutputPipe, cfg, pstate, seed))
    return build_pipeline_module(specs, cfg.num_layers, pstate, VocabParallelLoss(cfg, pstate),
                                 activation_checkpoint_interval, "NormFormerLayerPipe")
