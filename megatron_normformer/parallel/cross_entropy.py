"""Cross entropy over logits whose vocabulary dimension is split across the TP group.

The full logits are never gathered: each rank contributes its max, its target logit and its sum of
exponentials through three small all-reduces. Columns at or past the real vocabulary size (padding)
are excluded from the softmax, so padding never changes the loss or its gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_normformer.parallel.mappings import all_reduce_no_grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local_vocab = logits.size(-1)
        if vocab_start + local_vocab > vocab_size:
            logits = logits.clone()
            logits[..., max(0, vocab_size - vocab_start):] = float("-inf")
        logits_max = logits.max(dim=-1).values
        all_reduce_no_grad(logits_max, group, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)

        outside = (target < vocab_start) | (target >= vocab_start + local_vocab)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
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
