"""The model's norms, of the kind ``--normalization`` picks: LayerNorm (apex's fused kernel when
importable) or RMSNorm, replicated, and the partitioned FFN norm. Modules get theirs from
:func:`Norm` and :func:`PartitionedNorm`, so no call site chooses the kind.

The FFN LN normalises the FFN inner activation u of size F. Under tensor parallelism u is split along
F, so a per-shard LayerNorm would make the model depend on the TP degree (what metaseq and NeMo do).
:class:`PartitionedLayerNorm` computes the exact LayerNorm over all of F: each rank's mean and sum of
squared deviations are combined across the group (Chan et al.'s parallel variance, stable in fp32),
and the backward all-reduces the two per-token sums the input gradient needs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.config import ModelConfig
from megatron_normformer.parallel.layers import mark_parallel, sequence_parallel_param
from megatron_normformer.parallel.mappings import (all_reduce_no_grad, copy_to_tensor_parallel,
                                                   reduce_from_tensor_parallel)

try:  # apex is optional: used when importable, never required
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _ApexLayerNorm = None


class SequenceParallelLayerNorm(nn.LayerNorm):
    """A replicated LayerNorm applied to this rank's slice of the sequence: its weight and bias
    gradients are summed over the sequence-parallel group (``sequence_parallel_param``)."""

    def __init__(self, hidden_size: int, eps: float, sp_group, device=None):
        super().__init__(hidden_size, eps=eps, device=device)
        self.sp_group = sp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, sequence_parallel_param(self.weight, self.sp_group),
                            sequence_parallel_param(self.bias, self.sp_group), self.eps)


def LayerNorm(hidden_size: int, eps: float, device=None, sp_group=None) -> nn.Module:
    """A replicated LayerNorm; apex's fused kernel on GPU when apex is installed. With ``sp_group``
    (sequence parallelism) it sees this rank's tokens only and sums its gradients over the group."""
    if sp_group is not None:
        norm = SequenceParallelLayerNorm(hidden_size, eps, sp_group, device)
    elif _ApexLayerNorm is not None and torch.cuda.is_available() and (device is None or str(device) != "meta"):
        norm = _ApexLayerNorm(hidden_size, eps=eps)
    else:
        norm = nn.LayerNorm(hidden_size, eps=eps, device=device)
    for p in norm.parameters():
        mark_parallel(p, None)
    return norm


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _PartitionedLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        world = _group_size(group)
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        n_local = xf.size(-1)
        n_total = n_local * world
        local_mean = xf.mean(dim=-1)
        local_m2 = (xf - local_mean.unsqueeze(-1)).square().sum(dim=-1)
        if world > 1:
            stats = torch.stack([local_mean, local_m2])
            gathered = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(gathered, stats.contiguous(), group=group)
            gathered = torch.stack(gathered)  # [world, 2, ...]
            means, m2s = gathered[:, 0], gathered[:, 1]
            mean = means.mean(dim=0)
            m2 = m2s.sum(dim=0) + n_local * (means - mean).square().sum(dim=0)
        else:
            mean, m2 = local_mean, local_m2
        rstd = torch.rsqrt(m2 / n_total + eps)
        xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        y = xhat * weight.to(compute) + bias.to(compute)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.group, ctx.n_total = group, n_total
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        xhat, rstd, weight = ctx.saved_tensors
        gy = grad_y.to(xhat.dtype)
        grad_xhat = gy * weight.to(xhat.dtype)
        sums = torch.stack([grad_xhat.sum(dim=-1), (grad_xhat * xhat).sum(dim=-1)])
        all_reduce_no_grad(sums, ctx.group)
        mean_g, mean_gx = sums[0] / ctx.n_total, sums[1] / ctx.n_total
        grad_x = (grad_xhat - mean_g.unsqueeze(-1) - xhat * mean_gx.unsqueeze(-1)) * rstd.unsqueeze(-1)
        reduce_dims = tuple(range(gy.dim() - 1))
        grad_w = (gy * xhat).sum(dim=reduce_dims).to(weight.dtype)
        grad_b = gy.sum(dim=reduce_dims).to(weight.dtype)
        return grad_x.to(grad_y.dtype), grad_w, grad_b, None, None


