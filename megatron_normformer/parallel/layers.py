"""Megatron-style tensor-parallel layers.

A weight's shard carries two attributes that the rest of the code (gradient gathering, checkpoint
conversion, weight-decay grouping) reads instead of guessing:

- ``tensor_model_parallel``: True when the parameter is split across the TP group;
- ``partition_dim``: the dimension it is split along.

Replicated parameters have ``tensor_model_parallel = False``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_normformer.parallel.init import InitSpec, fill_shard
from megatron_normformer.parallel.mappings import (
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    gather_sequence_no_grad,
    reduce_from_tensor_parallel,
    reduce_scatter_sequence_no_grad,
    reduce_scatter_to_sequence_parallel,
)


def sequence_parallel_param(param: torch.Tensor, sp_group) -> torch.Tensor:
    """A replicated parameter used on this rank's slice of the sequence: identity forward, and the
    gradient summed over the group backward, so that every rank holds the gradient of the whole
    sequence before the optimizer (or ZeRO's reduction) sees it. The identity without a group."""
    return param if sp_group is None else copy_to_tensor_parallel(param, sp_group)


def mark_parallel(param: torch.Tensor, partition_dim: Optional[int]) -> torch.Tensor:
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim
    return param


def counted_on_tp_rank(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether TP rank ``tp_rank`` counts ``param`` in what the TP group adds up or writes once:
    every rank its own shard of a split parameter, rank 0 alone a replicated one."""
    return getattr(param, "tensor_model_parallel", False) or tp_rank == 0


def vocab_range(padded_vocab_size: int, tp_rank: int, tp_size: int) -> Tuple[int, int]:
    """The rows [start, end) of the padded vocabulary that TP rank ``tp_rank`` holds: equal
    contiguous slices in rank order (embedding, output layer, output bias, their logits)."""
    per_rank = padded_vocab_size // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def mark_vocab(param: torch.Tensor) -> torch.Tensor:
    """A parameter whose dim 0 is the padded vocabulary, split across the TP group."""
    mark_parallel(param, 0)
    param.vocab_padded = True
    return param


class _ParallelLinear(nn.Module):
    partition_dim: int  # of the [out, in] weight

    def __init__(self, input_size: int, output_size: int, tp_group, tp_rank: int, tp_size: int,
                 init: InitSpec, bias: bool = True, bias_init: Optional[InitSpec] = None,
                 device=None, sp_group=None):
        """``bias_init``: how to draw the bias (zeros when None). ``sp_group``: the group the
        sequence is split over outside this op (sequence parallelism), None when it is not."""
        super().__init__()
        self.tp_group, self.tp_size, self.sp_group = tp_group, tp_size, sp_group
        full = (output_size, input_size)
        local = list(full)
        local[self.partition_dim] //= tp_size
        self.weight = mark_parallel(nn.Parameter(torch.empty(*local, device=device)), self.partition_dim)
        fill_shard(self.weight, init, full, self.partition_dim, tp_rank, tp_size)
        if bias:
            bias_partition = 0 if self.partition_dim == 0 else None
            self.bias = mark_parallel(nn.Parameter(torch.zeros(local[0], device=device)), bias_partition)
            if bias_init is not None:
                fill_shard(self.bias, bias_init, (output_size,), bias_partition, tp_rank, tp_size)
        else:
            self.register_parameter("bias", None)


class _SequenceParallelLinear(torch.autograd.Function):
    """gather(x) W^T + b that keeps only this rank's slice of x for the backward pass and gathers it
    again there: one more all-gather per layer buys the saved input's (TP - 1) / TP (Megatron's
    trade; without it sequence parallelism would save little at the two column-parallel inputs).
    The backward computes in the incoming gradient's dtype, as autocast's forward did."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(gather_sequence_no_grad(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_input = reduce_scatter_sequence_no_grad(grad.matmul(weight.to(grad.dtype)), ctx.group)
        full = gather_sequence_no_grad(x, ctx.group).to(grad.dtype)
        flat_grad = grad.reshape(-1, grad.size(-1))
        grad_weight = flat_grad.t().matmul(full.reshape(-1, full.size(-1))).to(weight.dtype)
        grad_bias = flat_grad.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_input.to(x.dtype), grad_weight, grad_bias, None


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by rows (output features) across the TP group.

    The input is replicated (or, under sequence parallelism, this rank's slice of the sequence,
    gathered here); the output is this rank's slice of the features unless ``gather_output``.
    """

    partition_dim = 0

    def __init__(self, *args, gather_output: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_group is not None:
            y = _SequenceParallelLinear.apply(x, self.weight, self.bias, self.sp_group)
        else:
            y = F.linear(copy_to_tensor_parallel(x, self.tp_group), self.weight, self.bias)
        return gather_from_tensor_parallel(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by columns (input features): the input arrives already split,
    partial products are summed over the TP group, the (replicated) bias is added once. Under
    sequence parallelism the sum is reduce-scattered: each rank keeps its slice of the sequence."""

    partition_dim = 1

    def forward(self, x: torch.Tensor, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_scale``: optional scale of this rank's input features, computing (x * s) A^T.

        It is applied to whichever of x and A is smaller: with at least as many input rows (tokens)
        as output features, scaling A's columns reads and writes fewer elements, forward and
        backward, than scaling x (HeadScale in training); a short x (one decoding step) is scaled.
        """
        weight = self.weight
        if input_scale is not None:
            if x.numel() // x.size(-1) >= weight.size(0):
                weight = weight * input_scale.to(weight.dtype)
            else:
                x = x * input_scale.to(x.dtype)
        if self.sp_group is None:
            y = reduce_from_tensor_parallel(F.linear(x, weight), self.tp_group)
            return y + self.bias if self.bias is not None else y
        y = reduce_scatter_to_sequence_parallel(F.linear(x, weight), self.sp_group)
        # Each rank adds the bias to its own tokens only: the bias gradient is summed over the group.
        return y + sequence_parallel_param(self.bias, self.sp_group) if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding split by vocabulary rows across the TP group.

    Rows at or past ``vocab_size`` (padding up to a TP-friendly size) are zero and never looked up.
    """

    def __init__(self, padded_vocab_size: int, vocab_size: int, hidden_size: int, tp_group,
                 tp_rank: int, tp_size: int, init: InitSpec, device=None):
        super().__init__()
        self.tp_group = tp_group
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab_size, tp_rank, tp_size)
        rows = self.vocab_end - self.vocab_start
        self.weight = mark_vocab(nn.Parameter(torch.empty(rows, hidden_size, device=device)))
        fill_shard(self.weight, init, (padded_vocab_size, hidden_size), 0, tp_rank, tp_size)
        if self.weight.device.type != "meta":
            padded_from = max(0, vocab_size - self.vocab_start)
            with torch.no_grad():
                self.weight[padded_from:].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None or torch.distributed.get_world_size(self.tp_group) == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.tp_group)
