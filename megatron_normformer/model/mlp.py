"""The FFN: column-parallel W_1, activation, NormFormer's FFN LN over all of F, row-parallel W_2."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.norms import PartitionedLayerNorm
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.layers import ColumnParallelLinear, RowParallelLinear


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATION_FNS = {
    "gelu": F.gelu,  # exact (erf) form
    "relu": F.relu,
    "relu_squared": relu_squared,
}


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, pstate, seed: int, device=None):
        super().__init__()
        prefix = f"layers.{layer_number}.mlp"
        groups = (pstate.tp_group, pstate.tp_rank, pstate.tp_size)
        init = WeightInit(cfg, seed)
        self.activation = ACTIVATION_FNS[cfg.activation_fn]
        weight, bias = init.linear(f"{prefix}.fc1", cfg.hidden_size, output=False)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, *groups, device=device,
                                        init=weight, bias_init=bias, sp_group=pstate.sp_group)
        self.ffn_layernorm = (
            PartitionedLayerNorm(cfg.ffn_hidden_size // pstate.tp_size, cfg.layernorm_epsilon,
                                 pstate.tp_group, device=device)
            if cfg.scale_fc else None)
        weight, bias = init.linear(f"{prefix}.fc2", cfg.ffn_hidden_size, output=True)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, *groups, device=device,
                                     init=weight, bias_init=bias, sp_group=pstate.sp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.activation(self.fc1(x))
        if self.ffn_layernorm is not None:
            u = self.ffn_layernorm(u)
        return self.fc2(u)