def partitioned_layer_norm(x, weight, bias, eps: float, group) -> torch.Tensor:
    """Exact LayerNorm over the last dimension of ``x`` concatenated across ``group``."""
    if _group_size(group) == 1:
        return F.layer_norm(x, (x.size(-1),), weight, bias, eps)
    return _PartitionedLayerNormFunction.apply(x, weight, bias, eps, group)


class PartitionedLayerNorm(nn.Module):
    """LayerNorm over a dimension split across the TP group; gamma/beta split the same way."""

    def __init__(self, local_size: int, eps: float, tp_group, device=None):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = mark_parallel(nn.Parameter(torch.ones(local_size, device=device)), 0)
        self.bias = mark_parallel(nn.Parameter(torch.zeros(local_size, device=device)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return partitioned_layer_norm(x, self.weight, self.bias, self.eps, self.tp_group)


# -- RMSNorm ------------------------------------------------------------------------------------

def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 (or wider), where the normalisation is computed."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms_normalise(x: torch.Tensor, wide: torch.Tensor, weight: torch.Tensor,
                   mean_square: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms) with the division on ``wide`` (``_wide(x)``, one copy shared with the
    mean square) and the product in x's dtype: transformers' LlamaRMSNorm semantics."""
    return weight * (wide * torch.rsqrt(mean_square + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = _wide(x)
    return _rms_normalise(x, wide, weight, wide.square().mean(dim=-1, keepdim=True), eps)


class RMSNorm(nn.Module):
    """Replicated RMSNorm: a weight, no bias. With ``sp_group`` it sees this rank's tokens and sums
    its weight's gradient over the group, like :class:`SequenceParallelLayerNorm`."""

    def __init__(self, hidden_size: int, eps: float, device=None, sp_group=None):
        super().__init__()
        self.eps, self.sp_group = eps, sp_group
        self.weight = mark_parallel(nn.Parameter(torch.ones(hidden_size, device=device)), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, sequence_parallel_param(self.weight, self.sp_group), self.eps)


def partitioned_rms_norm(x, weight, eps: float, group) -> torch.Tensor:
    """Exact RMSNorm over the last dimension of ``x`` concatenated across ``group``: the sum of
    squares is all-reduced forward, and its gradient (every rank's output depends on it) all-reduced
    backward: reduce_from (sum forward) composed with copy_to (sum backward)."""
    wide = _wide(x)
    square_sum = wide.square().sum(dim=-1, keepdim=True)
    square_sum = copy_to_tensor_parallel(reduce_from_tensor_parallel(square_sum, group), group)
    return _rms_normalise(x, wide, weight, square_sum / (x.size(-1) * _group_size(group)), eps)


class PartitionedRMSNorm(nn.Module):
    """RMSNorm over a dimension split across the TP group; its weight split the same way."""

    def __init__(self, local_size: int, eps: float, tp_group, device=None):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = mark_parallel(nn.Parameter(torch.ones(local_size, device=device)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return partitioned_rms_norm(x, self.weight, self.eps, self.tp_group)


# -- the kind --normalization picks ----------------------------------------------------------------

def Norm(cfg: ModelConfig, size: int, device=None, sp_group=None) -> nn.Module:
    """A replicated norm over ``size`` features of the model's kind (``cfg.normalization``)."""
    if cfg.normalization == "RMSNorm":
        return RMSNorm(size, cfg.layernorm_epsilon, device, sp_group)
    return LayerNorm(size, cfg.layernorm_epsilon, device, sp_group)


def PartitionedNorm(cfg: ModelConfig, local_size: int, tp_group, device=None) -> nn.Module:
    """The model's kind of norm over a dimension split across ``tp_group`` (``local_size`` here),
    exact over the whole dimension at any TP degree."""
    kind = PartitionedRMSNorm if cfg.normalization == "RMSNorm" else PartitionedLayerNorm
    return kind(local_size, cfg.layernorm_epsilon, tp_group, device=device)
