"""Autograd-aware collectives over the tensor-parallel group.

Each function is the identity when the group has one rank. The pairs are conjugate: the backward of
``copy_to_tensor_parallel`` is the forward of ``reduce_from_tensor_parallel`` and so on.

Sequence parallelism (Megatron's ``--sequence-parallel``) splits the activations outside the
tensor-parallel regions along the sequence (dimension 1 of [batch, seq, hidden]) across the same
group; three more conjugate maps move between the two forms:

    scatter_to_sequence_parallel        split            | all-gather
    reduce_scatter_to_sequence_parallel reduce-scatter   | all-gather       (out of a TP region)
    gather_sequence                     all-gather       | split            (into replicated work)

The way into a TP region (all-gather forward, reduce-scatter backward) is fused with the
column-parallel matmul that follows it (``parallel/layers.py``), which saves only this rank's slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


def gather_sequence_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's slice along the sequence (dimension 1), outside autograd."""
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    return x.chunk(world, dim=1)[dist.get_rank(group)].contiguous()


def reduce_scatter_sequence_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks and keep this rank's slice of the sequence, outside autograd."""
    world = _world(group)
    if world == 1:
        return x
    # Sequence first, so that each rank's slice is one contiguous block of the collective.
    full = x.transpose(0, 1).contiguous()
    out = full.new_empty((full.size(0) // world,) + tuple(full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.transpose(0, 1).contiguous()


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence_no_grad(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_sequence_no_grad(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence_no_grad(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_sequence_no_grad(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_seq(grad, ctx.group), None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""
    return x if _world(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel op)."""
    return x if _world(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the last dimension across ranks; backward keeps this rank's slice."""
    return x if _world(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; backward gathers."""
    return x if _world(group) == 1 else _ScatterToTP.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence; backward gathers the gradient's slices."""
    return x if _world(group) == 1 else _ScatterToSP.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the ranks' partial outputs and keep this rank's slice of the sequence (the output of a
    row-parallel op); backward gathers."""
    return x if _world(group) == 1 else _ReduceScatterToSP.apply(x, group)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The whole sequence from every rank's slice, for work every rank repeats (the output head):
    the gradient arriving is the same on every rank, so backward keeps this rank's slice of it."""
    return x if _world(group) == 1 else _GatherSequence.apply(x, group)


def all_reduce_no_grad(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics, norms)."""
    if _world(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (no autograd): rebuilds a full sharded tensor."""
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
