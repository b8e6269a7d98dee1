"""Pieces the analyses share: token batches, the Pre-LN / NormFormer pair of configs, flags, plots.

The analyses train small models themselves in a plain single-process torch loop (AdamW), so that
they run anywhere, CPU included, and measure the architecture rather than a training stack.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from megatron_normformer.arguments import add_model_args, model_config_from_args
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.data.indexed_dataset import IndexedDataset, dataset_exists

NORMFORMER_FLAGS = ("scale_attn", "scale_fc", "scale_heads", "scale_resids")


def architecture_pair(cfg: ModelConfig) -> Dict[str, ModelConfig]:
    """The same shape as Pre-LN (all four operations off) and as NormFormer (all on)."""
    return {"preln": dataclasses.replace(cfg, **{f: False for f in NORMFORMER_FLAGS}),
            "normformer": dataclasses.replace(cfg, **{f: True for f in NORMFORMER_FLAGS})}


class TokenSource:
    """Random windows of ``seq_length + 1`` tokens from an indexed dataset, or uniform mock tokens."""

    def __init__(self, data_path: Optional[str], vocab_size: Optional[int], max_tokens: int = 5_000_000):
        self.tokens = None
        if data_path:
            if not dataset_exists(data_path):
                raise ConfigError(f"--data-path {data_path}: expected {data_path}.bin and .idx")
            ds = IndexedDataset(data_path)
            parts, total = [], 0
            for i in range(len(ds)):
                parts.append(np.asarray(ds[i], dtype=np.int64))
                total += len(parts[-1])
                if total >= max_tokens:
                    break
            self.tokens = torch.from_numpy(np.concatenate(parts))
            self.vocab_size = vocab_size or int(self.tokens.max()) + 1
        else:
            if not vocab_size:
                raise ConfigError("--vocab-size is required with mock data (no --data-path)")
            self.vocab_size = vocab_size

    def batches(self, batch_size: int, seq_length: int, seed: int) -> Iterator[torch.Tensor]:
        """An endless, seeded stream of int64 [batch, seq_length + 1] tensors."""
        g = torch.Generator().manual_seed(seed)
        while True:
            if self.tokens is None:
                yield torch.randint(0, self.vocab_size, (batch_size, seq_length + 1), generator=g)
                continue
            if len(self.tokens) <= seq_length + 1:
                raise ConfigError(f"--data-path holds {len(self.tokens)} tokens, fewer than "
                                  f"--seq-length + 1 ({seq_length + 1})")
            starts = torch.randint(0, len(self.tokens) - seq_length - 1, (batch_size,), generator=g)
            yield torch.stack([self.tokens[s:s + seq_length + 1] for s in starts.tolist()])


def add_analysis_args(parser: argparse.ArgumentParser, seq_length=64, batch=8) -> None:
    """Model shape flags (as in training), data source, batch and output flags."""
    add_model_args(parser)
    g = parser.add_argument_group("analysis run")
    g.add_argument("--data-path", default=None,
                   help="Preprocessed dataset prefix (PREFIX.bin/.idx); mock tokens when omitted.")
    g.add_argument("--seq-length", type=int, default=seq_length)
    g.add_argument("--micro-batch-size", type=int, default=batch)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--output-dir", required=True, help="Where the JSON and PNG files go.")


def config_from_args(args, vocab_size: int) -> ModelConfig:
    """A ModelConfig from the model flags with small-model defaults and dropout off."""
    defaults = dict(num_layers=4, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                    attention_dropout=0.0)
    for name, value in defaults.items():
        if getattr(args, name, None) is None and not getattr(args, "model_size", None):
            setattr(args, name, value)
    if getattr(args, "max_position_embeddings", None) is None:
        args.max_position_embeddings = max(args.seq_length, 16)
    cfg = model_config_from_args(args, vocab_size=vocab_size)
    if cfg.max_sequence_length is not None and args.seq_length > cfg.max_sequence_length:
        raise ConfigError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                          f"({cfg.max_position_embeddings})")
    return cfg


def write_json(path: str, data: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.write("\n")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'megatron_normformer[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
