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


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)  # never in place on one autograd keeps
    dist.all_reduce(x, group=group)
    return x


def gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (no autograd): rebuilds a full sharded tensor."""
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def split_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (no autograd)."""
    world = _world(group)
    if world == 1:
        return x
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def gather_sequence_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's slice along the sequence (dimension 1), outside autograd."""
    return gather_along_dim(x, 1, group)


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


def _conjugate(name: str, forward, backward):
    """An autograd map that runs ``forward(x, group)`` and sends ``backward(grad, group)`` back:
    the identity where the group has one rank."""

    class Map(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, grad):
            return backward(grad, ctx.group), None

    Map.__name__ = Map.__qualname__ = name

    def apply(x: torch.Tensor, group) -> torch.Tensor:
        return x if _world(group) == 1 else Map.apply(x, group)
    return apply


def _last(op):
    return lambda x, group: op(x, -1, group)


def _seq(op):
    return lambda x, group: op(x, 1, group)


# Tensor parallelism: the input of a column-parallel op is copied to every rank (its gradient
# summed), the output of a row-parallel op summed (its gradient passed through).
copy_to_tensor_parallel = _conjugate("CopyToTP", _identity, _all_reduce)
reduce_from_tensor_parallel = _conjugate("ReduceFromTP", _all_reduce, _identity)
gather_from_tensor_parallel = _conjugate("GatherFromTP", _last(gather_along_dim), _last(split_along_dim))
scatter_to_tensor_parallel = _conjugate("ScatterToTP", _last(split_along_dim), _last(gather_along_dim))
# Sequence parallelism (dimension 1 of [batch, seq, hidden]).
scatter_to_sequence_parallel = _conjugate("ScatterToSP", _seq(split_along_dim), gather_sequence_no_grad)
reduce_scatter_to_sequence_parallel = _conjugate("ReduceScatterToSP", reduce_scatter_sequence_no_grad,
                                                 gather_sequence_no_grad)
# The whole sequence for work every rank repeats (the output head): the gradient arriving is the
# same on every rank, so backward keeps this rank's slice of it.
gather_sequence = _conjugate("GatherSequence", gather_sequence_no_grad, _seq(split_along_dim))


def all_reduce_no_grad(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics, norms)."""
    if _world(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
