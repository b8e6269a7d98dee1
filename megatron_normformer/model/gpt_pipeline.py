"""The NormFormer GPT as a DeepSpeed ``PipelineModule`` (1F1B through DeepSpeed's pipeline engine).

The stages see the model as a flat sequence:

    EmbeddingPipe (tied) | NormFormer layer 0 .. L-1 | final LayerNorm | LM head (tied to the embedding)

Partition rule: the L transformer layers are split as evenly as possible and the first L mod P
stages get one layer more; the embedding lives on the first stage, the final LayerNorm and the head
on the last. With tied embeddings the last stage holds a copy of the word embedding; both copies are
initialised from the same stream (layout-invariant init) and DeepSpeed all-reduces their gradients
over the pair of stages.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_normformer.parallel.layers import InitSpec, fill_shard, mark_vocab
from megatron_normformer.parallel.mappings import copy_to_tensor_parallel

TIED_EMBEDDING_KEY = "word_embeddings"


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
        fill_shard(self.weight, InitSpec(seed, "output_layer.weight", cfg.init_method_std),
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


def stage_layer_counts(num_layers: int, num_stages: int) -> List[int]:
    """Transformer layers per stage: as even as possible, earlier stages take the remainder."""
    if num_layers < num_stages:
        raise ValueError(f"--num-layers ({num_layers}) must be at least "
                         f"--pipeline-model-parallel-size ({num_stages})")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def build_gpt_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                       activation_checkpoint_interval: int = 0):
    """A ``PipelineModule`` over ``pstate``'s layout (TP fastest, then DP, then PP)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    cfg.validate(pstate.tp_size)
    # PipelineModule talks through deepspeed.comm, which wraps the already-initialised torch group.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    counts = stage_layer_counts(cfg.num_layers, pstate.pp_size)
    tied = not cfg.untie_embeddings_and_output_weights
    specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, cfg, pstate, seed,
                           tied_weight_attr=["word_embeddings.weight"]) if tied
             else LayerSpec(EmbeddingPipe, cfg, pstate, seed)]
    specs += [LayerSpec(NormFormerLayerPipe, cfg, i, pstate, seed) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalLayerNormPipe, cfg, pstate, seed))
    specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, cfg, pstate, seed,
                               forward_fn=_tied_lm_head, tied_weight_attr=["word_embeddings.weight"])
                 if tied else LayerSpec(UntiedOutputPipe, cfg, pstate, seed))

    # Stage boundaries in the spec list: embedding first, final LN + head last.
    bounds = [0]
    for s, n in enumerate(counts):
        bounds.append(bounds[-1] + n + (1 if s == 0 else 0))
    bounds[-1] = len(specs)

    class GPTPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):  # our stated rule, not DeepSpeed's DP
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

    topology = PipeModelDataParallelTopology(num_pp=pstate.pp_size, num_mp=pstate.tp_size,
                                             num_dp=pstate.dp_size)
    return GPTPipelineModule(specs, topology=topology, loss_fn=VocabParallelLoss(cfg, pstate),
                             activation_checkpoint_interval=activation_checkpoint_interval,
                             checkpointable_layers=["NormFormerLayerPipe"])
