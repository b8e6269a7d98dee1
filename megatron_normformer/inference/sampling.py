"""Next-token choice from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_normformer.config import ConfigError


@dataclass
class SamplingConfig:
    """How to pick the next token."""

    greedy: bool = False
    """Take the argmax (``--greedy``); temperature, top-k and top-p are then ignored."""
    temperature: float = 1.0
    """Divide the logits by this before sampling (``--temperature``); 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only (``--top-k``); 0 = all."""
    top_p: float = 1.0
    """Sample from the smallest set whose probability reaches p (``--top-p``); 1 = all."""

    def validate(self) -> "SamplingConfig":
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus ([batch, vocab])."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach p; the top one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids [batch] from fp32 logits [batch, vocab]."""
    logits = logits.float()
    if cfg.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    # The generator lives on the CPU so that a seed gives the same tokens on every device.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
