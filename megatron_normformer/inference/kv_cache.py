"""Key/value cache for incremental decoding: prefill the prompt once, then one token per step.

A :class:`KVCache` holds, per layer, the keys and values of every position seen so far
(``[batch, local key/value heads, length, head_dim]``: under tensor parallelism each rank caches its
own, and under grouped-query attention there are G of them, not one per query head). Positions feed
the position table or, for rotary positions, the rotation of the new queries and keys; cached keys
keep the rotation of their own positions. ``GPTModel.forward(tokens, kv_cache=cache)`` feeds only
the new positions; the attention appends their keys/values and asks the cache for the mask.

Batches of prompts with different lengths are left-padded: ``append_padding_mask`` records which
positions are real. Real queries never attend to padding; positions count real tokens only, so a
left-padded prompt sees exactly the positions it would see alone. A padding query attends to itself
only, which keeps its (ignored) row finite.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class KVCache:
    """Per-layer keys/values plus the padding mask of a batch being decoded."""

    def __init__(self, num_layers: int, max_length: Optional[int] = None):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.max_length = max_length
        self.valid: Optional[torch.Tensor] = None
        """Bool [batch, length]: True where a position holds a real token (None: all real)."""

    @property
    def length(self) -> int:
        """Positions cached so far (by the first layer)."""
        return 0 if self.keys[0] is None else self.keys[0].size(2)

    def append_padding_mask(self, valid: torch.Tensor) -> None:
        """Record the realness of the positions about to be fed (bool [batch, new])."""
        valid = valid.bool()
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)

    def position_ids(self, new: int, device) -> torch.Tensor:
        """Positions of the next ``new`` tokens: real tokens before them, counted per row."""
        start = self.length
        if self.max_length is not None and start + new > self.max_length:
            raise ValueError(f"decoding past {self.max_length} positions "
                             "(--max-position-embeddings of the checkpoint)")
        if self.valid is None:
            return torch.arange(start, start + new, device=device).unsqueeze(0)
        if self.valid.size(1) != start + new:
            raise ValueError("append_padding_mask must cover the positions being fed")
        positions = self.valid.long().cumsum(dim=1) - 1
        return positions[:, start:].clamp(min=0).to(device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for ``layer``; return everything cached for it."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def attention_mask(self, new: int, total: int, device) -> Optional[torch.Tensor]:
        """Bool [batch|1, 1, new, total] (True = may attend), or None where SDPA needs none:
        a fresh unpadded prefill (plain causal) or one unpadded query (sees every key)."""
        if self.valid is None and (new == total or new == 1):
            return None
        query_pos = torch.arange(total - new, total, device=device).unsqueeze(1)
        key_pos = torch.arange(total, device=device).unsqueeze(0)
        allowed = key_pos <= query_pos  # [new, total]
        if self.valid is None:
            return allowed.view(1, 1, new, total)
        valid = self.valid[:, :total].to(device)
        allowed = allowed.unsqueeze(0) & valid.unsqueeze(1)  # [batch, new, total]
        allowed = allowed | (key_pos == query_pos).unsqueeze(0)
        return allowed.unsqueeze(1)
