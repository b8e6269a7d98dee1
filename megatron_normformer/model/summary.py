"""Parameter counts of a model built on the meta device: no memory, any size, in seconds."""
from __future__ import annotations

import torch

from megatron_normformer.config import ModelConfig, normformer_extra_parameters
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
    from megatron_normformer.model.gpt import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg, SingleProcessState(), device="meta")
    padding_rows = cfg.padded_vocab_size(1) - cfg.vocab_size
    padding = padding_rows * cfg.hidden_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    embeddings = _numel(model.embedding) - padding_rows * cfg.hidden_size
    per_layer = _numel(model.layers[0])
    output = 0
    if model.head.weight is not None:
        output = model.head.weight.numel() - padding_rows * cfg.hidden_size
    total = _numel(model) - padding
    with torch.device("meta"):
        shard = GPTModel(cfg, _ShapeOnlyState(tensor_parallel_size), device="meta")
    return {
        "total_parameters": total,
        "tensor_model_parallel_size": tensor_parallel_size,
        "parameters_per_tp_rank": _numel(shard),
        "embedding_parameters": embeddings,
        "parameters_per_layer": per_layer,
        "num_layers": cfg.num_layers,
        "final_layernorm_parameters": _numel(model.head.final_layernorm),
        "output_layer_parameters": output,
        "normformer_extra_parameters": normformer_extra_parameters(cfg),
        "non_embedding_parameters": total - embeddings - output,
        "vocab_padding_parameters": padding,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "activation_fn": cfg.activation_fn,
        "normformer": {k: getattr(cfg, k) for k in ("scale_attn", "scale_fc", "scale_heads", "scale_resids")},
    }
