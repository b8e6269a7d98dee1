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
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

_VALUES_PER_COUNTER = 4  # Philox4x64 yields four 64-bit words per counter step
_CHUNK = 1 << 22  # elements generated per numpy call: bounds host memory for huge matrices


def _philox_key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def _uniform_words(key: int, start: int, count: int) -> np.ndarray:
    """Words [start, start + count) of the stream for ``key`` as 53-bit uniforms in (0, 1]."""
    first_block = start // _VALUES_PER_COUNTER
    skip = start - first_block * _VALUES_PER_COUNTER
    bitgen = np.random.Philox(key=key)
    bitgen.advance(first_block)
    words = bitgen.random_raw(count + skip)[skip:]
    # Never 0, so the Box-Muller log below is finite.
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))


def _standard_normal_range(key: int, start: int, count: int) -> np.ndarray:
    """Elements [start, start + count) of the standard-normal stream for ``key`` (float64)."""
    first_block = start // _VALUES_PER_COUNTER
    skip = start - first_block * _VALUES_PER_COUNTER
    n_words = count + skip
    n_words += (-n_words) % 2  # Box-Muller consumes words in pairs
    u = _uniform_words(key, first_block * _VALUES_PER_COUNTER, n_words)
    u1, u2 = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    z = np.empty(n_words, dtype=np.float64)
    z[0::2] = radius * np.cos(angle)
    z[1::2] = radius * np.sin(angle)
    return z[skip:skip + count]


def _symmetric_uniform_range(key: int, start: int, count: int) -> np.ndarray:
    """Elements [start, start + count) of the U(-1, 1) stream for ``key`` (float64)."""
    return 2.0 * _uniform_words(key, start, count) - 1.0


DISTRIBUTIONS = {"normal": _standard_normal_range, "uniform": _symmetric_uniform_range}


def random_shard(seed: int, name: str, full_shape: Sequence[int], scale: float,
                 partition_dim: Optional[int] = None, rank: int = 0, world: int = 1,
                 dtype: torch.dtype = torch.float32, distribution: str = "normal") -> torch.Tensor:
    """This rank's shard of random tensor ``name`` of shape ``full_shape``: N(0, scale^2) for
    ``distribution="normal"``, U(-scale, scale) for ``"uniform"``.

    ``partition_dim`` is the dimension split evenly over ``world`` ranks (None: replicated).
    """
    draw = DISTRIBUTIONS[distribution]
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
        values = draw(key, start + offset, n) * scale
        flat[offset:offset + n] = torch.from_numpy(values)
    # The stream is laid out with the partition dimension first; move it back into place.
    shard = flat.view(local, *rest)
    return shard.movedim(0, partition_dim).contiguous()


@dataclass
class InitSpec:
    """How to draw a weight: from the stream named ``name``, N(0, scale^2) (``normal``) or
    U(-scale, scale) (``uniform``).

    ``logical_shape`` describes the full tensor with its partition dimension first when the
    physical layout interleaves several logical pieces (e.g. QKV as [heads, 3, head_dim, hidden]).
    """

    seed: int
    name: str
    scale: float
    logical_shape: Optional[Sequence[int]] = None
    distribution: str = "normal"


def fill_shard(param: torch.Tensor, spec: InitSpec, full_shape: Sequence[int],
               partition_dim: Optional[int] = None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Fill ``param`` (this rank's shard of ``full_shape``) in place; a no-op on the meta device."""
    if param.device.type == "meta":
        return param
    if spec.logical_shape is not None:
        full_shape, partition_dim = spec.logical_shape, 0 if partition_dim is not None else None
    values = random_shard(spec.seed, spec.name, full_shape, spec.scale, partition_dim, rank, world,
                          distribution=spec.distribution)
    if values.numel() != param.numel():
        raise ValueError(f"{spec.name}: shard of {values.numel()} values for a parameter of shape "
                         f"{tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(values.reshape(param.shape).to(device=param.device, dtype=param.dtype))
    return param
