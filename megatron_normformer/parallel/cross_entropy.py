"""Cross entropy over logits whose vocabulary dimension is split across the TP group.

The full logits are never gathered: each rank contributes its max, its target logit and its sum of
exponentials through three small all-reduces. Columns at or past the real vocabulary size (padding)
are excluded from the softmax, so padding never changes the loss or its gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_normformer.parallel.mappings import all_reduce_no_grad


def _without_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """fp32 (or wider) logits with the padded columns at -inf."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if vocab_start + logits.size(-1) > vocab_size:
        logits = logits.clone()
        logits[..., max(0, vocab_size - vocab_start):] = float("-inf")
    return logits


def _local_target(logits: torch.Tensor, target: torch.Tensor, vocab_start: int):
    """(this rank's logit of each target, 0 where another rank holds it; that mask; local ids)."""
    outside = (target < vocab_start) | (target >= vocab_start + logits.size(-1))
    local_target = (target - vocab_start).masked_fill(outside, 0)
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    return target_logit.masked_fill(outside, 0.0), outside, local_target


def _global_max(logits: torch.Tensor, group) -> torch.Tensor:
    logits_max = logits.max(dim=-1).values
    return all_reduce_no_grad(logits_max, group, dist.ReduceOp.MAX)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        logits = _without_padding(logits, vocab_start, vocab_size)
        logits = logits - _global_max(logits, group).unsqueeze(-1)
        target_logit, outside, local_target = _local_target(logits, target, vocab_start)
        all_reduce_no_grad(target_logit, group)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        all_reduce_no_grad(sum_exp, group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 vocab_size: int, group=None) -> torch.Tensor:
    """Per-token loss (fp32, same shape as ``target``).

    ``logits``: [..., V_local] this rank's slice starting at global column ``vocab_start``;
    ``vocab_size``: the real (unpadded) vocabulary size. The backward consumes the saved softmax in
    place, so call backward once per forward (as training does).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group)


@torch.no_grad()
def vocab_parallel_correct(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                           vocab_size: int, group=None) -> torch.Tensor:
    """1.0 where ``target`` has the largest logit over the whole (TP-split, unpadded) vocabulary."""
    logits = _without_padding(logits.detach(), vocab_start, vocab_size)
    best = _global_max(logits, group)
    target_logit, outside, _ = _local_target(logits, target, vocab_start)
    target_logit = target_logit.masked_fill(outside, float("-inf"))
    all_reduce_no_grad(target_logit, group, dist.ReduceOp.MAX)
    return (target_logit >= best).float()


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's loss under ``--eod-mask-loss``: sum(loss * mask) / sum(mask) over the
    micro-batch (0, not NaN, for a micro-batch with no target left)."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
