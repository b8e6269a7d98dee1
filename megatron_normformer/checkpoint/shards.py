"""Full tensors and tensor-parallel shards: the one place that knows how a parameter is cut.

A TP-sharded parameter carries ``tensor_model_parallel`` and ``partition_dim`` (``parallel/layers``);
vocabulary-parallel ones also ``vocab_padded``: their full tensor has ``padded_vocab_size(TP)``
rows, of which checkpoints keep exactly ``vocab_size``, so that a file does not depend on the TP
degree that wrote it. ``layout_of`` records those facts for a file, ``cut`` makes one TP rank's
shard of a full tensor, ``full_tensor`` gathers one from every rank.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_normformer.parallel.mappings import gather_along_dim


def layout_of(param) -> Dict:
    """How ``param`` is split: ``partition_dim`` (None: replicated) and ``vocab_padded``."""
    return {"partition_dim": param.partition_dim if getattr(param, "tensor_model_parallel", False) else None,
            "vocab_padded": bool(getattr(param, "vocab_padded", False))}


def cut(full: torch.Tensor, partition_dim: Optional[int], vocab_padded: bool, padded_rows: int,
        tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of ``full``; vocabulary rows re-padded to ``padded_rows``."""
    if partition_dim is None:
        return full
    if vocab_padded and padded_rows > full.shape[0]:
        pad = full.new_zeros((padded_rows - full.shape[0],) + tuple(full.shape[1:]))
        full = torch.cat([full, pad])
    return full.chunk(tp_size, dim=partition_dim)[tp_rank].contiguous()


def cut_for(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of ``full``, shaped like ``param`` (also a ZeRO-3-partitioned one)."""
    layout = layout_of(param)
    rows = getattr(param, "ds_shape", param.shape)[0] * tp_size
    return cut(full, layout["partition_dim"], layout["vocab_padded"], rows, tp_rank, tp_size)


def full_tensor(param, value: torch.Tensor, group) -> torch.Tensor:
    """The full (TP-gathered) version of ``value`` laid out like ``param`` (a weight or its grad);
    a collective over the TP group."""
    if getattr(param, "tensor_model_parallel", False):
        return gather_along_dim(value, param.partition_dim, group)
    return value


def unpadded(param, full: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``full`` without the vocabulary padding rows (the checkpoint form)."""
    return full[:vocab_size] if getattr(param, "vocab_padded", False) else full
