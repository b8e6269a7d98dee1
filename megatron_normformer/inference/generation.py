"""Autoregressive text generation with a KV cache, batched, on any tensor-parallel degree.

    result = generate(model, [prompt_ids, ...], max_new_tokens=64, sampling=SamplingConfig(...),
                      eod=tokenizer.eod, seed=1234)

Prompts of different lengths are left-padded (see ``kv_cache``). A model with a position table
(sinusoidal or learned) decodes up to ``--max-position-embeddings`` positions; rotary positions have
no such bound. With ``use_cache`` the prompt is run once (prefill) and each step feeds one token;
without it every step recomputes the whole sequence, which is the reference the cache is tested
against.

Under tensor parallelism every rank computes the same full logits (``gather_logits``); the token is
chosen on the first rank of the TP group and broadcast, so all ranks feed the same token even when
sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_normformer.config import ConfigError
from megatron_normformer.inference.kv_cache import KVCache
from megatron_normformer.inference.sampling import SamplingConfig, sample_next

StopFn = Callable[[int, List[int]], bool]
"""``stop(row, new_tokens)`` -> True once row ``row`` should stop (e.g. a stop string appeared)."""


@dataclass
class GenerationResult:
    """New tokens per prompt (without the final eod) and why each row stopped."""

    tokens: List[List[int]]
    finish_reasons: List[str]
    """``eod``, ``stop`` (the stop function fired) or ``length`` (``max_new_tokens`` reached)."""
    logits: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    """With ``return_logits``: per prompt, fp32 [steps, vocab] logits each new token came from."""


def _broadcast_from_first_tp_rank(tokens: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return tokens
    dist.broadcast(tokens, src=dist.get_global_rank(tp_group, 0), group=tp_group)
    return tokens


def _is_first_tp_rank(tp_group) -> bool:
    return tp_group is None or dist.get_rank(tp_group) == 0


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Optional[SamplingConfig] = None, eod: Optional[int] = None,
             use_cache: bool = True, seed: Optional[int] = None, stop: Optional[StopFn] = None,
             return_logits: bool = False, pad_id: int = 0) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens."""
    sampling = (sampling or SamplingConfig(greedy=True)).validate()
    if not prompts:
        return GenerationResult([], [], [] if return_logits else None)
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (prefix an empty prompt with <eod>)")
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    if cfg.max_sequence_length is not None and longest + max_new_tokens > cfg.max_sequence_length:
        raise ConfigError(
            f"prompt ({longest} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
            f"--max-position-embeddings ({cfg.max_position_embeddings})")
    device = next(model.parameters()).device
    tp_group = getattr(model, "tp_group", None)
    generator = None
    if not sampling.is_greedy:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)

    batch = len(prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((batch, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        valid[i, longest - len(p):] = True
    padded = not bool(valid.all())

    def forward_all(seq: torch.Tensor, seq_valid: torch.Tensor) -> torch.Tensor:
        """Uncached: the whole sequence from scratch; the last position's logits."""
        if padded:
            cache = KVCache(cfg.num_layers)
            cache.append_padding_mask(seq_valid)
            local = model(seq, kv_cache=cache)
        else:
            local = model(seq)
        return model.gather_logits(local[:, -1]).float()

    cache = KVCache(cfg.num_layers) if use_cache else None
    if cache is not None:
        if padded:
            cache.append_padding_mask(valid)
        logits = model.gather_logits(model(tokens, kv_cache=cache)[:, -1]).float()
    else:
        logits = forward_all(tokens, valid)

    new_tokens: List[List[int]] = [[] for _ in range(batch)]
    step_logits: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    done = [False] * batch
    for step in range(max_new_tokens):
        if _is_first_tp_rank(tp_group):
            chosen = sample_next(logits, sampling, generator).to(device)
        else:
            chosen = torch.empty(batch, dtype=torch.long, device=device)
        chosen = _broadcast_from_first_tp_rank(chosen, tp_group)
        for i, t in enumerate(chosen.tolist()):
            if done[i]:
                continue
            if return_logits:
                step_logits[i].append(logits[i].cpu())
            if eod is not None and t == eod:
                done[i], reasons[i] = True, "eod"
                continue
            new_tokens[i].append(t)
            if stop is not None and stop(i, new_tokens[i]):
                done[i], reasons[i] = True, "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding (their tokens are ignored) so the batch stays rectangular.
        tokens = torch.cat([tokens, chosen.view(batch, 1)], dim=1)
        valid = torch.cat([valid, torch.ones((batch, 1), dtype=torch.bool, device=device)], dim=1)
        if cache is not None:
            if padded:
                cache.append_padding_mask(valid[:, -1:])
            logits = model.gather_logits(model(chosen.view(batch, 1), kv_cache=cache)[:, -1]).float()
        else:
            logits = forward_all(tokens, valid)
    stacked = None
    if return_logits:
        stacked = [torch.stack(rows) if rows else torch.empty(0, cfg.vocab_size) for rows in step_logits]
    return GenerationResult(new_tokens, reasons, stacked)
