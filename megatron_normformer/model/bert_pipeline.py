"""The NormFormer masked LM as a DeepSpeed ``PipelineModule``, cut by the rule in ``model/pipeline.py``:

    BertEmbeddingPipe (tied) | NormFormer layer 0 .. L-1 | final LayerNorm | LM head transform |
    tied projection (+ output bias)

Between stages travels ``(hidden, padding_mask, loss_mask)``: the layers need the padding mask, the
head the loss mask, which selects the masked positions before the head as ``BertModel`` does (so the
vocabulary projection costs 15 % of a full one). The masks are integer tensors, which DeepSpeed's
pipeline engine sends along without gradients. The loss is the mean over the micro-batch's masked
tokens, as without pipelining, and the masked-token accuracy is kept beside it for the log.
Parameter names map onto ``BertModel``'s (``universal.py``).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.bert import RobertaLMHead, attention_mask, tied_projection
from megatron_normformer.model.embeddings import Embedding
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.norms import LayerNorm
from megatron_normformer.model.pipeline import TIED_EMBEDDING_KEY, build_pipeline_module
from megatron_normformer.parallel.cross_entropy import vocab_parallel_correct, vocab_parallel_cross_entropy


class BertEmbeddingPipe(Embedding):
    def forward(self, inputs):  # noqa: D102 - (tokens, padding_mask, loss_mask) from the data
        tokens, padding_mask, loss_mask = inputs
        return super().forward(tokens), padding_mask, loss_mask


class BertLayerPipe(NormFormerLayer):
    def forward(self, inputs):  # noqa: D102
        hidden, padding_mask, loss_mask = inputs
        return super().forward(hidden, attention_mask(padding_mask)), padding_mask, loss_mask


class BertFinalLayerNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, pstate, seed: int):
        super().__init__()
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)

    def forward(self, inputs):
        hidden, _, loss_mask = inputs
        return self.final_layernorm(hidden), loss_mask


class LMHeadTransformPipe(RobertaLMHead):
    """The head up to the tied projection, on the masked positions; hands on its output bias."""

    def forward(self, inputs):
        hidden, loss_mask = inputs
        return self.transform(hidden[loss_mask.bool()]), self.bias


def _tied_projection(embedding: BertEmbeddingPipe, inputs) -> torch.Tensor:
    h, bias = inputs
    return tied_projection(h, embedding.word_embeddings.weight, bias, embedding.word_embeddings.tp_group)


class MaskedLMLoss:
    """Pipeline loss: mean over the micro-batch's masked tokens from this rank's vocabulary slice.

    It also keeps each micro-batch's masked-token accuracy, which DeepSpeed's engine does not
    return: ``take_accuracies`` hands them over (on the last stage) and forgets them."""

    __name__ = "masked_lm_cross_entropy"

    def __init__(self, cfg: ModelConfig, pstate):
        self.vocab_size, self.group = cfg.vocab_size, pstate.tp_group
        self.vocab_start = pstate.tp_rank * (cfg.padded_vocab_size(pstate.tp_size) // pstate.tp_size)
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


def build_bert_pipeline(cfg: ModelConfig, pstate, seed: int = 1234,
                        activation_checkpoint_interval: int = 0):
    """A ``PipelineModule`` of the masked LM over ``pstate``'s layout (TP fastest, then DP, then PP)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if not cfg.bidirectional:
        raise ValueError("the masked-LM pipeline needs a config with bidirectional=True")
    cfg.validate(pstate.tp_size)
    tied = dict(tied_weight_attr=["word_embeddings.weight"])
    specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, BertEmbeddingPipe, cfg, pstate, seed, **tied)]
    specs += [LayerSpec(BertLayerPipe, cfg, i, pstate, seed) for i in range(cfg.num_layers)]
    specs += [LayerSpec(BertFinalLayerNormPipe, cfg, pstate, seed),
              LayerSpec(LMHeadTransformPipe, cfg, pstate, seed),
              TiedLayerSpec(TIED_EMBEDDING_KEY, BertEmbeddingPipe, cfg, pstate, seed,
                            forward_fn=_tied_projection, **tied)]
    return build_pipeline_module(specs, cfg.num_layers, pstate, MaskedLMLoss(cfg, pstate),
                                 activation_checkpoint_interval, "BertLayerPipe")
