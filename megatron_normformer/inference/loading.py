"""Build an inference model from a consolidated release file or a training checkpoint directory.

``PATH.safetensors`` (or ``PATH``, its base) is the consolidated format of
``megatron_normformer.consolidated``; a directory is a DeepSpeed training checkpoint of any
TP/PP/ZeRO layout, read through ``checkpoint_convert.load_training_checkpoint``. Either way the
weights arrive as full fp32 tensors and are cut for this process's tensor-parallel rank.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from megatron_normformer.config import ConfigError, ModelConfig


def load_full_state(path: str, tag: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Full (TP-gathered) fp32 tensors and the model config of a checkpoint at ``path``."""
    from megatron_normformer.consolidated import load_consolidated

    if path.endswith(".safetensors") or os.path.isfile(path + ".safetensors"):
        return load_consolidated(path)
    if os.path.isdir(path):
        # Imported here: the converter knows every training layout and pulls in DeepSpeed.
        from megatron_normformer.checkpoint_convert import load_training_checkpoint

        return load_training_checkpoint(path, tag=tag)
    raise ConfigError(f"--load {path}: neither a consolidated checkpoint ({path}.safetensors) "
                      "nor a training checkpoint directory")


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``cuda`` when available, else ``cpu``; an explicit ``device`` wins."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(device)


def build_inference_model(path: str, pstate=None, device=None, dtype: torch.dtype = torch.float32,
                          tag: Optional[str] = None):
    """(GPTModel in eval mode, ModelConfig) for ``pstate``'s TP rank (single process by default)."""
    from megatron_normformer.consolidated import shard_state_dict
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState

    pstate = pstate or SingleProcessState()
    full, cfg = load_full_state(path, tag)
    if cfg.bidirectional:
        raise ConfigError(f"--load {path}: a bidirectional (masked-LM) model cannot generate text")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    model = GPTModel(cfg, pstate, device=device)
    local = shard_state_dict(full, model, pstate.tp_rank, pstate.tp_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(local[name])
    model.to(dtype=dtype)
    model.eval()
    return model, cfg


def check_tokenizer(tokenizer, cfg: ModelConfig, flag: str = "--tokenizer-type") -> None:
    """A tokenizer whose ids the model cannot embed is a user error, reported before any work."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{flag}: the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's "
                          f"vocabulary has {cfg.vocab_size}; is it the tokenizer the model was trained with?")
