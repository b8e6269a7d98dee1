"""The FFN: column-parallel W_1, activation, NormFormer's FFN norm over all of F, row-parallel W_2.

With ``--swiglu`` the FFN is gated, (silu(x W_gate) * (x W_up)) W_2. Gate and up stay one
column-parallel linear ``fc1`` of 2F rows, interleaved: row 2i is gate unit i, row 2i + 1 up unit i.
A contiguous TP cut of fc1 therefore hands every rank the gate and up rows of the same units, so the
checkpoint, conversion and sharding rules stay the contiguous ones and do not depend on TP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.norms import PartitionedNorm
from megatron_normformer.model.initialization import WeightInit
from megatron_normformer.parallel.layers import ColumnParallelLinear, RowParallelLinear


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATION_FNS = {
    "gelu": F.gelu,  # exact (erf) form
    "relu": F.relu,
    "relu_squared": relu_squared,
}


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of fc1's interleaved output [..., 2F] -> [..., F]."""
    gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, pstate, seed: int, device=None):
        super().__init__()
        prefix = f"layers.{layer_number}.mlp"
        groups = (pstate.tp_group, pstate.tp_rank, pstate.tp_size)
        init = WeightInit(cfg, seed)
        self.activation = swiglu if cfg.swiglu else ACTIVATION_FNS[cfg.activation_fn]
        fc1_size = (2 if cfg.swiglu else 1) * cfg.ffn_hidden_size
        bias = cfg.add_bias_linear
        weight, bias_init = init.linear(f"{prefix}.fc1", cfg.hidden_size, output=False)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, fc1_size, *groups, device=device,
                                        init=weight, bias=bias, bias_init=bias_init,
                                        sp_group=pstate.sp_group)
        self.ffn_layernorm = (
            PartitionedNorm(cfg, cfg.ffn_hidden_size // pstate.tp_size, pstate.tp_group, device)
            if cfg.scale_fc else None)
        weight, bias_init = init.linear(f"{prefix}.fc2", cfg.ffn_hidden_size, output=True)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, *groups, device=device,
                                     init=weight, bias=bias, bias_init=bias_init,
                                     sp_group=pstate.sp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.activation(self.fc1(x))
        if self.ffn_layernorm is not None:
            u = self.ffn_layernorm(u)
        return self.fc2(u)
