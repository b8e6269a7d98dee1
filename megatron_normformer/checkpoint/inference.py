"""A model for inference from a consolidated release file or a training checkpoint directory.

``PATH.safetensors`` (or ``PATH``, its base) is the release format (``checkpoint/release.py``); a
directory is a training checkpoint of any TP/PP/ZeRO layout, read through its layout-independent
state (``checkpoint/convert.py``), or a Hugging Face transformers directory (one with a
``config.json``: a NormFormer export or a GPT-2, ``interop/hf.py``); any other file is read as a
fairseq ``transformer_lm`` checkpoint (``interop/fairseq.py``). Either way the weights arrive as
full fp32 tensors and are cut for this process's tensor-parallel rank.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from megatron_normformer.checkpoint.convert import load_training_checkpoint
from megatron_normformer.checkpoint.release import build_model, load_consolidated
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.interop.fairseq import import_fairseq
from megatron_normformer.interop.hf import is_hf_directory, load_hf_directory
from megatron_normformer.parallel.state import SingleProcessState


def load_full_state(path: str, tag: Optional[str] = None, fairseq_dict: Optional[str] = None
                    ) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Full (TP-gathered) fp32 tensors and the model config of a checkpoint at ``path``; another
    file is read as a fairseq transformer_lm checkpoint (``interop/fairseq.py``), its vocabulary
    reordered to GPT-2 BPE ids by ``fairseq_dict`` (``--fairseq-dict``) when given."""
    consolidated = path.endswith(".safetensors") or os.path.isfile(path + ".safetensors")
    if fairseq_dict is not None and (consolidated or not os.path.isfile(path)):
        raise ConfigError(f"--fairseq-dict goes with a fairseq checkpoint file, and --load {path} is not one")
    if consolidated:
        return load_consolidated(path)
    if is_hf_directory(path):
        return load_hf_directory(path)
    if os.path.isdir(path):
        return load_training_checkpoint(path, tag=tag)
    if os.path.isfile(path):
        imported = import_fairseq(path, fairseq_dict)
        return imported.full, imported.cfg
    raise ConfigError(f"--load {path}: neither a consolidated checkpoint ({path}.safetensors), "
                      "a training checkpoint directory, a Hugging Face directory nor a fairseq "
                      "checkpoint file")


def build_inference_model(path: str, pstate=None, device=None, dtype: torch.dtype = torch.float32,
                          tag: Optional[str] = None):
    """(GPTModel in eval mode, ModelConfig) for ``pstate``'s TP rank (single process by default)."""
    pstate = pstate or SingleProcessState()
    full, cfg = load_full_state(path, tag)
    if cfg.bidirectional:
        raise ConfigError(f"--load {path}: a bidirectional (masked-LM) model cannot generate text")
    model = build_model(full, cfg, pstate, device)
    model.to(dtype=dtype)
    model.eval()
    return model, cfg
