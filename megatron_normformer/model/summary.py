"""Parameter counts of a model built on the meta device: no memory, any size, in seconds."""
from __future__ import annotations

import torch

from megatron_normformer.config import ModelConfig, normformer_extra_parameters
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


class _ShapeOnlyState(SingleProcessState):
    """Shapes of TP rank 0 at degree ``tp``; no groups (meta-device counting only)."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp_size = tp


def summarize(cfg: ModelConfig, tensor_parallel_size: int = 1) -> dict:
    """Counts for the real vocabulary (padding rows excluded); per-rank counts at the given TP."""
    model_cls = BertModel if cfg.bidirectional else GPTModel
    with torch.device("meta"):
        model = model_cls(cfg, SingleProcessState(), device="meta")
    padding_rows = cfg.padded_vocab_size(1) - cfg.vocab_size
    # Padding rows: the word embedding, an untied output layer, the masked LM's output bias.
    padding = padding_rows * cfg.hidden_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    padding += padding_rows if cfg.bidirectional else 0
    embeddings = _numel(model.embedding) - padding_rows * cfg.hidden_size
    per_layer = _numel(model.layers[0])
    total = _numel(model) - padding
    output = total - embeddings - per_layer * cfg.num_layers  # final LN + LM head
    with torch.device("meta"):
        shard = model_cls(cfg, _ShapeOnlyState(tensor_parallel_size), device="meta")
    return {
        "total_parameters": total,
        "tensor_model_parallel_size": tensor_parallel_size,
        "parameters_per_tp_rank": _numel(shard),
        "embedding_parameters": embeddings,
        "parameters_per_layer": per_layer,
        "num_layers": cfg.num_layers,
        "head_parameters": output,
        "normformer_extra_parameters": normformer_extra_parameters(cfg),
        "non_embedding_parameters": total - embeddings,
        "vocab_padding_parameters": padding,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.query_groups,
        "activation_fn": "swiglu" if cfg.swiglu else cfg.activation_fn,
        "position_embedding_type": cfg.position_embedding_type,
        "normalization": cfg.normalization,
        "add_bias_linear": cfg.add_bias_linear,
        "untie_embeddings_and_output_weights": cfg.untie_embeddings_and_output_weights,
        "normformer": {k: getattr(cfg, k) for k in ("scale_attn", "scale_fc", "scale_heads", "scale_resids")},
    }
