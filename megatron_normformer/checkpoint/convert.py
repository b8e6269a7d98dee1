"""Offline conversions between checkpoint layouts (the library behind tools/convert_checkpoint.py).

A training checkpoint (``--save DIR``; any TP, PP, ZeRO stage) carries the layout-independent state
of :mod:`megatron_normformer.checkpoint.universal` under ``DIR/TAG/universal``. From it:

- :func:`load_training_checkpoint` gives the full fp32 weights by name plus the config
  (what inference and the consolidated export read);
- :func:`to_consolidated` writes the release format of :mod:`megatron_normformer.checkpoint.release`;
- :func:`reshard` writes a checkpoint for another (TP, PP): its universal shards cut for that
  layout, optimizer moments included, plus ``run.json`` and ``latest``, so ``pretrain_gpt.py
  --load`` resumes it directly (never into the directory it reads);
- :func:`from_full_state` starts a checkpoint (fresh optimizer) from full tensors and a config (a
  consolidated file through :func:`from_consolidated`, or an imported model).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from megatron_normformer.checkpoint import atomic
from megatron_normformer.checkpoint.atomic import save_safetensors
from megatron_normformer.checkpoint.release import load_consolidated, save_consolidated
from megatron_normformer.checkpoint.shards import cut, layout_of
from megatron_normformer.checkpoint.training import resolve_tag
from megatron_normformer.checkpoint.universal import MOMENTS, UNIVERSAL_DIR, UniversalReader
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.model.bert import BertModel, bert_pieces
from megatron_normformer.model.gpt import GPTModel, gpt_pieces
from megatron_normformer.model.pipeline import stage_of_parameters
from megatron_normformer.parallel.state import SingleProcessState


def load_training_checkpoint(load_dir: str, tag: Optional[str] = None
                             ) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Full fp32 weights (canonical names, vocabulary unpadded) and the model config."""
    reader = UniversalReader(os.path.join(load_dir, resolve_tag(load_dir, tag)))
    return {name: reader.full(name).float() for name in reader.names()}, reader.cfg


def to_consolidated(load_dir: str, output: str, tag: Optional[str] = None) -> str:
    full, cfg = load_training_checkpoint(load_dir, tag)
    return save_consolidated(output, full, cfg)


def _write_universal(out_tag_dir: str, tensors_by_name: Dict[str, Dict[Optional[str], torch.Tensor]],
                     layout: Dict[str, dict], cfg: ModelConfig, tp: int, pp: int, step: int) -> None:
    """Shards of ``tensors_by_name`` ({name: {None: weight, 'exp_avg': ..., ...}}) for (tp, pp)."""
    pieces = (bert_pieces if cfg.bidirectional else gpt_pieces)(cfg, SingleProcessState(), seed=0)
    stage_of = stage_of_parameters(pieces, pp)

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
                    tensors[stored] = cut(value, info["partition_dim"], info["vocab_padded"],
                                          cfg.padded_vocab_size(tp), rank, tp)
                meta[name] = info
            if tensors:
                save_safetensors(tensors, os.path.join(out_dir, f"tp{rank:02d}_pp{stage:02d}.safetensors"),
                                 metadata={"layout": json.dumps(meta)})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                   "optimizer_step": step, "model_config": cfg.to_dict()}, f, indent=1)


def _write_checkpoint(save_dir: str, tag: str, tensors_by_name, layout: Dict[str, dict],
                      cfg: ModelConfig, tp: int, pp: int, step: int, run_meta: dict) -> str:
    """``save_dir/tag`` holding the universal shards for (tp, pp) and a ``run.json``, and
    ``latest`` naming it; returns the tag. Written into a temporary directory and renamed into
    place (``checkpoint/atomic.py``): a failed or killed conversion leaves ``save_dir`` as it was."""
    try:  # the model's own rule: heads, query groups and FFN size divisible by the TP degree
        cfg.validate(tp)
    except ConfigError as e:
        raise ConfigError(f"--target-tp {tp}: {e}") from None
    meta = json.loads(json.dumps(run_meta))
    meta["run"]["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    meta["universal_only"] = True  # no DeepSpeed files: --load goes through the universal path
    out = atomic.tmp_dir(save_dir, tag)
    try:
        if os.path.lexists(out):
            atomic.discard(out)
        os.makedirs(out)
        _write_universal(out, tensors_by_name, layout, cfg, tp, pp, step)
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(meta, f, indent=1)
        atomic.fsync_tree(out)
        atomic.publish(save_dir, tag)
    except Exception as e:
        atomic.discard(out)
        if isinstance(e, ConfigError):
            raise
        raise atomic.failed(save_dir, tag, atomic.describe_failure(e, os.path.join(save_dir, tag))) from None
    return tag


def reshard(load_dir: str, save_dir: str, target_tp: int, target_pp: int,
            tag: Optional[str] = None) -> str:
    """A checkpoint of (target_tp, target_pp) with weights and Adam moments; returns its tag."""
    tag = resolve_tag(load_dir, tag)
    src = os.path.join(load_dir, tag)
    if os.path.realpath(os.path.join(save_dir, tag)) == os.path.realpath(src):
        raise ConfigError(f"--save {save_dir} would replace the checkpoint being read "
                          f"({src}); write the converted checkpoint to another directory")
    reader = UniversalReader(src)
    moments = reader.moments()  # Adam's, SGD's, or none (saved with --no-save-optim)
    tensors = {name: {None: reader.full(name), **{k: reader.full(name, k) for k in moments}}
               for name in reader.names()}
    with open(os.path.join(src, "run.json")) as f:
        run_meta = json.load(f)
    return _write_checkpoint(save_dir, tag, tensors, reader.layout, reader.cfg, target_tp,
                             target_pp, reader.step, run_meta)


def from_full_state(full: Dict[str, torch.Tensor], cfg: ModelConfig, save_dir: str, target_tp: int,
                    target_pp: int) -> str:
    """A checkpoint at iteration 0 (fresh optimizer) holding the full tensors ``full`` of ``cfg``'s
    model: what a consolidated file, an imported model or an exported one starts training from."""
    with torch.device("meta"):
        model = (BertModel if cfg.bidirectional else GPTModel)(cfg, SingleProcessState(), device="meta")
    layout = {n: layout_of(p) for n, p in model.named_parameters()}
    tensors = {n: {None: full[n], **{k: torch.zeros_like(full[n]) for k in MOMENTS}} for n in layout}
    run_meta = {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0,
                "run": {"model": cfg.to_dict()}, "world_size": None}
    return _write_checkpoint(save_dir, "iter_0000000", tensors, layout, cfg, target_tp, target_pp,
                             0, run_meta)


def from_consolidated(path: str, save_dir: str, target_tp: int, target_pp: int) -> str:
    """A checkpoint at iteration 0 (fresh optimizer) with the weights of a consolidated file."""
    full, cfg = load_consolidated(path)
    return from_full_state(full, cfg, save_dir, target_tp, target_pp)
