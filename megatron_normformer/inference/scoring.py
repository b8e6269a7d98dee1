"""Log-likelihoods of continuations and of whole documents (rolling windows), batched.

``score_continuations`` is what multiple-choice evaluation needs: for (context, continuation) token
lists, the summed log-probability of the continuation given the context and whether greedy decoding
would have produced it. Inputs longer than ``max_length`` keep their last ``max_length`` tokens.
Requests are sorted longest first and right-padded; with causal attention padding after a sequence
never changes its logits, so batching is exact.

``rolling_windows`` cuts a document into (context, continuation) pieces that score every token
exactly once: the first window reads ``prefix`` plus up to ``max_length - 1`` tokens, each later
window scores the next ``stride`` tokens with the full ``max_length`` tokens before them as context
(``stride = max_length`` gives disjoint windows; a smaller stride is Megatron's overlapping
evaluation, more context per token at more compute).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

Pair = Tuple[Sequence[int], Sequence[int]]


@torch.no_grad()
def score_continuations(model, pairs: Sequence[Pair], max_length: int,
                        batch_size: int = 1) -> List[Tuple[float, bool]]:
    """[(sum log p(continuation | context), continuation is the greedy choice)] per pair."""
    device = next(model.parameters()).device
    prepared = []
    for index, (context, continuation) in enumerate(pairs):
        if len(continuation) == 0:
            raise ValueError(f"request {index}: empty continuation")
        if len(context) == 0:
            raise ValueError(f"request {index}: empty context (prefix it with <eod>)")
        full = list(context) + list(continuation)
        full = full[-(max_length + 1):]
        n_cont = min(len(continuation), len(full) - 1)
        prepared.append((index, full[:-1], full[1:], n_cont))
    prepared.sort(key=lambda r: -len(r[1]))
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        width = len(chunk[0][1])
        inputs = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for row, (_, inp, _, _) in enumerate(chunk):
            inputs[row, :len(inp)] = torch.as_tensor(inp, dtype=torch.long)
        logprobs = F.log_softmax(model.gather_logits(model(inputs)).float(), dim=-1)
        for row, (index, inp, target, n_cont) in enumerate(chunk):
            positions = slice(len(inp) - n_cont, len(inp))
            wanted = torch.as_tensor(target[-n_cont:], dtype=torch.long, device=device)
            row_lp = logprobs[row, positions]
            total = row_lp.gather(-1, wanted.unsqueeze(-1)).double().sum().item()
            greedy = bool((row_lp.argmax(dim=-1) == wanted).all())
            results[index] = (total, greedy)
    return results


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int,
                    stride: int = None) -> List[Pair]:
    """(context, continuation) pieces whose continuations tile ``tokens`` exactly once."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"rolling stride must be in [1, {max_length}], got {stride}")
    seq = [prefix] + list(tokens)  # target t_i is seq[i + 1]
    pieces: List[Pair] = []
    begin = 1
    end = min(len(seq), 1 + max_length)
    while begin < len(seq):
        context_start = max(0, end - 1 - max_length)
        pieces.append((seq[context_start:begin], seq[begin:end]))
        begin, end = end, min(len(seq), end + stride)
    return pieces


def rolling_loglikelihood(model, documents: Sequence[Sequence[int]], prefix: int, max_length: int,
                          batch_size: int = 1, stride: int = None) -> List[float]:
    """Summed log-probability of every token of each document (conditioned on ``prefix``)."""
    pieces, owner = [], []
    for d, tokens in enumerate(documents):
        for piece in rolling_windows(tokens, prefix, max_length, stride):
            pieces.append(piece)
            owner.append(d)
    totals = [0.0] * len(documents)
    for d, (lp, _) in zip(owner, score_continuations(model, pieces, max_length, batch_size)):
        totals[d] += lp
    return totals
