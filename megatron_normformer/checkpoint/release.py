"""The consolidated release format: one fp32 safetensors file of full tensors plus the model config.

    PATH.safetensors   every parameter as its full (TP-gathered) fp32 tensor, named as in the
                       TP=1 model (e.g. ``layers.3.mlp.fc1.weight``); vocabulary rows unpadded
                       (exactly ``vocab_size``); the config also sits in the file's metadata
    PATH.json          the ModelConfig as JSON (``model_config.json`` style, for other tools)

Layouts inside the tensors: the fused QKV weight is group-major, ``[groups, (heads / groups query
heads, k, v), head_dim, hidden]`` flattened to ``[(heads + 2 groups) * head_dim, hidden]`` (with one
group per head, ``[heads, (q, k, v), head_dim, hidden]``); a SwiGLU ``fc1`` is ``[2F, hidden]`` with
gate and up rows interleaved (row 2i gate unit i, row 2i+1 up unit i); linear weights are
``[out, in]`` (torch convention). Contiguous row blocks of both are what a TP rank holds.

``full_state_dict`` gathers a TP-sharded model into this form (a collective over the TP group);
``load_into`` cuts it back into a model of any TP degree, and ``build_model`` builds that model.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch
from safetensors import safe_open

from megatron_normformer.checkpoint.atomic import save_safetensors
from megatron_normformer.checkpoint.shards import cut_for, full_tensor, unpadded
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel

FORMAT = "megatron_normformer.consolidated.v1"


def _paths(path: str) -> Tuple[str, str]:
    base = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return base + ".safetensors", base + ".json"


def full_state_dict(model: torch.nn.Module, tp_group, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Full fp32 tensors of a TP-sharded model, on every TP rank (call on all of them)."""
    return {name: unpadded(param, full_tensor(param, param.detach().float().cpu(), tp_group),
                           vocab_size).contiguous()
            for name, param in model.named_parameters()}


def load_into(model: torch.nn.Module, full: Dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Copy this TP rank's slices of ``full`` (full tensors by name) into ``model``'s parameters."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    if missing or unexpected:
        raise ConfigError(f"checkpoint does not match the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            value = cut_for(full[name], param, tp_rank, tp_size)
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
            param.copy_(value)


def build_model(full: Dict[str, torch.Tensor], cfg: ModelConfig, pstate, device=None):
    """A GPTModel / BertModel for ``pstate``'s TP layout holding the full tensors ``full``."""
    model = (BertModel if cfg.bidirectional else GPTModel)(cfg, pstate, device=device)
    load_into(model, full, pstate.tp_rank, pstate.tp_size)
    return model


def save_consolidated(path: str, full: Dict[str, torch.Tensor], cfg: ModelConfig) -> str:
    tensor_path, config_path = _paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(tensor_path)), exist_ok=True)
    config_json = json.dumps(cfg.to_dict(), indent=1, sort_keys=True)
    tmp = tensor_path + ".tmp"
    save_safetensors({k: v.float().contiguous() for k, v in full.items()}, tmp,
                     metadata={"format": FORMAT, "model_config": config_json})
    os.replace(tmp, tensor_path)
    with open(config_path + ".tmp", "w") as f:
        f.write(config_json + "\n")
    os.replace(config_path + ".tmp", config_path)
    return tensor_path


def load_consolidated(path: str) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    tensor_path, _ = _paths(path)
    if not os.path.isfile(tensor_path):
        raise ConfigError(f"{tensor_path}: no such consolidated checkpoint")
    with safe_open(tensor_path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "model_config" not in meta:
            raise ConfigError(f"{tensor_path}: not a megatron_normformer consolidated checkpoint")
        full = {k: f.get_tensor(k) for k in f.keys()}
    return full, ModelConfig.from_dict(json.loads(meta["model_config"]))
