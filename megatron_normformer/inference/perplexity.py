"""Validation loss and perplexity of a model on a preprocessed (indexed) dataset.

Each sample holds ``seq_length + 1`` tokens; every one of its ``seq_length`` next-token predictions
counts (no loss mask), as in training's validation. The reported loss is the mean over all counted
tokens and ``ppl = exp(loss)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def evaluate_perplexity(model, dataset, micro_batch_size: int, eval_iters: Optional[int] = None) -> dict:
    """{loss, ppl, tokens, samples, iters}: ``eval_iters`` micro-batches, or one full pass."""
    device = next(model.parameters()).device
    total_samples = len(dataset)
    if eval_iters is not None:
        total_samples = min(total_samples, eval_iters * micro_batch_size)
    loss_sum, tokens, iters = 0.0, 0, 0
    for start in range(0, total_samples, micro_batch_size):
        indices = range(start, min(start + micro_batch_size, total_samples))
        batch = torch.stack([torch.as_tensor(dataset[i]["text"]) for i in indices]).to(device)
        losses = model(batch[:, :-1], batch[:, 1:])
        loss_sum += losses.double().sum().item()
        tokens += losses.numel()
        iters += 1
    if tokens == 0:
        raise ValueError("the evaluation split has no samples")
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens, "samples": total_samples,
            "iters": iters}
