"""Layout-invariant initialisation.

Every random tensor of the model is defined by a counter-based Philox stream keyed by
(seed, parameter name). The stream enumerates the FULL tensor with its tensor-parallel partition
dimension outermost, so any rank's shard is one contiguous range of the stream and can be generated
on its own, at any TP degree, without ever building the full tensor (nor the full model) anywhere.
The same seed therefore gives bit-identical full weights at TP=1, 2, 4, ... and at any PP degree
(names use global layer numbers).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np
import torch

_VALUES_PER_COUNTER = 4  # Philox4x64 yields four 64-bit words per counter step
_CHUNK = 1 << 22  # elements generated per numpy call: bounds host memory for huge matrices


def _philox_key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def _standard_normal_range(key: int, start: int, count: int) -> np.ndarray:
    """Elements [start, start + count) of the standard-normal stream for ``key`` (float64)."""
    first_block = start // _VALUES_PER_COUNTER
    skip = start - first_block * _VALUES_PER_COUNTER
    n_words = count + skip
    n_words += (-n_words) % 2  # Box-Muller consumes words in pairs
    bitgen = np.random.Philox(key=key)
    bitgen.advance(first_block)
    words = bitgen.random_raw(n_words)
    # 53-bit uniforms in (0, 1]: never 0, so the log is finite.
    u = ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))
    u1, u2 = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    z = np.empty(n_words, dtype=np.float64)
    z[0::2] = radius * np.cos(angle)
    z[1::2] = radius * np.sin(angle)
    return z[skip:skip + count]


def normal_shard(seed: int, name: str, full_shape: Sequence[int], std: float,
                 partition_dim: Optional[int] = None, rank: int = 0, world: int = 1,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's shard of N(0, std^2) tensor ``name`` of shape ``full_shape``.

    ``partition_dim`` is the dimension split evenly over ``world`` ranks (None: replicated).
    """
    full_shape = tuple(int(s) for s in full_shape)
    if partition_dim is None:
        partition_dim, world, rank = 0, 1, 0
    size = full_shape[partition_dim]
    if size % world:
        raise ValueError(f"{name}: dimension {partition_dim} ({size}) not divisible by {world}")
    local = size // world
    rest = [s for i, s in enumerate(full_shape) if i != partition_dim]
    inner = math.prod(rest)
    start, count = rank * local * inner, local * inner
    key = _philox_key(seed, name)
    flat = torch.empty(count, dtype=dtype)
    for offset in range(0, count, _CHUNK):
        n = min(_CHUNK, count - offset)
        values = _standard_normal_range(key, start + offset, n) * std
        flat[offset:offset + n] = torch.from_numpy(values)
    # The stream is laid out with the partition dimension first; move it back into place.
    shard = flat.view(local, *rest)
    return shard.movedim(0, partition_dim).contiguous()


def init_normal_(param: torch.Tensor, seed: int, name: str, full_shape: Sequence[int], std: float,
                 partition_dim: Optional[int] = None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Fill ``param`` (this rank's shard) in place; a no-op on the meta device."""
    if param.device.type == "meta":
        return param
    values = normal_shard(seed, name, full_shape, std, partition_dim, rank, world)
    if tuple(values.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shard shape {tuple(values.shape)} != parameter {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(values.to(device=param.device, dtype=param.dtype))
    return param
