"""Offline conversions between checkpoint layouts (the library behind tools/convert_checkpoint.py).

A training checkpoint (``--save DIR``; any TP, PP, ZeRO stage) carries the layout-independent state
of :mod:`megatron_normformer.universal` under ``DIR/TAG/universal``. From it:

- :func:`load_training_checkpoint` gives the full fp32 weights by canonical name plus the config
  (what inference and the consolidated export read);
- :func:`to_consolidated` writes the release format of :mod:`megatron_normformer.consolidated`;
- :func:`reshard` writes a checkpoint for another (TP, PP): its universal shards cut for that
  layout, optimizer moments included, plus ``run.json`` and ``latest``, so ``pretrain_gpt.py
  --load`` resumes it directly;
- :func:`from_consolidated` starts a checkpoint (fresh optimizer) from a consolidated file.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.universal import MOMENTS, UNIVERSAL_DIR, UniversalReader


def resolve_tag(load_dir: str, tag: Optional[str] = None) -> str:
    if not os.path.isdir(load_dir):
        raise ConfigError(f"--load {load_dir}: no such directory")
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise ConfigError(f"--load {load_dir}: no complete checkpoint (no 'latest' file)")
        with open(latest) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise ConfigError(f"--load {load_dir}: no checkpoint {tag!r}")
    return tag


def load_training_checkpoint(load_dir: str, tag: Optional[str] = None
                             ) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Full fp32 weights (canonical names, vocabulary unpadded) and the model config."""
    reader = UniversalReader(os.path.join(load_dir, resolve_tag(load_dir, tag)))
    return {name: reader.full(name).float() for name in reader.names()}, reader.cfg


def to_consolidated(load_dir: str, output: str, tag: Optional[str] = None) -> str:
    from megatron_normformer.consolidated import save_consolidated

    full, cfg = load_training_checkpoint(load_dir, tag)
    return save_consolidated(output, full, cfg)


def _shard(full: torch.Tensor, info: dict, rank: int, tp: int, cfg: ModelConfig) -> torch.Tensor:
    dim = info["partition_dim"]
    if dim is None:
        return full
    if info["vocab_padded"]:
        padded = cfg.padded_vocab_size(tp)
        full = torch.cat([full, full.new_zeros((padded - full.shape[0],) + tuple(full.shape[1:]))])
    return full.chunk(tp, dim=dim)[rank].contiguous()


def _write_universal(out_tag_dir: str, tensors_by_name: Dict[str, Dict[Optional[str], torch.Tensor]],
                     layout: Dict[str, dict], cfg: ModelConfig, tp: int, pp: int, step: int) -> None:
    """Shards of ``tensors_by_name`` ({name: {None: weight, 'exp_avg': ..., ...}}) for (tp, pp)."""
    from safetensors.torch import save_file

    from megatron_normformer.model.pipeline import stage_layer_counts

    if cfg.num_attention_heads % tp or cfg.ffn_hidden_size % tp:
        raise ConfigError(f"--target-tp {tp}: heads ({cfg.num_attention_heads}) and FFN size "
                          f"({cfg.ffn_hidden_size}) must be divisible by it")
    counts = stage_layer_counts(cfg.num_layers, pp)
    first_layer = [sum(counts[:s]) for s in range(pp)]

    def stage_of(name: str) -> int:
        if name.startswith("embedding."):
            return 0
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            return max(s for s in range(pp) if first_layer[s] <= layer)
        return pp - 1

    out_dir = os.path.join(out_tag_dir, UNIVERSAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    for stage in range(pp):
        for rank in range(tp):
            tensors, meta = {}, {}
            for name, values in tensors_by_name.items():
                info = layout[name]
                if stage_of(name) != stage or (info["partition_dim"] is None and rank != 0):
                    continue
                for key, value in values.items():
                    stored = name if key is None else f"{name}::{key}"
                    tensors[stored] = _shard(value, info, rank, tp, cfg)
                meta[name] = info
            if tensors:
                save_file(tensors, os.path.join(out_dir, f"tp{rank:02d}_pp{stage:02d}.safetensors"),
                          metadata={"layout": json.dumps(meta)})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                   "optimizer_step": step, "model_config": cfg.to_dict()}, f, indent=1)


def _write_run_json(out_tag_dir: str, run_meta: dict, tp: int, pp: int) -> None:
    meta = json.loads(json.dumps(run_meta))
    meta["run"]["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    meta["universal_only"] = True  # no DeepSpeed files: --load goes through the universal path
    with open(os.path.join(out_tag_dir, "run.json"), "w") as f:
        json.dump(meta, f, indent=1)


def reshard(load_dir: str, save_dir: str, target_tp: int, target_pp: int,
            tag: Optional[str] = None) -> str:
    """A checkpoint of (target_tp, target_pp) with weights and Adam moments; returns its tag."""
    tag = resolve_tag(load_dir, tag)
    src = os.path.join(load_dir, tag)
    reader = UniversalReader(src)
    tensors = {name: {None: reader.full(name), **{k: reader.full(name, k) for k in MOMENTS}}
               for name in reader.names()}
    out = os.path.join(save_dir, tag)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    _write_universal(out, tensors, reader.layout, reader.cfg, target_tp, target_pp, reader.step)
    with open(os.path.join(src, "run.json")) as f:
        _write_run_json(out, json.load(f), target_tp, target_pp)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)
    return tag


def from_consolidated(path: str, save_dir: str, target_tp: int, target_pp: int) -> str:
    """A checkpoint at iteration 0 (fresh optimizer) with the weights of a consolidated file."""
    from megatron_normformer.consolidated import load_consolidated
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState

    full, cfg = load_consolidated(path)
    with torch.device("meta"):
        model = GPTModel(cfg, SingleProcessState(), device="meta")
    layout = {n: {"partition_dim": p.partition_dim if p.tensor_model_parallel else None,
                  "vocab_padded": bool(getattr(p, "vocab_padded", False))}
              for n, p in model.named_parameters()}
    tensors = {n: {None: full[n], **{k: torch.zeros_like(full[n]) for k in MOMENTS}} for n in layout}
    tag = "iter_0000000"
    out = os.path.join(save_dir, tag)
    os.makedirs(out, exist_ok=True)
    _write_universal(out, tensors, layout, cfg, target_tp, target_pp, step=0)
    run_meta = {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0,
                "run": {"model": cfg.to_dict()}, "world_size": None}
    _write_run_json(out, run_meta, target_tp, target_pp)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)
    return tag
