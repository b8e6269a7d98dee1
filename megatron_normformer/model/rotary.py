"""Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half pairing of Llama.

Of each head's ``head_dim`` dimensions the first ``rot_dim = int(head_dim * rotary_percent)``
(``ModelConfig.rotary_dim``) are rotated, the rest pass through. Dimension i < rot_dim / 2 pairs with
dimension i + rot_dim / 2 (not with its neighbour 2i + 1, the original paper's and GPT-J's
interleaved pairing), and the pair turns by the angle p * inv_freq_i at position p, with
inv_freq_i = base^(-2i / rot_dim):

    x_rot = x * cos + rotate_half(x) * sin,    rotate_half([x1, x2]) = [-x2, x1]

with cos and sin repeated over both halves. This is what Hugging Face's Llama and Megatron-LM compute,
so their checkpoints' q/k projections need no permutation. Angles are computed in float32 from the
integer positions and cos/sin are then cast to the activations' dtype, as Hugging Face does: a bf16
model with rotary positions rounds where the exported one does.

Nothing here is a parameter or a buffer: inv_freq is rebuilt in every forward (rot_dim / 2 numbers),
so no checkpoint holds it and ZeRO-3's initialisation (which builds every floating-point tensor in
the training dtype) cannot round it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def inverse_frequencies(rot_dim: int, base: float, device=None) -> torch.Tensor:
    """float32 [rot_dim / 2]: base^(-2i / rot_dim)."""
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim
    return 1.0 / (base ** exponents)


def rotary_cos_sin(position_ids: Optional[torch.Tensor], seq: int, rot_dim: int, base: float,
                   dtype: torch.dtype, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch | 1, seq, rot_dim] in ``dtype`` for ``position_ids`` [batch | 1, seq]
    (integers; None: 0 .. seq - 1)."""
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).unsqueeze(0)
    inv_freq = inverse_frequencies(rot_dim, base, position_ids.device)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, rot_dim / 2], float32
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.size(-1)`` dimensions of ``x`` [batch, heads, seq, head_dim]; ``cos``
    and ``sin`` [batch | 1, seq, rot_dim] (``rotary_cos_sin``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over the heads
    rot = cos.size(-1)
    if rot == x.size(-1):
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)
